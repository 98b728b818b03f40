"""hamal-period end to end: qcow2 VMs (qemu) and an RBD image (real Ceph) kept in sync in
chunk stores (dir: and S3 on radosgw), crashes and signals, bad tasks, operator commands,
logs, health and metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from ceph_cluster import ACCESS_KEY, SECRET_KEY
from conftest import MIB, wait_until
from hamal.platforms.base import DiskInfo, selectable
from nbd_servers import qemu_io
from service_env import ServiceEnv, alive, bitmaps, image_sha, restore_sha
from test_rbd import Rbd, rbd_env  # noqa: F401 - the module's RBD fixture


@pytest.fixture
def env(tmp_path: Path) -> ServiceEnv:
    return ServiceEnv(tmp_path)


def versions(env: ServiceEnv, store: str, disk: str) -> list[str]:
    r = env.hamal("versions", store, "--disk", disk, "--json")
    return [v["version"] for v in json.loads(r.out)["versions"]]


def test_cycles_of_kvm_and_rbd_vms_into_dir_and_s3_stores(tmp_path: Path, rbd_env: Rbd, s3) -> None:  # noqa: F811
    # The S3 server's settings ([s3], and version records kept in the bucket).
    env = ServiceEnv(tmp_path / "svc", extra_conf="[s3]" + s3.conf().read_text().split("[s3]", 1)[1])
    vms = {
        vm: {
            "vda": env.qcow2(f"{vm}-vda", 64 * MIB, "write -P 0x11 0 6M", "write -P 0x12 40M 3M"),
            "vdb": env.qcow2(f"{vm}-vdb", 64 * MIB, "write -P 0x21 1M 2M"),
        }
        for vm in ("web", "db")
    }
    for vm, images in vms.items():
        env.kvm_task(vm, images, retention={"keep": 5})
    image = rbd_env.new_image(64 * MIB)
    rbd_env.io(image, f"write:0:{5 * MIB}:1", f"write:{30 * MIB}:{MIB}:2")
    env.task_file(
        "vol",
        {
            "version": 1,
            "vm": {"platform": "rbd", "uuid": "uuid-vol", "name": "vol"},
            "connection": {"conf": str(rbd_env.cluster.conf), "images": {"d0": f"rbd/{image}"}},
            "target": {"uri": s3.store},
        },
    )
    expected: dict[tuple[str, str], list[str]] = {}  # (store, disk) -> content after each cycle

    def round_() -> None:
        env.once()
        for vm, images in vms.items():
            for d, img in images.items():
                expected.setdefault((env.store, f"{vm}-{d}"), []).append(image_sha(img))
        (disk,) = env.task_status("vol")["disks"]
        snap = rbd_env.export(image, disk["cursor"])
        expected.setdefault((s3.store, "vol-d0"), []).append(hashlib.sha256(snap).hexdigest())

    round_()
    first = {t["id"]: t for t in env.status()["tasks"]}
    assert all(t["state"] == "ok" for t in first.values()), first
    # Guest-style writes between cycles.
    qemu_io(vms["web"]["vda"], "write -P 0x31 8M 1M")
    rbd_env.io(image, f"write:{12 * MIB}:{MIB}:3", f"discard:{30 * MIB}:{MIB}")
    round_()
    web = env.task_status("web")
    by_disk = {d["disk"]: d for d in web["disks"]}
    assert by_disk["vda"]["bytes_last_cycle"] == 4 * MIB, "the dirty MiB is read as its 4 MiB chunk"
    assert by_disk["vdb"]["bytes_last_cycle"] == 0, "an idle disk moves nothing"
    assert env.task_status("db")["disks"][0]["bytes_last_cycle"] == 0
    (vol,) = env.task_status("vol")["disks"]
    assert 0 < vol["bytes_last_cycle"] <= 8 * MIB, vol
    qemu_io(vms["db"]["vdb"], "write -P 0x41 60M 64k")
    round_()

    for (store, disk), digests in expected.items():
        ids = versions(env, store, disk)
        assert len(ids) == 3, (disk, ids)
        for version, want in zip(ids, digests):
            assert restore_sha(env, store, disk, version) == want, f"{disk} {version}"
    # Only the cursors stay on the platform: one bitmap per image, one snapshot of the volume.
    for images in vms.values():
        for img in images.values():
            assert len(bitmaps(img)) == 1
    snaps = [ln for ln in rbd_env.rbd("snap", "ls", f"rbd/{image}").splitlines()[1:] if ln.strip()]
    assert len(snaps) == 1, snaps
    logs = sorted(p.name for p in env.logs.iterdir())
    for name in ("hamal-period.log", "hamal-period-subprocess.log", "ip_mapping.backup"):
        assert name in logs
    assert {"vm-web-uuid-web.log", "vm-db-uuid-db.log", "vm-vol-uuid-vol.log"} <= set(logs)
    assert (env.logs / "ip_mapping.backup").read_text() == "", "no platform here reports addresses"
    text = env.log_text()
    assert SECRET_KEY not in text and ACCESS_KEY not in text


def ran(env: ServiceEnv) -> bool:
    """The loop has started (its state database exists) and loaded its tasks."""
    return (env.lib / "hamal.db").exists() and "tasks loaded" in (env.logs / "hamal-period.log").read_text()


def slow_vm(env: ServiceEnv, tid: str = "slow") -> Path:
    img = env.qcow2(tid, 64 * MIB, "write -P 0x51 0 48M")
    env.kvm_task(tid, {"vda": img}, bandwidth={"limit": "4M"})
    return img


def journals(env: ServiceEnv) -> list[Path]:
    return list((env.lib / "journal").glob("*.journal"))


def test_sigkill_of_the_loop_mid_cycle_then_restart(env: ServiceEnv) -> None:
    img = slow_vm(env)
    p = env.start()
    try:
        wait_until(lambda: journals(env) and journals(env)[0].stat().st_size > 100, "journaled chunks")
        workers = env.worker_pids()
        p.kill()
        p.wait()
    finally:
        p.kill()
    wait_until(lambda: not any(alive(w) for w in workers), "the orphaned worker stops (its pipe closed)")
    st = env.task_status("slow")
    assert st["disks"] == [], "no cursor advanced without its data"
    env.write_conf(period="interval = 2\n")
    env.task_file("slow", {**json.loads((env.root / "tasks" / "slow.json").read_text()), "bandwidth": {}})
    env.once()
    st = env.task_status("slow")
    assert st["state"] == "ok"
    (disk,) = st["disks"]
    assert restore_sha(env, env.store, "slow-vda", disk["version"]) == image_sha(img)
    assert bitmaps(img) == [disk["cursor"]], "no orphan bitmap once it settled"
    assert "interrupted" in (env.logs / "hamal-period.log").read_text()


def test_sigkill_of_one_worker_fails_only_its_vm_and_is_retried(env: ServiceEnv) -> None:
    slow_vm(env)
    quick = env.qcow2("quick", 64 * MIB, "write -P 0x61 0 1M")
    env.kvm_task("quick", {"vda": quick})
    p = env.start()
    try:
        wait_until(lambda: journals(env), "the slow cycle running")
        text = (env.logs / "hamal-period-subprocess.log").read_text()
        (pid,) = [int(ln.split("pid ")[1].split()[0]) for ln in text.splitlines() if "for task slow" in ln]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "signal 9" in str(env.task_status("slow")["last_error"]), "the failure recorded")
        wait_until(lambda: env.task_status("quick")["state"] == "ok", "the other VM's cycle, which runs on")
        wait_until(lambda: "attempt 2" in (env.logs / "hamal-period.log").read_text(), "the retry")
    finally:
        env.stop(p)
    # The killed worker's qemu-nbd export of the slow image is stopped too, not left running.
    wait_until(lambda: not exports_of(env), "no qemu-nbd left serving the test's images")


def exports_of(env: ServiceEnv) -> list[int]:
    """qemu-nbd processes serving an image of this test."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[0].endswith(b"qemu-nbd") and str(env.root).encode() in b" ".join(cmd) and alive(int(d.name)):
            found.append(int(d.name))
    return found


def test_sigterm_stops_within_10_s_and_keeps_the_journal(env: ServiceEnv) -> None:
    img = slow_vm(env)
    p = env.start()
    try:
        wait_until(lambda: journals(env) and journals(env)[0].stat().st_size > 100, "journaled chunks")
    finally:
        took = env.stop(p)
    assert took < 10, took
    assert journals(env), "the journal is kept for the next cycle"
    assert env.task_status("slow")["state"] == "cancelled"
    assert bitmaps(img) == [], "the cancelled cycle's new bitmap is released"
    assert not any(alive(w) for w in env.worker_pids())


def test_bad_tasks_a_vanished_vm_and_a_broken_target_are_reported_and_others_run(env: ServiceEnv) -> None:
    good = env.qcow2("good", 64 * MIB, "write -P 0x71 0 1M")
    env.kvm_task("good", {"vda": good})
    env.kvm_task("gone", {"vda": env.root / "img" / "missing.qcow2"})
    (env.root / "notadir").write_text("x")
    env.kvm_task("broken", {"vda": env.qcow2("b", 64 * MIB)}, target=f"dir:{env.root / 'notadir'}")
    (env.root / "tasks" / "syntax.toml").write_text("version = 1\n[vm\n")
    vm = {"platform": "kvm", "uuid": "u", "name": "n"}
    env.task_file("secret", {"version": 1, "vm": vm, "connection": {"password": "hunter22"}, "target": {}})
    env.task_file("typo", {"version": 1, "vm": vm, "targte": {"uri": env.store}})
    env.once(expect=1)
    st = env.status()
    tasks = {t["id"]: t for t in st["tasks"]}
    assert tasks["good"]["state"] == "ok"
    assert "missing.qcow2 does not exist" in tasks["gone"]["last_error"]
    assert "notadir is not a directory" in tasks["broken"]["last_error"]
    problems = {Path(p["origin"]).name: p["error"] for p in st["problems"]}
    assert "not valid TOML" in problems["syntax.toml"]
    assert "connection.password: credentials are not written in task files" in problems["secret.json"]
    assert "targte: unknown key" in problems["typo.json"]
    log = (env.logs / "hamal-period.log").read_text()
    assert log.count("syntax.toml") == 1, "a bad file is said once"
    assert "hunter22" not in env.log_text()
    text = env.hamal("status").out
    assert "problem: " in text and "last error: " in text


def test_operator_commands(env: ServiceEnv) -> None:
    img = env.qcow2("vm", 64 * MIB, "write -P 0x11 0 2M")
    env.kvm_task("vm", {"vda": img})
    env.once()
    assert env.hamal("task", "pause", "vm").out.startswith("task vm paused")
    env.once()
    assert env.task_status("vm")["state"] == "paused"
    assert len(versions(env, env.store, "vm-vda")) == 1, "a paused task does not run"
    env.hamal("task", "resume", "vm")
    env.hamal("task", "resync", "vm")
    env.once()
    last = env.task_status("vm")["last_cycle"]
    assert last["state"] == "ok"
    vm_log = (env.logs / "vm-vm-uuid-vm.log").read_text()
    assert "full resync of every disk: asked by the operator" in vm_log
    assert env.task_status("vm")["resync_asked"] is None, "asked once, done once"
    listing = env.hamal("task", "list").out
    assert listing.split()[0] == "vm"
    assert json.loads(env.hamal("task", "show", "vm").out)["id"] == "vm"
    r = env.hamal("task", "pause", "nope", expect=1)
    assert "no task 'nope'" in r.err


def test_logs_rotate_at_their_size_limit(tmp_path: Path) -> None:
    from hamal.service import logs

    conf = {
        "DEFAULT": {
            "log_dir": str(tmp_path),
            "max_logfile_size_mb": 1,
            "max_logfile_count": 3,
            "debug": False,
            "verbose": False,
        }
    }
    logs.setup_service(conf)
    logs.add_secret("s3cr3t-value")
    log = logging.getLogger("hamal.period")
    for i in range(30000):
        log.info("line %d with the secret s3cr3t-value and some padding to fill the file", i)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "hamal-period-subprocess.log",
        "hamal-period.log",
        "hamal-period.log.1",
        "hamal-period.log.2",
    ]
    assert all(p.stat().st_size <= 1 << 20 for p in tmp_path.iterdir())
    assert not any("s3cr3t-value" in p.read_text() for p in tmp_path.iterdir())
    for h in logging.getLogger("hamal").handlers:
        h.close()


def test_health_follows_the_loop_and_the_database(env: ServiceEnv) -> None:
    env.write_conf(period="interval = 1\n")
    r = env.hamal("health", expect=1)
    assert "unhealthy" in r.err
    p = env.start()
    try:
        wait_until(lambda: env.hamal("health", expect=None).code == 0, "healthy")
    finally:
        env.stop(p)
    time.sleep(3.5)
    r = env.hamal("health", expect=1)
    assert "last ticked" in r.err
    db = env.lib / "hamal.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    r = env.hamal("health", expect=1)
    assert "state database" in r.err


def test_metrics_endpoint(env: ServiceEnv) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env.write_conf(metrics=f"127.0.0.1:{port}")
    img = env.qcow2("vm", 64 * MIB, "write -P 0x11 0 2M")
    env.kvm_task("vm", {"vda": img})
    p = env.start()
    try:
        wait_until(lambda: ran(env) and env.task_status("vm")["state"] == "ok", "a cycle")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        env.stop(p)
    for name in (
        'hamal_disk_lag_seconds{disk="vda",task="vm"}',
        'hamal_disk_last_success_timestamp_seconds{disk="vda",task="vm"}',
        'hamal_disk_synced_bytes_total{disk="vda",task="vm"} 4.194304e+06',
        'hamal_cycle_duration_seconds{task="vm"}',
        'hamal_snapshots_held{task="vm"} 1.0',
        "hamal_loop_last_tick_timestamp_seconds",
    ):
        assert name in body, body


def test_the_disk_flag_rule_leaves_out_small_and_unsnapshottable_disks() -> None:
    disks = [
        DiskInfo("data", 64 * MIB),
        DiskInfo("flag", 8 * MIB),
        DiskInfo("indep", 64 * MIB, flags=["independent"]),
        DiskInfo("rdm", 64 * MIB, flags=["rdm"]),
    ]
    assert [d.id for d in selectable(disks, False, 48)] == ["data"]
    assert [d.id for d in selectable(disks, True, 48)] == ["data", "flag"]


def test_state_schema_is_versioned(tmp_path: Path) -> None:
    from hamal.service.state import SCHEMA_VERSION, State, StateError

    s = State(str(tmp_path / "hamal.db"))
    s.close()
    con = sqlite3.connect(tmp_path / "hamal.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StateError, match="newer release"):
        State(str(tmp_path / "hamal.db"))


def test_retention_prunes_every_cycle_and_collects_hourly(env: ServiceEnv) -> None:
    img = env.qcow2("vm", 64 * MIB, "write -P 0x11 0 4M", "write -P 0x12 4M 4M")
    env.kvm_task("vm", {"vda": img}, retention={"keep": 1})
    chunks = lambda: len([p for p in (env.root / "store" / "chunks").rglob("*") if p.is_file()])  # noqa: E731
    env.once()
    assert chunks() == 2
    qemu_io(img, "write -P 0x22 0 4M")  # the first chunk's old content becomes unreferenced
    env.once()
    assert len(versions(env, env.store, "vm-vda")) == 1, "old versions go every cycle"
    assert chunks() == 3, "the collection ran within the hour, so the old chunk waits"
    db = sqlite3.connect(env.lib / "hamal.db")
    db.execute("UPDATE meta SET v = '0' WHERE k LIKE 'collected:%'")
    db.commit()
    db.close()
    qemu_io(img, "write -P 0x33 0 4M")
    env.once()
    assert chunks() == 2, "an hour on, the collection removes what no version uses"
    (disk,) = env.task_status("vm")["disks"]
    assert restore_sha(env, env.store, "vm-vda", disk["version"]) == image_sha(img)


def test_the_service_finds_a_damaged_chunk_and_the_next_cycle_heals_it(tmp_path: Path) -> None:
    """A chunk with one byte flipped (same length) would be trusted by dedup until an operator
    ran verify --deep: the service's own store checks find it, and the next cycle heals it."""
    env = ServiceEnv(tmp_path, extra_conf="[store]\nverify_interval = 1\nverify_full_period = 1\n")
    img = env.qcow2("vm", 64 * MIB, "write -P 0x11 0 4M", "write -P 0x12 4M 4M")
    env.kvm_task("vm", {"vda": img})
    env.once()
    assert "store checked: 2 chunks re-read (share 1 of 1), 0 problems" in env.log_text()
    chunk = sorted(p for p in (env.root / "store" / "chunks").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    time.sleep(1.1)
    env.once()  # nothing changed in the VM: the cycle commits, then the check finds the damage
    assert "store check: 1 damaged chunks quarantined" in env.log_text()
    time.sleep(1.1)
    env.once()  # the parent uses the quarantined chunk: it is read from the image again
    assert not [p for p in (env.root / "store" / "quarantine").rglob("*") if p.is_file()], "healed"
    assert env.hamal("verify", env.store, "--deep").code == 0
    for version in versions(env, env.store, "vm-vda"):
        assert restore_sha(env, env.store, "vm-vda", version) == image_sha(img), version


def test_cycle_history_is_trimmed_per_task(tmp_path: Path) -> None:
    from hamal.service.state import State

    s = State(str(tmp_path / "hamal.db"))
    for _ in range(12):
        s.end_cycle(s.start_cycle("a", 1), "ok")
    s.end_cycle(s.start_cycle("b", 1), "ok")
    running = s.start_cycle("a", 1)
    s.trim_history(keep=5)
    kept = [r["id"] for r in s.last_cycles("a", 100)]
    assert kept == [running, 12, 11, 10, 9], kept
    assert len(s.last_cycles("b", 100)) == 1, "each task keeps its own history"
    s.close()
