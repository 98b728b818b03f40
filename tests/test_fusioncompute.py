"""The FusionCompute adapter end to end through hamal-period, against the fake VRM and CNA data
channel of tests/fake_fc.py (no FusionCompute here): CBT backup snapshots, paged getcbt
bitmaps, the data channel in TCP and TLS, chain breaks, faults and restores."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from certs import Ca
from conftest import MIB, sha256
from fake_fc import BLOCK, PASSWORD, FakeFc
from service_env import ServiceEnv

VM = "i-00000001"


@pytest.fixture
def fc(tmp_path: Path):
    ca = Ca(tmp_path)
    fake = FakeFc(tmp_path / "fc", ca.server("vrm"), ca.pem)
    fake.uuid = fake.add_vm(
        VM, "db", [(1, 64 * MIB, False), (2, 64 * MIB, True), (3, MIB, False)], ips=["10.0.0.7"]
    )
    fake.page_bits = 256  # a 64 MiB volume's bitmap takes 4 getcbt pages
    yield fake
    fake.stop()


def setup(tmp_path: Path, fc: FakeFc, conf: str = "", **conn: Any) -> ServiceEnv:
    env = ServiceEnv(tmp_path / "svc", extra_conf=conf)
    pw = tmp_path / "fc.pw"
    pw.write_text(PASSWORD + "\n")
    connection = {
        "vrm_url": fc.url,
        "username": "hamal",
        "password_file": str(pw),
        "ca_file": str(fc.ca),
        "timeout": 10,
        **conn,
    }
    uuid = connection.pop("uuid", fc.uuid)  # type: ignore[attr-defined]
    connection = {k: v for k, v in connection.items() if v is not None}
    env.task_file(
        "db",
        {
            "version": 1,
            "vm": {"platform": "fusioncompute", "uuid": uuid, "name": "db"},
            "connection": connection,
            "target": {"uri": env.store},
        },
    )
    return env


def disk(env: ServiceEnv) -> dict[str, Any]:
    (d,) = env.task_status("db")["disks"]
    return d


def last_summary(env: ServiceEnv) -> dict[str, Any]:
    con = sqlite3.connect(env.lib / "hamal.db")
    try:
        (detail,) = con.execute("SELECT detail FROM cycles ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return json.loads(detail)["disk1"]["summary"]


def restored(env: ServiceEnv, tmp_path: Path) -> str:
    out = tmp_path / "restored.raw"
    out.unlink(missing_ok=True)
    env.hamal("restore", env.store, str(out), "--disk", "db-disk1", "--version", disk(env)["version"])
    return sha256(out)


def frozen(fc: FakeFc) -> str:
    """The content of the volume at hamal's newest snapshot."""
    (snap,) = [s for s in fc.snapshots.values() if s.name.startswith("hamal-")]
    return sha256(snap.vols[fc.volume(VM, 1).vid][3])


def vm_log(env: ServiceEnv) -> str:
    return "".join(p.read_text() for p in env.logs.glob("vm-*.log"))


def test_cycles_of_a_fusioncompute_vm(tmp_path: Path, fc: FakeFc) -> None:
    env = setup(tmp_path, fc)
    vol = fc.volume(VM, 1)
    fc.write(vol, 0, os.urandom(3 * MIB))
    fc.write(vol, 40 * MIB, os.urandom(MIB))
    env.once()
    log = vm_log(env)
    assert "disk disk2 left out: independent" in log and "disk disk3 left out" in log
    assert "full sync: first cycle" in log
    # One VRM session for the cycle's orphan check, discovery and snapshot, ended at its
    # commit; the VM searched by uuid once, then read by its URI.
    sessions = [m for m, _, _ in fc.calls_to("/service/session")]
    assert sessions == ["POST", "DELETE"], sessions
    assert len([c for c in fc.calls_to("/vms?") if c[0] == "GET"]) == 1, "one walk of the VM list"
    s = last_summary(env)
    # Only the allocated blocks (getcbt since chgID 0) cross the channel, in the store's whole
    # 4 MiB chunks: the two chunks holding data.
    assert s["mode"] == "full" and fc.bytes_served == 8 * MIB, (s, fc.bytes_served)
    assert restored(env, tmp_path) == frozen(fc)
    assert len(fc.calls_to("/getcbt")) == 4, "the bitmap is read page by page to the volume's end"
    assert fc.resources == {}, "the data channel is released after the cycle"
    (res_body,) = [b for m, p, b in fc.calls_to("/backupresources") if m == "POST"]
    assert res_body["transMode"] == "lanssl" and res_body["ip"] == "127.0.0.1"
    mapping = json.loads((env.logs / "ip_mapping.backup").read_text())
    assert mapping[fc.uuid]["addresses"] == {"28:6e:d4:88:c6:01": ["10.0.0.7"]}  # type: ignore[attr-defined]
    first_snap = fc.snapshot_names(VM)
    # Incremental: exactly the set bits are read (the store reads whole 4 MiB chunks: one per
    # changed block here, each in a different chunk).
    fc.bytes_served = 0
    for i in range(5):
        fc.write(vol, (5 + i * 9) * MIB + 100, b"x" * 1000)
    env.once()
    s = last_summary(env)
    assert f"{5 * BLOCK} bytes changed" in vm_log(env)
    assert s["mode"] == "incremental" and fc.bytes_served == 5 * 4 * MIB, (s, fc.bytes_served)
    assert restored(env, tmp_path) == frozen(fc)
    names = fc.snapshot_names(VM)
    assert len(names) == 1 and names != first_snap, "the previous snapshot goes after the commit"
    cursor = json.loads(disk(env)["cursor"])
    assert cursor["chg_id"] == "2"
    # Nothing changed: an empty incremental, nothing read.
    fc.bytes_served = 0
    env.once()
    assert last_summary(env)["mode"] == "incremental" and fc.bytes_served == 0


def test_breaks_in_the_chain_resync_in_full_and_say_why(tmp_path: Path, fc: FakeFc) -> None:
    env = setup(tmp_path, fc, transport="lan")
    vol = fc.volume(VM, 1)
    fc.write(vol, 0, os.urandom(2 * MIB))
    env.once()
    # Another tool's CBT snapshot in between: the chgID jumps by two.
    theirs = fc.take_snapshot(VM, "nightly-backup")
    fc.write(vol, 8 * MIB, os.urandom(MIB))
    env.once()
    assert "the chgID chain is broken (1 -> 3" in vm_log(env) and last_summary(env)["mode"] == "full"
    assert restored(env, tmp_path) == frozen(fc)
    assert "nightly-backup" in fc.snapshot_names(VM), "another tool's snapshot is never touched"
    fc._drop_snapshot(theirs.sid)
    # CBT reset (a host reboot, HA, a revert).
    fc.reset_cbt(vol)
    fc.write(vol, 9 * MIB, os.urandom(MIB))
    env.once()
    assert "CBT was reset (volCBTCreateTime" in vm_log(env) and last_summary(env)["mode"] == "full"
    assert restored(env, tmp_path) == frozen(fc)
    # The volume grows: a full sync to the new size.
    fc.grow(vol, 80 * MIB)
    fc.write(vol, 70 * MIB, os.urandom(MIB))
    env.once()
    s = last_summary(env)
    assert s["mode"] == "full" and s["size"] == 80 * MIB and "the volume grew" in vm_log(env)
    assert restored(env, tmp_path) == frozen(fc)
    # The VRM cannot give the changes: a full sync, said why, not a wrong incremental.
    fc.write(vol, 3 * MIB, os.urandom(MIB))
    fc.faults["getcbt"] = "since"
    env.once()
    assert (
        "the VRM cannot give the changes since chgID" in vm_log(env) and last_summary(env)["mode"] == "full"
    )
    assert restored(env, tmp_path) == frozen(fc)
    # Not even the allocated blocks: the cycle fails, nothing is committed or left behind.
    before = disk(env)
    fc.faults["getcbt"] = True
    env.once(expect=1)
    assert disk(env)["cursor"] == before["cursor"] and len(fc.snapshot_names(VM)) == 1


def test_a_failure_mid_read_commits_nothing_and_leaves_nothing(tmp_path: Path, fc: FakeFc) -> None:
    env = setup(tmp_path, fc)
    vol = fc.volume(VM, 1)
    fc.write(vol, 0, os.urandom(8 * MIB))
    env.once()
    before = disk(env)
    held = fc.snapshot_names(VM)
    # One socket cut mid-read: read again on a new socket, the cycle succeeds.
    fc.write(vol, 20 * MIB, os.urandom(MIB))
    fc.faults["cut_reads"] = 1
    env.once()
    assert "reading again on a new socket" in vm_log(env)
    assert restored(env, tmp_path) == frozen(fc)
    before, held = disk(env), fc.snapshot_names(VM)
    # The channel keeps failing: nothing committed, the new snapshot deleted, the old one kept.
    fc.write(vol, 30 * MIB, os.urandom(MIB))
    fc.faults["cut_reads"] = 100
    env.once(expect=1)
    assert disk(env)["cursor"] == before["cursor"] and disk(env)["version"] == before["version"]
    assert fc.snapshot_names(VM) == held and fc.resources == {}
    # Data that fails its CRC is never written: read again, right.
    fc.faults = {"corrupt": 1}
    env.once()
    assert "failed its CRC-32" in vm_log(env)
    assert "chgID chain is broken" in vm_log(env), "the failed cycle's snapshot took a chgID"
    assert restored(env, tmp_path) == frozen(fc)


def test_orphans_are_removed_and_the_socket_limit_is_kept(tmp_path: Path, fc: FakeFc) -> None:
    conf = (
        "[fusion_compute]\nmax_socket_connections_per_host = 2\n[data_sync_v2]\npre_disk_readers_count = 8\n"
    )
    env = setup(tmp_path, fc, conf)
    fc.cna_limit = 2
    fc.take_snapshot(VM, "hamal-1700000000000")  # a crashed cycle's
    fc.take_snapshot(VM, "weekly", type_="normal")
    fc.write(fc.volume(VM, 1), 0, os.urandom(32 * MIB))
    env.once()
    assert "removed an orphan left by an interrupted cycle: snapshot hamal-1700000000000" in vm_log(env)
    assert "weekly" in fc.snapshot_names(VM) and "hamal-1700000000000" not in fc.snapshot_names(VM)
    assert fc.cna_peak == 2 and fc.cna_refused == 0, (fc.cna_peak, fc.cna_refused)
    assert restored(env, tmp_path) == frozen(fc)


def test_snapshot_tasks_that_fail_or_hang(tmp_path: Path, fc: FakeFc) -> None:
    env = setup(tmp_path, fc, "[fusion_compute]\ncreate_snap_task_timeout = 1\n")
    fc.faults["snapshot_task"] = "fail"
    env.once(expect=1)
    assert "task failed: snapshot failed on the storage" in env.task_status("db")["last_error"]
    assert fc.snapshot_names(VM) == [], "a snapshot whose task failed is deleted at once"
    fc.faults["snapshot_task"] = "timeout"
    env.once(expect=1)
    assert "task not done within 1 s" in env.task_status("db")["last_error"]
    assert fc.snapshot_names(VM) == [], "and one whose task hung"
    fc.faults.clear()
    env.once()
    assert len(fc.snapshot_names(VM)) == 1
    assert restored(env, tmp_path) == frozen(fc)


@pytest.mark.parametrize(
    "case, conn, expect",
    [
        ("password", {"password_file": "WRONG"}, "login as hamal refused: HTTP 401"),
        ("pinned", {"cert_sha256": ":".join(["AB"] * 32), "ca_file": None}, "is not connection.cert_sha256"),
        ("ca", {"ca_file": "OTHER"}, "certificate not trusted with ca_file"),
        ("vm", {"uuid": "no-such-vm"}, "no VM with uuid no-such-vm"),
        ("transport", {"transport": "udp"}, "connection.transport 'udp' is not lan or lanssl"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, fc: FakeFc, case: str, conn: dict, expect: str) -> None:
    if conn.get("password_file") == "WRONG":
        (tmp_path / "wrong.pw").write_text("nope\n")
        conn = {"password_file": str(tmp_path / "wrong.pw")}
    if conn.get("ca_file") == "OTHER":
        (tmp_path / "other").mkdir()
        conn = {"ca_file": str(Ca(tmp_path / "other").pem)}
    env = setup(tmp_path, fc, **conn)
    env.once(expect=1)
    err = env.task_status("db")["last_error"]
    assert expect in err and len(err.splitlines()) == 1, err
    assert PASSWORD not in env.log_text()
    assert not [n for n in fc.snapshot_names(VM) if n.startswith("hamal-")]


def test_the_vrm_verified_by_a_pinned_certificate(tmp_path: Path, fc: FakeFc) -> None:
    der = _server_der(fc)
    env = setup(tmp_path, fc, cert_sha256=hashlib.sha256(der).hexdigest())
    fc.write(fc.volume(VM, 1), 0, os.urandom(MIB))
    env.once()
    assert restored(env, tmp_path) == frozen(fc)
    assert fc.tokens and all(t not in env.log_text() for t in fc.tokens), "tokens are never logged"


def _server_der(fc: FakeFc) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(fc.cert[0].read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def test_bitmap_pages_decode_into_extents() -> None:
    from hamal import _native

    # Bits 0, 4, 5, 7 and 64-127 set, the page starting at block 10.
    bitmap = bytes([0b1011_0001]) + bytes(7) + b"\xff" * 8
    extents, ones = _native.fc_bitmap_extents(bitmap, 128, 4096, 10, 1 << 40)
    assert ones == 4 + 64
    assert extents == [(10 * 4096, 4096), (14 * 4096, 2 * 4096), (17 * 4096, 4096), (74 * 4096, 64 * 4096)]
    # Bits past bitNum are not counted; extents stop at the volume's end.
    assert _native.fc_bitmap_extents(b"\xff", 3, 4096, 0, 10_000) == ([(0, 10_000)], 3)


def test_a_busy_cna_host_is_waited_out(tmp_path: Path, fc: FakeFc) -> None:
    import socket
    import threading

    env = setup(tmp_path, fc, transport="lan")
    fc.write(fc.volume(VM, 1), 0, os.urandom(4 * MIB))
    fc.cna_limit = 1
    other = socket.create_connection(fc.cna_lan.server_address)  # another proxy holds the one socket

    def release() -> None:  # once hamal was refused, or after 30 s
        deadline = time.monotonic() + 30
        while fc.cna_refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        other.close()

    threading.Thread(target=release, daemon=True).start()
    env.once()
    assert fc.cna_refused >= 1 and "the CNA refused the channel: error 10300412" in vm_log(env)
    assert restored(env, tmp_path) == frozen(fc)


def test_an_expired_token_is_renewed_once(tmp_path: Path, fc: FakeFc) -> None:
    from types import SimpleNamespace

    from hamal.platforms.fc_api import Vrm

    (tmp_path / "pw").write_text(PASSWORD)
    conn = {
        "vrm_url": fc.url,
        "username": "hamal",
        "password_file": str(tmp_path / "pw"),
        "ca_file": str(fc.ca),
    }
    vrm = Vrm(SimpleNamespace(id="t", connection=conn))
    fc.tokens.clear()  # the VRM forgot every session
    assert vrm.find_vm(fc.uuid)["name"] == "db"  # type: ignore[attr-defined]
    logins = [c for c in fc.calls if c[:2] == ("POST", "/service/session")]
    assert len(logins) == 2


def test_a_failed_start_is_reported_even_when_its_cleanup_fails(tmp_path: Path, fc: FakeFc) -> None:
    env = setup(tmp_path, fc, transport="udp")  # refused after the snapshot was taken
    fc.faults["delete"] = True  # and the snapshot cannot be deleted then
    env.once(expect=1)
    err = env.task_status("db")["last_error"]
    assert "connection.transport 'udp' is not lan or lanssl" in err, err
    assert "cleaning up after the failed start failed too" in vm_log(env)
    assert len(fc.snapshot_names(VM)) == 1
    fc.faults.clear()
    setup(tmp_path, fc)
    env.once()  # the leftover is hamal's: removed before the new cycle
    assert "removed an orphan left by an interrupted cycle" in vm_log(env)
    assert len(fc.snapshot_names(VM)) == 1
    assert restored(env, tmp_path) == frozen(fc)
