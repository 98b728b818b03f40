"""Chunk store on a local directory through the CLI: crash and resume, prune during a sync."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEFAULT_CONF, MIB, make_image, one_error_line, run_hamal, sha256, wait_until


def start_slow_sync(src: Path, store: str, journal: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "hamal", "sync", str(src), store, "--disk", "d0", "--bwlimit", "16M"]
    args += ["--journal", str(journal), "--fsync-period", "0.2"]
    env = {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def versions(store: str) -> list[dict]:
    r = run_hamal("versions", store, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["versions"]


def test_sigkill_mid_sync_commits_nothing_and_resumes(tmp_path: Path) -> None:
    src, journal = tmp_path / "src.raw", tmp_path / "journal"
    make_image(src, 96 * MIB, seed=21, fill=1.0)
    store = f"dir:{tmp_path / 'store'}"
    p = start_slow_sync(src, store, journal)
    try:
        # Journal header is 48 bytes; a batch after it means chunks are durable in the store.
        wait_until(lambda: journal.exists() and journal.stat().st_size > 100, "journaled chunks")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        p.kill()
    assert versions(store) == [], "nothing committed for an incomplete sync"
    r = run_hamal("sync", str(src), store, "--disk", "d0", "--journal", str(journal), "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["bytes_resumed"] > 0
    assert not journal.exists(), "the journal goes at commit"
    out = tmp_path / "out.raw"
    r = run_hamal("restore", store, str(out), "--disk", "d0")
    assert r.code == 0, r.err
    assert sha256(out) == sha256(src)


def test_prune_during_a_sync_leaves_its_chunks_alone(tmp_path: Path) -> None:
    src, journal = tmp_path / "src.raw", tmp_path / "journal"
    make_image(src, 64 * MIB, seed=22, fill=1.0)
    store = f"dir:{tmp_path / 'store'}"
    small = tmp_path / "small.raw"
    make_image(small, 8 * MIB, seed=23)
    assert run_hamal("sync", str(small), store, "--disk", "other").code == 0
    p = start_slow_sync(src, store, journal)
    try:
        wait_until(lambda: journal.exists() and journal.stat().st_size > 100, "journaled chunks")
        r = run_hamal("prune", store, "--keep", "1")
        assert r.code == 0, r.err
        assert "not collected" in r.err and "busy" in r.err, r.err
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        p.kill()
    out = tmp_path / "out.raw"
    assert run_hamal("restore", store, str(out), "--disk", "d0").code == 0
    assert sha256(out) == sha256(src)
    r = run_hamal("prune", store, "--keep", "1", "--json")
    assert json.loads(r.out)["gc_skipped"] is None


def test_store_cli_errors_are_one_clear_line(tmp_path: Path, image: Path) -> None:
    store = f"dir:{tmp_path / 'store'}"
    r = run_hamal("sync", str(image), store)
    assert "needs a disk id (--disk)" in one_error_line(r.err)
    r = run_hamal("sync", str(image), store, "--disk", "a/b")
    assert "disk id 'a/b' cannot name a store folder" in one_error_line(r.err)
    r = run_hamal("restore", f"dir:{tmp_path / 'none'}", str(tmp_path / "o.raw"), "--disk", "x")
    assert "does not exist" in one_error_line(r.err)
    assert run_hamal("sync", str(image), store, "--disk", "a").code == 0
    r = run_hamal("restore", store, str(tmp_path / "o.raw"), "--disk", "b")
    assert "disk 'b' has no version" in one_error_line(r.err)
    r = run_hamal("restore", store, str(tmp_path / "o.raw"), "--disk", "a", "--version", "v9")
    assert "has no version 'v9'" in one_error_line(r.err)
    r = run_hamal("verify", store, "--version", "v9")
    assert "no version 'v9'" in one_error_line(r.err)
    r = run_hamal("verify", str(image))
    assert "verify needs SOURCE and TARGET" in one_error_line(r.err)


# One job over 8 disks into a store and back, in a process of its own; prints its peak RSS (KiB).
EIGHT_DISKS = r"""
import re, sys, hamal
from hamal import sync
store, kind, files = sys.argv[1], sys.argv[2], sys.argv[3:]
if kind == "backup":
    plan = [sync.disk(f, store, disk_id=f"d{i}") for i, f in enumerate(files)]
else:
    plan = [sync.disk(store, f, disk_id=f"d{i}") for i, f in enumerate(files)]
with sync.start(plan, hamal.load_config(), sync.SyncOptions(parallel_disks=8)) as job:
    job.wait()
assert not [r for r in job.results() if r.get("error")], job.results()
# VmHWM: this address space's peak since exec (ru_maxrss would count the forking parent's too).
print(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
"""


@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_eight_disks_into_a_store_and_back_stay_in_the_memory_budget(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Everything chunk-sized in flight (readers' buffers, objects uploading, objects being
    decoded) shares the job's memory budget (192 MiB): a job of 8 disks stays under 256 MiB
    (issue 20). Before, every disk ran 8 uploads of its own (516 MiB in tools/bench, 454 MiB
    restoring), glibc kept freed objects in its arenas (CI measured 267 MiB once), and a
    restore from S3 kept every decoded object in the pool of reusable buffers (3137 MiB)."""
    srcs = [tmp_path / f"d{i}.raw" for i in range(8)]
    for i, s in enumerate(srcs):
        make_image(s, 48 * MIB, seed=40 + i, fill=1.0)
    if backend == "s3":
        s3 = request.getfixturevalue("s3")
        store, env = s3.store, {**os.environ, **s3.env()}
    else:
        store, env = f"dir:{tmp_path / 'store'}", {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)}
    outs = [tmp_path / f"out{i}.raw" for i in range(8)]
    for kind, files in (("backup", srcs), ("restore", outs)):
        p = subprocess.run(
            [sys.executable, "-c", EIGHT_DISKS, store, kind, *map(str, files)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        peak_mib = int(p.stdout.split()[-1]) / 1024
        assert peak_mib < 256, f"{kind}: peak RSS {peak_mib:.0f} MiB"
    assert [sha256(o) for o in outs] == [sha256(s) for s in srcs]


@pytest.mark.parametrize("chunk", ["1M", "8M"])
def test_a_restore_reads_versions_of_another_chunk_size(tmp_path: Path, chunk: str) -> None:
    """A restore reads with 4 MiB chunks whatever the version's chunk size: 1 MiB chunks are
    decoded into the engine's buffer four at a time, an 8 MiB chunk is shared by two reads; a
    disk that ends inside a chunk ends the last one early."""
    src = tmp_path / "src.raw"
    make_image(src, 29 * MIB + 12288, seed=7, fill=0.8)
    with open(src, "r+b") as f:
        f.seek(29 * MIB)
        f.write(os.urandom(12288))  # data in the last, short chunk
    store = f"dir:{tmp_path / 'store'}"
    assert run_hamal("sync", str(src), store, "--disk", "d0", "--chunk-size", chunk).code == 0
    out = tmp_path / "out.raw"
    r = run_hamal("restore", store, str(out), "--disk", "d0")
    assert r.code == 0, r.err
    assert out.stat().st_size == src.stat().st_size and sha256(out) == sha256(src)


def test_a_sync_and_a_restore_read_the_newest_record_alone(tmp_path: Path) -> None:
    """An incremental builds on the newest record and a restore reads the one it restores: an
    older record, damaged here, is neither read nor in the way (`verify` and `versions` report
    it); a damaged newest record stops both, named, and nothing is committed."""
    src = tmp_path / "src.raw"
    make_image(src, 16 * MIB, seed=31, fill=0.6)
    store_dir = tmp_path / "store"
    store = f"dir:{store_dir}"
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert run_hamal("sync", str(src), store, "--disk", "d0").code == 0
    for _ in range(2):
        assert run_hamal("sync", str(src), store, "--disk", "d0", "--changed", str(empty)).code == 0
    v1, v2, v3 = (v["version"] for v in versions(store))
    records = store_dir / "versions" / "d0"
    (records / f"{v1}.json").write_text("{ damaged")

    with open(src, "r+b") as f:
        f.seek(3 * MIB)
        f.write(b"newer" * 1000)
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([[3 * MIB, 5000]]))
    r = run_hamal("sync", str(src), store, "--disk", "d0", "--changed", str(changed), "--json")
    assert r.code == 0, r.err
    v4 = json.loads(r.out)["version"]
    assert json.loads(r.out)["parent"] == v3
    out = tmp_path / "out.raw"
    r = run_hamal("restore", store, str(out), "--disk", "d0")
    assert r.code == 0, r.err
    assert sha256(out) == sha256(src)
    r = run_hamal("restore", store, str(out), "--disk", "d0", "--version", v1)
    assert r.code == 1 and f"versions/d0/{v1}.json" in one_error_line(r.err), r.err
    # A version is read by its id alone now: one that is a path names no version.
    (tmp_path / "outside.json").write_text((records / f"{v2}.json").read_text())
    r = run_hamal("restore", store, str(out), "--disk", "d0", "--version", "../../../outside")
    assert r.code == 1 and "has no version '../../../outside'" in one_error_line(r.err), r.err
    r = run_hamal("versions", store, "--json")
    assert r.code == 3 and [v["version"] for v in json.loads(r.out)["versions"]] == [v2, v3, v4], r.out
    assert run_hamal("verify", store).code == 3

    (records / f"{v4}.json").write_text("{ damaged")
    r = run_hamal("sync", str(src), store, "--disk", "d0", "--changed", str(empty))
    assert r.code == 1 and f"versions/d0/{v4}.json" in one_error_line(r.err), r.err
    assert "damaged" in r.err or "not a version record" in r.err, r.err
    r = run_hamal("restore", store, str(out), "--disk", "d0")
    assert r.code == 1 and f"versions/d0/{v4}.json" in one_error_line(r.err), r.err
    assert sorted(p.stem for p in records.iterdir()) == [v1, v2, v3, v4], "nothing committed"
