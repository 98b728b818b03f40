"""The VMware adapter end to end through hamal-period: the vSphere simulator (tests/vcsim) for
the API side (CBT, snapshots, QueryChangedDiskAreas), the fake VixDiskLib (rust/fake-vddk) for
the data, reading the disk copies the simulator froze at each snapshot."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from certs import Ca
from conftest import MIB, sha256, wait_until
from fake_vddk import build_variants
from service_env import ServiceEnv
from vcsim import PASSWORD, Disk, Vcsim

VM, OLD_VM = "DC0_H0_VM0", "DC0_H0_VM1"
SYS = "vm1/sys.vmdk"


@pytest.fixture(scope="module")
def vddk_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_variants(tmp_path_factory.mktemp("vddk-libs"))["v8"]


@pytest.fixture
def vc(tmp_path: Path):
    disks = [
        Disk(2000, SYS, 64 * MIB),
        Disk(2001, "vm1/scratch.vmdk", 64 * MIB, mode="independent_persistent"),
        Disk(2002, "vm1/flag.vmdk", 1 * MIB),
    ]
    ca = Ca(tmp_path)  # a vCenter with a certificate from its own CA (VMCA)
    vms = {VM: ("vmx-13", disks), OLD_VM: ("vmx-04", [Disk(2000, "vm2/d.vmdk", 64 * MIB)])}
    sim = Vcsim(tmp_path / "ds", vms, ips={VM: ["10.0.0.5", "fe80::5"]}, tls=ca.server("vcenter"))
    sim.ca = ca.pem  # type: ignore[attr-defined]
    (tmp_path / "ds").mkdir()
    sim.start()
    yield sim
    sim.stop()


def setup(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch, **conn: Any
) -> ServiceEnv:
    uuid = conn.pop("uuid", vc.uuid(VM))
    env = ServiceEnv(tmp_path / "svc", extra_conf=f"[vmware]\nvddk_libdir = {vddk_lib}\n")
    pw = tmp_path / "vc.pw"
    pw.write_text(PASSWORD + "\n")
    connection = {
        "host": "127.0.0.1",
        "port": vc.port,
        "user": "administrator@vsphere.local",
        "password_file": str(pw),
        "thumbprint": vc.thumbprint(),
        "timeout": 20,
        **conn,
    }
    env.task_file(
        "web",
        {
            "version": 1,
            "vm": {"platform": "vmware", "uuid": uuid, "name": "web"},
            "connection": connection,
            "target": {"uri": env.store},
        },
    )
    monkeypatch.setenv("FAKE_VDDK_ROOT", str(vc.root))
    monkeypatch.setenv("FAKE_VDDK_THUMBPRINT", vc.thumbprint())
    monkeypatch.setenv("FAKE_VDDK_LOG", str(tmp_path / "vddk.log"))
    return env


def restored(env: ServiceEnv, tmp_path: Path, version: str) -> str:
    out = tmp_path / "restored.raw"
    out.unlink(missing_ok=True)
    env.hamal("restore", env.store, str(out), "--disk", "web-disk2000", "--version", version)
    return sha256(out)


def disk_state(env: ServiceEnv) -> dict[str, Any]:
    (d,) = env.task_status("web")["disks"]
    return d


def _last_detail(env: ServiceEnv) -> dict[str, Any]:
    import sqlite3

    con = sqlite3.connect(env.lib / "hamal.db")
    try:
        (detail,) = con.execute("SELECT detail FROM cycles ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return json.loads(detail)["disk2000"]["summary"]


def test_cycles_of_a_vmware_vm(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = setup(tmp_path, vc, vddk_lib, monkeypatch)
    vc.write(SYS, 0, os.urandom(3 * MIB), tracked=False)  # before CBT: the first cycle is full
    vc.write(SYS, 40 * MIB, os.urandom(MIB), tracked=False)
    env.once()
    log = _vm_log(env)
    assert "changed block tracking was off: enabling it" in log
    assert "disk disk2001 left out: independent" in log and "disk disk2002 left out" in log
    first = disk_state(env)
    s = _last_detail(env)
    # Only the allocated areas are read (VDDK's QueryAllocatedBlocks, here in 4 MiB chunks).
    assert s["mode"] == "full" and 4 * MIB <= s["bytes_written"] <= 8 * MIB, s
    assert restored(env, tmp_path, first["version"]) == sha256(vc.root / SYS)
    assert vc.snapshots(VM) == [], "the cycle's snapshot is removed"
    mapping = json.loads((env.logs / "ip_mapping.backup").read_text())
    assert mapping[vc.uuid(VM)]["addresses"] == {"00:50:56:aa:bb:01": ["10.0.0.5", "fe80::5"]}
    # Changes in more areas than one QueryChangedDiskAreas answer holds (4 here).
    for i in range(9):
        vc.write(SYS, (5 + i * 5) * MIB + 4096 * i, os.urandom(8192))
    env.once()
    s = _last_detail(env)
    assert f"incremental from {json.dumps(json.loads(first['cursor']), sort_keys=True)}" in _vm_log(env)
    assert f"{9 * 8192} bytes changed" in _vm_log(env)  # exactly the areas vSphere reported
    # The store reads and writes whole 4 MiB chunks: one per changed area here.
    assert s["mode"] == "incremental" and s["bytes_written"] == 9 * 4 * MIB, s
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
    assert json.loads(disk_state(env)["cursor"])["change_id"].endswith("/9")
    # CBT reset (the changeId's uuid part changed): a full resync, said why.
    vc.write(SYS, MIB, b"x" * 4096, tracked=False)
    vc.reset_cbt(SYS, "52 00 00 02")
    env.once()
    assert _last_detail(env)["mode"] == "full"
    assert "CBT was reset" in _vm_log(env)
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
    # The disk grows: a full sync to the grown size.
    vc.grow(VM, 2000, 80 * MIB)
    vc.write(SYS, 70 * MIB, os.urandom(MIB))
    env.once()
    s = _last_detail(env)
    assert s["mode"] == "full" and s["size"] == 80 * MIB and "grew" in _vm_log(env)
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
    # A VDDK read failure mid-cycle: nothing committed, snapshot removed, cursor kept; the next
    # cycle covers the changes.
    before = disk_state(env)
    vc.write(SYS, 10 * MIB, os.urandom(2 * MIB))
    monkeypatch.setenv("FAKE_VDDK_FAIL", f"read:{(10 * MIB + MIB) // 512}")
    env.once(expect=1)
    assert disk_state(env)["cursor"] == before["cursor"] and vc.snapshots(VM) == []
    monkeypatch.delenv("FAKE_VDDK_FAIL")
    env.once()
    assert _last_detail(env)["mode"] == "incremental"
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)


def _vm_log(env: ServiceEnv) -> str:
    return "".join(p.read_text() for p in env.logs.glob("vm-*.log"))


def test_an_orphan_snapshot_of_a_killed_service_is_removed(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = setup(tmp_path, vc, vddk_lib, monkeypatch)
    vc.write(SYS, 0, os.urandom(8 * MIB), tracked=False)
    task = json.loads((env.root / "tasks" / "web.json").read_text())
    env.task_file("web", task | {"bandwidth": {"limit": "1M"}})
    p = env.start()
    try:
        wait_until(lambda: vc.snapshots(VM) != [], "the cycle's snapshot", 60)
        time.sleep(1)
        text = (env.logs / "hamal-period-subprocess.log").read_text()
        (worker,) = [int(ln.split("pid ")[1].split()[0]) for ln in text.splitlines() if "for task web" in ln]
        os.kill(worker, signal.SIGKILL)  # the worker first: no cleanup of its own
    finally:
        p.kill()
        p.wait()
    assert len(vc.snapshots(VM)) == 1
    env.task_file("web", task)
    env.once()
    assert vc.snapshots(VM) == []
    assert "closed the VDDK access window an interrupted cycle left open" in _vm_log(env)
    assert _vddk_calls(tmp_path).count("EndAccess") == 2  # the orphan's, then the cycle's own
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)


@pytest.mark.parametrize(
    "case, conn, expect",
    [
        ("password", {"password_file": "WRONG"}, "login as administrator@vsphere.local refused"),
        ("thumbprint", {"thumbprint": ":".join(["AB"] * 20)}, "does not match connection.thumbprint"),
        ("vm", {"uuid": "no-such-vm"}, "no VM with instance or BIOS UUID"),
        ("hardware", {"uuid": OLD_VM}, "too old for changed block tracking"),
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path,
    vc: Vcsim,
    vddk_lib: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    conn: dict,
    expect: str,
) -> None:
    if conn.get("password_file") == "WRONG":
        wrong = tmp_path / "wrong.pw"
        wrong.write_text("not-the-password\n")
        conn = {"password_file": str(wrong)}
    if conn.get("uuid") == OLD_VM:
        conn = {"uuid": vc.uuid(OLD_VM)}
    env = setup(tmp_path, vc, vddk_lib, monkeypatch, **conn)
    env.once(expect=1)
    err = env.task_status("web")["last_error"]
    assert expect in err and len(err.splitlines()) == 1, err
    assert PASSWORD not in env.log_text()


def test_a_vm_with_too_many_snapshots_is_reported_and_others_snapshots_kept(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = setup(tmp_path, vc, vddk_lib, monkeypatch)
    theirs = [f"backup-{i}" for i in range(31)]
    vc.take_snapshots(VM, theirs)
    env.once(expect=1)
    assert "holds 31 snapshots" in env.task_status("web")["last_error"]
    assert vc.snapshots(VM) == theirs, "another tool's snapshots are never touched"


def test_the_server_verified_by_its_ca_instead_of_a_thumbprint(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = setup(tmp_path, vc, vddk_lib, monkeypatch, ca_file=str(vc.ca))  # type: ignore[attr-defined]
    task = json.loads((env.root / "tasks" / "web.json").read_text())
    del task["connection"]["thumbprint"]
    env.task_file("web", task)
    vc.write(SYS, 0, os.urandom(MIB), tracked=False)
    env.once()
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
    # A CA that did not sign the server's certificate is refused in one line.
    (tmp_path / "other-ca").mkdir()
    other = Ca(tmp_path / "other-ca")
    task["connection"]["ca_file"] = str(other.pem)
    env.task_file("web", task)
    env.once(expect=1)
    err = env.task_status("web")["last_error"]
    assert "certificate verify failed" in err and len(err.splitlines()) == 1, err


def test_an_expired_session_is_renewed_once(tmp_path: Path, vc: Vcsim) -> None:
    from types import SimpleNamespace

    from hamal.platforms.vsphere import Session

    pw = tmp_path / "vc.pw"
    pw.write_text(PASSWORD)
    conn = {"host": "127.0.0.1", "port": vc.port, "user": "administrator@vsphere.local",
            "password_file": str(pw), "thumbprint": vc.thumbprint()}  # fmt: skip
    s = Session(SimpleNamespace(id="t", connection=conn))
    vm = s.find_vm(vc.uuid(VM))
    key = s.si.content.sessionManager.currentSession.key
    admin = vc._connect()
    admin.content.sessionManager.TerminateSession([key])  # as vCenter does when a session expires
    assert s.props(vm, "name")["name"] == VM  # renewed, once
    assert s.si.content.sessionManager.currentSession.key != key
    s.logout()


def _vddk_calls(tmp_path: Path) -> list[str]:
    return [ln.split(" ", 2)[1] for ln in (tmp_path / "vddk.log").read_text().splitlines()]


def test_reads_happen_inside_one_vddk_access_window_per_cycle(
    tmp_path: Path, vc: Vcsim, vddk_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = setup(tmp_path, vc, vddk_lib, monkeypatch)
    vc.write(SYS, 0, os.urandom(8 * MIB), tracked=False)
    env.once()
    calls = _vddk_calls(tmp_path)
    # One PrepareForAccess before the first disk is opened, one EndAccess after the last read,
    # however many reader processes there were (vCenter: the simulator is one).
    assert calls.count("PrepareForAccess") == 1 and calls.count("EndAccess") == 1, calls
    assert calls.index("PrepareForAccess") < calls.index("Open")
    assert max(i for i, c in enumerate(calls) if c in ("Read", "ReadAsync")) < calls.index("EndAccess")
    text = (tmp_path / "vddk.log").read_text()
    assert re.search(r"PrepareForAccess vm=moref=vm-\d+ identity=hamal", text), text
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
    # A library that refuses the window: said, and the sync goes on.
    (tmp_path / "vddk.log").unlink()
    monkeypatch.setenv("FAKE_VDDK_FAIL", "access")
    vc.write(SYS, 0, os.urandom(MIB))
    env.once()
    assert "VDDK PrepareForAccess failed (the sync goes on" in _vm_log(env)
    assert restored(env, tmp_path, disk_state(env)["version"]) == sha256(vc.root / SYS)
