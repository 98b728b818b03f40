"""When runs meet, die holding locks, or find the store damaged: one writer per target, dead
locks recognised at once, leftovers collected, damaged chunks quarantined and healed, an
incremental bound to its parent, refusals that leave nothing behind, whole-version totals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import DEFAULT_CONF, MIB, make_image, one_error_line, run_hamal, sha256, wait_until
from nbd_servers import qemu_nbd

ENV = {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)}


def start_sync(*args: str) -> subprocess.Popen[str]:
    """A sync that runs long enough for a second run to meet it (16 MiB/s)."""
    cmd = [sys.executable, "-m", "hamal", "sync", *args, "--bwlimit", "16M", "--fsync-period", "0.2"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str]) -> str:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return out


def versions(store: str, disk: str = "d0") -> list[dict]:
    r = run_hamal("versions", store, "--disk", disk, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["versions"]


def restores_to(store: str, version: str, want: Path, out: Path, disk: str = "d0") -> None:
    r = run_hamal("restore", store, str(out), "--disk", disk, "--version", version)
    assert r.code == 0, r.err
    assert sha256(out) == sha256(want), f"version {version} restores identical"
    out.unlink()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def own_identity() -> dict:
    """The host identity fields a lock records, as this machine has them."""
    return {
        "host": Path("/proc/sys/kernel/hostname").read_text().strip(),
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
    }


def start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 1 :].split()[19])


def write_lock(store_dir: Path, name: str, body: dict, age_s: float = 0) -> Path:
    p = store_dir / "locks" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(body))
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


# 1. One writer per target.


def test_a_second_sync_into_the_same_file_target_is_refused(tmp_path: Path) -> None:
    a, b, t = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "t.raw"
    make_image(a, 64 * MIB, seed=1, fill=1.0)
    make_image(b, 64 * MIB, seed=2, fill=1.0)
    first = start_sync(str(a), str(t))
    try:
        wait_until(lambda: t.exists() and t.stat().st_blocks > 0, "the first sync writing")
        r = run_hamal("sync", str(b), str(t))
        assert r.code == 1
        line = one_error_line(r.err)
        assert f"target {t} is being written by" in line and f"(pid {first.pid} on host " in line, line
        assert "since 20" in line, "the holder's start time is named"
        finish(first)
    finally:
        first.kill()
    assert run_hamal("verify", str(a), str(t)).code == 0, "the target holds only the first source"


def test_a_second_sync_of_one_store_disk_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    make_image(a, 64 * MIB, seed=3, fill=1.0)
    make_image(b, 8 * MIB, seed=4, fill=1.0)
    store = f"dir:{tmp_path / 'store'}"
    first = start_sync(str(a), store, "--disk", "d0", "--journal", str(tmp_path / "j1"))
    try:
        wait_until(lambda: (tmp_path / "j1").exists(), "the first sync running")
        r = run_hamal("sync", str(b), store, "--disk", "d0", "--journal", str(tmp_path / "j2"))
        assert r.code == 1
        line = one_error_line(r.err)
        assert "disk 'd0' is being written by a sync of disk d0 (pid " in line, line
        assert f"(pid {first.pid} on host " in line, line
        # Another disk of the same store is no conflict.
        r = run_hamal("sync", str(b), store, "--disk", "d1", "--journal", str(tmp_path / "j3"))
        assert r.code == 0, r.err
        finish(first)
    finally:
        first.kill()
    (v,) = versions(store)
    restores_to(store, v["version"], a, tmp_path / "out.raw")


def test_a_second_sync_into_one_nbd_export_is_refused(tmp_path: Path, servers, sockdir) -> None:
    a, b, backing = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "backing.raw"
    make_image(a, 64 * MIB, seed=5, fill=1.0)
    make_image(b, 64 * MIB, seed=6, fill=1.0)
    backing.write_bytes(b"\0" * (64 * MIB))
    server = servers(qemu_nbd(backing, sockdir / "t.sock", read_only=False))
    first = start_sync(str(a), server.uri, "--journal", str(tmp_path / "j1"))
    try:
        wait_until(lambda: (tmp_path / "j1").exists(), "the first sync running")
        r = run_hamal("sync", str(b), server.uri, "--journal", str(tmp_path / "j2"))
        assert r.code == 1
        line = one_error_line(r.err)
        assert f"target {server.uri} is being written by a sync of disk " in line, line
        assert f"(pid {first.pid} on host " in line, line
        finish(first)
    finally:
        first.kill()
    server.stop()
    assert sha256(backing) == sha256(a)


# 2. Dead locks are recognised at once.


def test_a_killed_prunes_lock_does_not_block_the_next_sync(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 8 * MIB, seed=7)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    # What a SIGKILLed prune leaves: its exclusive lock, naming a process that is gone.
    pid = dead_pid()
    body = {"kind": "prune", "purpose": "prune", "pid": pid, "start_ticks": 1, **own_identity()}
    dead = write_lock(store_dir, "exclusive-0000000000aa.json", body)
    r = run_hamal("sync", str(src), store, "--disk", "d0")
    assert r.code == 0, r.err
    assert not dead.exists(), "the dead lock is removed by the run that finds it"
    # A live prune (here: this test process) is waited for, and named as a prune.
    me = {"kind": "prune", "purpose": "prune", "pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}
    live = write_lock(store_dir, "exclusive-0000000000bb.json", {**me, **own_identity()})
    p = subprocess.Popen(
        [sys.executable, "-m", "hamal", "-v", "sync", str(src), store, "--disk", "d0"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert p.poll() is None, "the sync waits while the collection runs"
    live.unlink()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (
        f"waiting for a garbage collection to end: store {store} is busy: held by a prune (pid {os.getpid()}"
        in err
    )


# 3. Leftovers are collected.


def test_prune_removes_dead_locks_and_old_temporary_objects_and_verify_reports_them(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 8 * MIB, seed=8)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    here_dead = write_lock(
        store_dir,
        "shared-0000000000cc.json",
        {"kind": "sync", "purpose": "sync of disk d0", "pid": dead_pid(), "start_ticks": 1, **own_identity()},
    )
    other_host = {"kind": "sync", "purpose": "sync of disk d9", "host": "elsewhere", "boot_id": "x", "pid": 1}
    old_elsewhere = write_lock(store_dir, "shared-0000000000dd.json", other_host, age_s=20 * 60)
    young_elsewhere = write_lock(store_dir, "shared-0000000000ee.json", other_host)
    chunk_dir = next((store_dir / "chunks").iterdir())
    old_tmp = chunk_dir / "abc.tmp-99999-0"
    old_tmp.write_bytes(b"x" * 1000)
    t = time.time() - 3600
    os.utime(old_tmp, (t, t))
    young_tmp = chunk_dir / "abd.tmp-99999-1"
    young_tmp.write_bytes(b"y")

    r = run_hamal("verify", store)
    assert r.code == 0, "leftovers are not damage"
    for name in (here_dead.name, old_elsewhere.name, old_tmp.name):
        assert name in r.err, r.err
    assert young_elsewhere.name not in r.err and young_tmp.name not in r.err

    r = run_hamal("prune", store, "--keep", "3", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["removed_locks"] == 2 and report["removed_temporaries"] == 1, report
    # Another host's lock that is still young may be a live sync: collection waits for it.
    assert "held by a sync of disk d9 (pid 1 on host elsewhere)" in report["gc_skipped"], report
    assert not here_dead.exists() and not old_elsewhere.exists() and not old_tmp.exists()
    assert young_tmp.exists(), "a temporary object of a write that may still run is kept"


# 4. Damaged chunks get repaired, not trusted.


def test_verify_deep_quarantines_a_damaged_chunk_and_the_next_sync_heals_it(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 32 * MIB, seed=9, fill=1.0)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    (v1,) = versions(store)
    chunk = sorted((store_dir / "chunks").rglob("*"))[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))

    r = run_hamal("verify", store, "--deep")
    assert r.code == 3
    assert "is damaged" in r.err and "marked 1 damaged or missing chunks in the quarantine" in r.err, r.err
    assert f"version {v1['version']} uses 1 quarantined chunk(s), at disk offset " in r.err, r.err
    assert chunk.exists(), "nothing is deleted on a verify's word"
    quarantined = [p for p in (store_dir / "quarantine").rglob("*") if p.is_file()]
    assert len(quarantined) == 1

    r = run_hamal("sync", str(src), store, "--disk", "d0")
    assert r.code == 0, r.err
    assert run_hamal("verify", store, "--deep").code == 0, "healed"
    assert not quarantined[0].exists(), "the healed chunk's entry goes with the commit"
    for v in versions(store):
        restores_to(store, v["version"], src, tmp_path / "out.raw")


def test_a_truncated_chunk_in_a_dir_store_is_replaced_by_the_next_sync(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 32 * MIB, seed=10, fill=1.0)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    chunk = sorted((store_dir / "chunks").rglob("*"))[-1]
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size // 2)
    r = run_hamal("sync", str(src), store, "--disk", "d0")
    assert r.code == 0, r.err
    assert run_hamal("verify", store, "--deep").code == 0
    for v in versions(store):
        restores_to(store, v["version"], src, tmp_path / "out.raw")


# 5. An incremental names the version it is relative to.


def test_an_incremental_whose_parent_is_gone_is_refused_or_made_full(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 16 * MIB, seed=11)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    with open(src, "r+b") as f:
        f.seek(2 * MIB)
        f.write(b"\x55" * MIB)
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([[2 * MIB, MIB]]))
    r = run_hamal("sync", str(src), store, "--disk", "d0", "--changed", str(changed))
    assert r.code == 0, r.err
    v1, v2 = versions(store)
    assert f"committed version {v2['version']} on parent {v1['version']}" in r.out, r.out
    # The cursor of v2 is what the next changes are computed from; v2's record is then lost.
    with open(src, "r+b") as f:
        f.seek(5 * MIB)
        f.write(b"\x66" * MIB)
    changed.write_text(json.dumps([[5 * MIB, MIB]]))
    (store_dir / "versions" / "d0" / f"{v2['version']}.json").unlink()
    args = ("sync", str(src), store, "--disk", "d0", "--changed", str(changed), "--parent", v2["version"])
    r = run_hamal(*args)
    assert r.code == 1
    line = one_error_line(r.err)
    assert f"relative to version {v2['version']} of disk 'd0', which is not in the store" in line, line
    # The listing lacks the version this host committed last: said, and exit 3.
    r = run_hamal("versions", store, "--disk", "d0", "--json")
    assert r.code == 3 and f"{v2['version']}.json: committed by this host" in r.err, r.err
    assert [v["version"] for v in json.loads(r.out)["versions"]] == [v1["version"]], "nothing committed"
    r = run_hamal(*args, "--full-on-mismatch", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["mode"] == "full" and summary["parent"] is None
    assert v2["version"] in summary["full_reason"]
    restores_to(store, summary["version"], src, tmp_path / "out.raw")


# 6. Refusals leave nothing behind.


def test_refused_runs_create_no_store_journal_or_target(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 8 * MIB, seed=12)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    store_dir = tmp_path / "new-store"
    lib = tmp_path / "lib"
    conf = tmp_path / "hamal.conf"
    conf.write_text(f"[DEFAULT]\nhamal_lib_dir = {lib}\n")
    r = run_hamal(
        "--config",
        str(conf),
        "sync",
        str(src),
        f"dir:{store_dir}",
        "--disk",
        "d0",
        "--key-file",
        str(bad_key),
    )
    assert r.code == 1 and "expected 32 bytes or 64 hex digits" in r.err, r.err
    changed = tmp_path / "c.json"
    changed.write_text("[[0, 4096]]")
    r = run_hamal(
        "--config", str(conf), "sync", str(src), f"dir:{store_dir}", "--disk", "d0", "--changed", str(changed)
    )
    assert r.code == 1 and "has no version yet" in r.err, r.err
    assert not store_dir.exists(), "no store folder"
    assert not (lib / "snapshot_metadata").exists() and not list((lib / "journal").glob("*")), "no journal"
    # A file target: the run fails before writing (its journal cannot be made); no file is left.
    target = tmp_path / "t.raw"
    r = run_hamal("sync", str(src), str(target), "--journal", str(tmp_path / "no" / "such" / "j"))
    assert r.code == 1 and "journal" in r.err, r.err
    assert not target.exists(), "no target file"


# 7. A resumed store sync reports the whole version, with the time of its first attempt.


def test_a_resumed_store_sync_records_the_whole_versions_totals(tmp_path: Path) -> None:
    src, journal = tmp_path / "src.raw", tmp_path / "journal"
    make_image(src, 64 * MIB, seed=13, fill=1.0)
    store = f"dir:{tmp_path / 'store'}"
    started = time.time()
    p = start_sync(str(src), store, "--disk", "d0", "--journal", str(journal))
    try:
        wait_until(lambda: journal.exists() and journal.stat().st_size > 300, "journaled chunks")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        p.kill()
    time.sleep(1.1)
    r = run_hamal("sync", str(src), store, "--disk", "d0", "--journal", str(journal), "--json")
    assert r.code == 0, r.err
    resumed_chunks = json.loads(r.out)["bytes_resumed"] // (4 * MIB)
    assert resumed_chunks > 0
    (v,) = versions(store)
    stats = v["stats"]
    # Every chunk was new. Chunks the killed attempt uploaded after its last journal flush are
    # found present by the rerun and not counted; those journaled are.
    assert 16 - 3 <= stats["chunks_new"] <= 16, stats
    assert stats["chunks_new"] > 16 - resumed_chunks, "more than the last attempt uploaded"
    assert stats["bytes_read"] == 64 * MIB
    assert stats["bytes_stored"] >= stats["chunks_new"] * 4 * MIB, "random data does not compress"
    from datetime import datetime

    created = datetime.fromisoformat(v["created"].replace("Z", "+00:00")).timestamp()
    committed = datetime.fromisoformat(v["committed"].replace("Z", "+00:00")).timestamp()
    assert started - 1 <= created < committed - 1, "the version's time is when its first attempt started"


def test_syncs_and_prunes_of_other_disks_at_once_lose_nothing(tmp_path: Path) -> None:
    """Each prune's collection must keep what a sync of another disk committed while the
    prune was starting (a stale list of versions once deleted a new version's pages)."""
    import threading

    store = f"dir:{tmp_path / 'store'}"
    sources = {d: tmp_path / f"{d}.raw" for d in ("a", "b")}
    for i, src in enumerate(sources.values()):
        make_image(src, 16 * MIB, seed=40 + i, fill=1.0)
    failures: list[str] = []

    def cycles(disk: str, src: Path) -> None:
        for i in range(6):
            with open(src, "r+b") as f:
                f.seek((i % 16) * MIB)
                f.write(os.urandom(MIB))
            for args in (
                ("sync", str(src), store, "--disk", disk),
                ("prune", store, "--keep", "2", "--disk", disk),
            ):
                r = run_hamal(*args)
                if r.code != 0:
                    failures.append(r.err)

    threads = [threading.Thread(target=cycles, args=item) for item in sources.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    r = run_hamal("verify", store, "--deep")
    assert r.code == 0, r.err
    for disk, src in sources.items():
        (newest, *_) = reversed(versions(store, disk))
        restores_to(store, newest["version"], src, tmp_path / f"out-{disk}.raw", disk)
