"""The OpenStack adapter end to end through hamal-period, against real Keystone and Cinder (RBD
driver) on the tests' Ceph, with Nova faked (tests/openstack_cloud.py, tests/fake_nova.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ceph_cluster import CephCluster
from conftest import MIB, sha256, wait_until
from fake_nova import FakeNova
from openstack_cloud import ADMIN_PASSWORD, POOL, OpenStack, missing_programs
from service_env import ServiceEnv
from test_rbd import RBD_IO, SYSTEM_PYTHON

GIB = 1 << 30


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenStack, FakeNova]]:
    missing = missing_programs()
    if missing:
        pytest.skip(f"OpenStack is not installed (missing {', '.join(missing)}); tools/test installs it")
    root = tmp_path_factory.mktemp("openstack")
    ceph = CephCluster(root / "ceph", rgw=False, mgr=True)
    os_ = None
    nova = None
    try:
        ceph.start()
        os_ = OpenStack(root / "os", ceph).start()
        nova = FakeNova(os_)
        os_.register_service("compute", nova.url)
        yield os_, nova
    finally:
        if nova:
            nova.stop()
        if os_:
            os_.stop()
        ceph.stop()


def server_with_volumes(os_: OpenStack, nova: FakeNova, n: int = 2) -> tuple[str, list[str]]:
    sid = str(uuid.uuid4())
    nova.add_server(sid, f"web-{sid[:4]}", {"private": ["10.1.0.7"]})
    vids = [os_.create_volume(f"v{i}-{sid[:4]}") for i in range(n)]
    for v in vids:
        os_.attach(v, sid)
    return sid, vids


def write(os_: OpenStack, vid: str, *ops: str) -> None:
    r = subprocess.run(
        [SYSTEM_PYTHON, RBD_IO, str(os_.ceph.conf), POOL, f"volume-{vid}", *ops], capture_output=True
    )
    assert r.returncode == 0, r.stderr


def rbd(os_: OpenStack, *args: str) -> str:
    r = subprocess.run(["rbd", "--conf", str(os_.ceph.conf), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def snaps(os_: OpenStack, vid: str) -> list[str]:
    out = json.loads(rbd(os_, "snap", "ls", "--format", "json", f"{POOL}/volume-{vid}"))
    return [s["name"] for s in out]


def export(os_: OpenStack, tmp: Path, vid: str, snap: str) -> str:
    out = tmp / f"export-{vid}.raw"
    out.unlink(missing_ok=True)
    rbd(os_, "export", "--no-progress", f"{POOL}/volume-{vid}@{snap}", str(out))
    return sha256(out)


def restored(env: ServiceEnv, tmp: Path, disk: str, version: str) -> str:
    out = tmp / "restored.raw"
    out.unlink(missing_ok=True)
    env.hamal("restore", env.store, str(out), "--disk", disk, "--version", version)
    return sha256(out)


def service(tmp_path: Path, os_: OpenStack, sid: str, mode: str, password: str, **extra: Any) -> ServiceEnv:
    """A service home with one task: the server ``sid``, logging in with ``password``."""
    env = ServiceEnv(tmp_path / "svc")
    pw = tmp_path / "os.pw"
    pw.write_text(password + "\n")
    env.task_file(
        "srv",
        {
            "version": 1,
            "vm": {"platform": "openstack", "uuid": sid, "name": "srv"},
            "connection": {
                "auth_url": os_.keystone,
                "username": "admin",
                "password_file": str(pw),
                "project_name": "admin",
                "region": "RegionOne",
                "snapshot_mode": mode,
                "ceph_conf": str(os_.ceph.conf),
                **extra,
            },
            "target": {"uri": env.store},
        },
    )
    return env


def disks(env: ServiceEnv) -> dict[str, Any]:
    return {d["disk"]: d for d in env.task_status("srv")["disks"]}


def last_detail(env: ServiceEnv) -> dict[str, Any]:
    import sqlite3

    con = sqlite3.connect(env.lib / "hamal.db")
    try:
        (detail,) = con.execute("SELECT detail FROM cycles ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return {k: v["summary"] for k, v in json.loads(detail).items() if "summary" in v}


@pytest.mark.parametrize("mode", ["cinder", "rbd"])
def test_cycles_of_an_openstack_server(tmp_path: Path, cloud: tuple[OpenStack, FakeNova], mode: str) -> None:
    os_, nova = cloud
    sid, (busy, idle) = server_with_volumes(os_, nova)
    write(os_, busy, f"write:0:{4 * MIB}:1", f"write:{200 * MIB}:{MIB}:2")
    write(os_, idle, f"write:{8 * MIB}:{MIB}:3")
    env = service(tmp_path, os_, sid, mode, ADMIN_PASSWORD)
    env.once()
    first = disks(env)
    assert set(first) == {busy, idle}
    for vid in (busy, idle):
        cur = json.loads(first[vid]["cursor"])
        assert snaps(os_, vid) == [cur["snap"]], "only the current snapshot is kept"
        if mode == "cinder":
            assert cur["snap"] == f"snapshot-{cur['cinder_snapshot']}"
        assert restored(env, tmp_path, f"srv-{vid}", first[vid]["version"]) == export(
            os_, tmp_path, vid, cur["snap"]
        )
    mapping = json.loads((env.logs / "ip_mapping.backup").read_text())
    assert mapping[sid]["addresses"] == {"private": ["10.1.0.7"]}
    # Changes on one volume: an incremental moving about what changed.
    write(os_, busy, f"write:{100 * MIB}:{MIB}:4", f"write:{300 * MIB}:{64 * 1024}:5")
    env.once()
    s = last_detail(env)
    assert s[busy]["mode"] == "incremental" and s[busy]["bytes_written"] <= 2 * 4 * MIB, s[busy]
    assert s[idle]["mode"] == "incremental" and s[idle]["bytes_written"] == 0, s[idle]
    second = disks(env)
    cur = json.loads(second[busy]["cursor"])
    assert snaps(os_, busy) == [cur["snap"]], "the previous snapshot is gone"
    assert restored(env, tmp_path, f"srv-{busy}", second[busy]["version"]) == export(
        os_, tmp_path, busy, cur["snap"]
    )
    # The base snapshot deleted behind hamal's back: a full resync, said why.
    if mode == "cinder":
        os_.volumes_api("DELETE", f"snapshots/{cur['cinder_snapshot']}")
        os_.wait_gone(cur["cinder_snapshot"])
    else:
        rbd(os_, "snap", "rm", f"{POOL}/volume-{busy}@{cur['snap']}")
    env.once()
    assert last_detail(env)[busy]["mode"] == "full"
    assert "base snapshot" in "".join(p.read_text() for p in env.logs.glob("vm-*.log"))
    # The volume extended: a full sync to the grown size.
    os_.extend(busy, 2)
    write(os_, busy, f"write:{GIB + 10 * MIB}:{MIB}:6")
    env.once()
    s = last_detail(env)
    assert s[busy]["mode"] == "full" and s[busy]["size"] == 2 * GIB
    cur = json.loads(disks(env)[busy]["cursor"])
    assert restored(env, tmp_path, f"srv-{busy}", disks(env)[busy]["version"]) == export(
        os_, tmp_path, busy, cur["snap"]
    )
    if mode == "cinder":
        names = sorted(s["name"] for s in os_.volumes_api("GET", f"snapshots?volume_id={busy}")["snapshots"])
        assert len(names) == 1 and names[0].startswith("hamal-"), names


def test_a_wrong_password_is_one_clear_line(tmp_path: Path, cloud: tuple[OpenStack, FakeNova]) -> None:
    os_, nova = cloud
    sid, _ = server_with_volumes(os_, nova, 1)
    env = service(tmp_path, os_, sid, "cinder", "not-the-password")
    env.once(expect=1)
    err = env.task_status("srv")["last_error"]
    assert "authentication of admin refused" in err and len(err.splitlines()) == 1, err
    assert "not-the-password" not in env.log_text()


def test_a_cinder_outage_commits_nothing_or_leaves_no_orphan(
    tmp_path: Path, cloud: tuple[OpenStack, FakeNova]
) -> None:
    os_, nova = cloud
    sid, (vid,) = server_with_volumes(os_, nova, 1)
    write(os_, vid, f"write:0:{8 * MIB}:7")
    env = service(tmp_path, os_, sid, "cinder", ADMIN_PASSWORD)
    env.once()
    # Cinder's API down as a cycle starts: it fails in one line, commits nothing, leaves nothing.
    before = disks(env)[vid]
    os_.stop_service("cinder-api")
    try:
        env.once(expect=1)
    finally:
        os_.start_service("cinder-api")
    now = disks(env)[vid]
    assert (now["cursor"], now["version"]) == (before["cursor"], before["version"])
    assert snaps(os_, vid) == [json.loads(before["cursor"])["snap"]]
    assert len(env.task_status("srv")["last_error"].splitlines()) == 1
    # A slow sync, and Cinder's API gone while it runs: the previous snapshot cannot be deleted.
    task = json.loads((env.root / "tasks" / "srv.json").read_text())
    env.task_file("srv", task | {"bandwidth": {"limit": "2M"}})
    write(os_, vid, f"write:{16 * MIB}:{8 * MIB}:8")
    p = env.start()
    try:
        wait_until(lambda: len(snaps(os_, vid)) == 2, "the cycle's snapshot", 60)
        os_.stop_service("cinder-api")
        wait_until(lambda: env.task_status("srv")["state"] == "failed", "the cycle failing", 120)
    finally:
        env.stop(p)
        os_.start_service("cinder-api")
    # One line naming the Cinder call that failed, whatever the socket saw: an HTTP error, the
    # connection refused, or reset while cinder-api was going down.
    err = env.task_status("srv")["last_error"]
    assert len(err.splitlines()) == 1 and f" {os_.cinder}/" in err, err
    env.task_file("srv", task)
    env.once()
    after = disks(env)[vid]
    cur = json.loads(after["cursor"])
    assert snaps(os_, vid) == [cur["snap"]], "no orphan snapshot once it settled"
    listed = os_.volumes_api("GET", f"snapshots?volume_id={vid}")["snapshots"]
    assert [x["id"] for x in listed] == [cur["cinder_snapshot"]]
    assert restored(env, tmp_path, f"srv-{vid}", after["version"]) == export(os_, tmp_path, vid, cur["snap"])


def test_a_boot_from_image_root_disk_and_a_detached_volume(
    tmp_path: Path, cloud: tuple[OpenStack, FakeNova]
) -> None:
    os_, nova = cloud
    sid, (vid,) = server_with_volumes(os_, nova, 1)
    os_.ceph.create_rbd_pool("vms")
    root = f"{sid}_disk"  # what Nova makes in its images_rbd_pool for a boot-from-image server
    rbd(os_, "create", "--size", "256M", f"vms/{root}")
    r = subprocess.run([SYSTEM_PYTHON, RBD_IO, str(os_.ceph.conf), "vms", root, f"write:0:{2 * MIB}:9"])
    assert r.returncode == 0
    write(os_, vid, f"write:0:{MIB}:10")
    env = service(tmp_path, os_, sid, "cinder", ADMIN_PASSWORD, images_rbd_pool="vms")
    env.once()
    d = disks(env)
    assert set(d) == {vid, "root"}
    snap = json.loads(d["root"]["cursor"])["snap"]
    out = tmp_path / "root.raw"
    rbd(os_, "export", "--no-progress", f"vms/{root}@{snap}", str(out))
    assert restored(env, tmp_path, "srv-root", d["root"]["version"]) == sha256(out)
    # The volume detached from the server: said, and its cursor kept for when it comes back.
    os_.detach(vid)
    env.once()
    assert "is no longer attached to server" in "".join(p.read_text() for p in env.logs.glob("vm-*.log"))
    assert disks(env)[vid]["cursor"] == d[vid]["cursor"]


def test_an_osd_that_stops_answering_fails_the_cycle_within_the_timeout_and_it_is_retried(
    tmp_path: Path, cloud: tuple[OpenStack, FakeNova]
) -> None:
    os_, nova = cloud
    sid, (vid,) = server_with_volumes(os_, nova, 1)
    write(os_, vid, f"write:0:{16 * MIB}:11")
    env = service(tmp_path, os_, sid, "rbd", ADMIN_PASSWORD, ceph_timeout=5)
    task = json.loads((env.root / "tasks" / "srv.json").read_text())
    env.task_file("srv", task | {"bandwidth": {"limit": "4M"}})
    osd = os_.ceph.pid_of("osd.0")
    p = env.start()
    try:
        wait_until(lambda: len(snaps(os_, vid)) == 1, "the cycle's snapshot", 60)
        time.sleep(1)
        os.kill(osd, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_until(lambda: "attempt 2" in (env.logs / "hamal-period.log").read_text(), "the failure", 60)
            took = time.monotonic() - stopped
        finally:
            os.kill(osd, signal.SIGCONT)
        assert took < 40, f"the stopped OSD failed the cycle only after {took:.0f} s"
        log = env.logs / "hamal-period.log"
        wait_until(lambda: " ok in " in log.read_text().split("attempt 2 in")[-1], "the retried cycle", 180)
    finally:
        env.stop(p)
    d = disks(env)[vid]
    cur = json.loads(d["cursor"])
    assert restored(env, tmp_path, f"srv-{vid}", d["version"]) == export(os_, tmp_path, vid, cur["snap"])


def _flaky_cinder(calls: list[str], made_anyway: bool):
    """A Cinder whose first snapshot request fails with 500 (having made it, or not)."""
    from hamal.platforms import openstack_api

    def cinder(method: str, path: str, body=None, micro: str = "3.44"):
        calls.append(f"{method} {path}")
        if method == "POST" and calls.count("POST snapshots") == 1:
            raise openstack_api.OpenStackError("POST snapshots: HTTP 500: erred", 500)
        if method == "GET":
            return {"snapshots": [{"id": "s-made", "name": "hamal-1"}] if made_anyway else []}
        return {"snapshot": {"id": "s-new"}}

    return cinder


def test_a_server_error_on_a_snapshot_request_is_asked_again_without_a_second_snapshot(monkeypatch) -> None:
    """Cinder answered a snapshot request with 500 once here (a real Cinder, under load): that
    costs a retry, not the cycle; and where the snapshot was made despite the error, it is used."""
    from hamal.platforms import openstack_api

    monkeypatch.setattr(openstack_api.time, "sleep", lambda s: None)
    for made_anyway in (False, True):
        calls: list[str] = []
        cloud = openstack_api.Cloud.__new__(openstack_api.Cloud)
        monkeypatch.setattr(cloud, "cinder", _flaky_cinder(calls, made_anyway), raising=False)
        got = cloud.create_snapshot("v1", "hamal-1")
        assert got == ("s-made" if made_anyway else "s-new"), calls
        assert calls.count("POST snapshots") == (1 if made_anyway else 2), calls
