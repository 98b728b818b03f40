"""The control plane client against a fake Mass (tests/fake_mass.py) that validates every request
against docs/mass-api.yaml: registration, heartbeats, tasks, progress, results, commands, and
the faults (Mass down, 500s, slow answers, a wrong pinned key, a rejected auth_key, a bad task)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MIB, wait_until
from fake_mass import FakeMass
from hamal.platforms.kvm import bitmaps
from service_env import ServiceEnv

SECRET_PW = "Mass-VM-Password-7c1e"


@pytest.fixture
def mass(tmp_path: Path):
    m = FakeMass(tmp_path / "mass").start()
    yield m
    m.stop()
    assert not m.violations, "requests or answers outside the contract:\n" + "\n".join(m.violations)


def env_for(tmp_path: Path, mass: FakeMass, **over: Any) -> ServiceEnv:
    over = {"allowed_target_roots": tmp_path / "svc" / "store", **over}
    env = ServiceEnv(tmp_path / "svc", extra_conf=mass.conf(**over))
    env.write_conf(period="interval = 2\ncycle_retry_delay = 1\ntask_update_wait_time = 1\n")
    return env


def kvm_spec(env: ServiceEnv, tid: str, *writes: str, **extra: Any) -> dict[str, Any]:
    img = env.qcow2(tid, 64 * MIB, *writes)
    return {
        "version": 1,
        "id": tid,
        "vm": {"platform": "kvm", "uuid": f"uuid-{tid}", "name": tid},
        "connection": {"images": {"vda": str(img)}},
        "target": {"uri": env.store},
        **extra,
    }


def task_state(env: ServiceEnv, tid: str) -> str | None:
    """The task's state, or None while the service has not stored it yet."""
    if not (env.lib / "hamal.db").exists():
        return None
    r = env.hamal("status", "--json", expect=None)
    found = [t["state"] for t in json.loads(r.out)["tasks"] if t["id"] == tid] if r.code == 0 else []
    return found[0] if found else None


def everything_printed(env: ServiceEnv, *outputs: str) -> str:
    return env.log_text() + "".join(outputs) + env.hamal("status").out + env.hamal("status", "--json").out


def test_mass_drives_the_service(tmp_path: Path, mass: FakeMass) -> None:
    env = env_for(tmp_path, mass)
    slow = kvm_spec(env, "vm-a", "write -P 1 0 8M", bandwidth={"limit": "4M"}, schedule={"interval": 3600})
    slow["connection"]["password"] = SECRET_PW  # inline credentials may come from Mass
    fast = kvm_spec(env, "vm-b", "write -P 2 1M 2M", schedule={"interval": 3600})
    bad = {"version": 1, "id": "vm-bad", "vm": {"platform": "hyper-v", "uuid": "u", "name": "x"}}
    mass.set_tasks([slow, fast, bad])
    p = env.start()
    try:
        wait_until(lambda: mass.results_of("vm-a") and mass.results_of("vm-b"), "both first results", 90)
        # Registration: what the proxy is, and the address Mass saw it come from.
        info = mass.registrations[0]
        assert info["public_addresses"] == ["127.0.0.1"]
        assert {"kvm", "rbd"} <= set(info["capabilities"]["platforms"])
        assert json.loads((env.lib / "hamal_info").read_text())["public_addresses"] == ["127.0.0.1"]
        wait_until(lambda: mass.heartbeats, "a heartbeat")
        # The bad task is reported back, naming its key; the others ran.
        (rej,) = mass.rejections
        assert rej["index"] == 2 and rej["task_id"] == "vm-bad" and "vm.platform" in rej["error"]
        # Progress of the throttled VM, per disk, with bytes done and total.
        prog = [m for m in mass.progress if m["task_id"] == "vm-a" and m["disks"]]
        assert prog, mass.progress
        assert prog[-1]["disks"][0]["disk"] == "vda" and prog[-1]["disks"][0]["bytes_total"] > 0
        # At most one progress message per task per task_update_wait_time (1 s).
        took = mass.results_of("vm-a")[0]["seconds"]
        assert len([m for m in mass.progress if m["task_id"] == "vm-a"]) <= took / 1 + 1, mass.progress
        # Results match what the service committed (the target's versions).
        for tid in ("vm-a", "vm-b"):
            (res,) = mass.results_of(tid)
            assert res["state"] == "ok", res
            (disk,) = res["disks"]
            (mine,) = env.task_status(tid)["disks"]
            assert disk["version"] == mine["version"] and disk["cursor"] == mine["cursor"]
            stored = json.loads(env.hamal("versions", env.store, "--disk", f"{tid}-vda", "--json").out)
            assert [v["version"] for v in stored["versions"]] == [disk["version"]]
        assert mass.results_of("vm-a")[0]["bytes"] == 8 * MIB
        # Commands: pause A, run B now with a full resync.
        mass.command("c1", "vm-a", "pause")
        mass.command("c2", "vm-b", "resync", "target replaced")
        mass.command("c3", "vm-b", "sync_now")
        mass.command("c4", "nope", "pause")
        wait_until(lambda: len(mass.results_of("vm-b")) == 2, "vm-b's second cycle", 60)
        second = mass.results_of("vm-b")[1]["disks"][0]
        assert second["mode"] == "full" and second["state"] == "done"
        acks = {a["command_id"]: a for a in mass.acks}
        assert {k: acks[k]["state"] for k in ("c1", "c2", "c3", "c4")} == {
            "c1": "done",
            "c2": "done",
            "c3": "done",
            "c4": "rejected",
        }
        assert env.task_status("vm-a")["state"] == "paused"
        assert len(mass.results_of("vm-a")) == 1
        # Delete B: its bitmaps on the VM's image go, and the proxy forgets it.
        image_b = fast["connection"]["images"]["vda"]
        assert bitmaps(image_b)
        mass.set_tasks([slow, bad])
        mass.command("c5", "vm-b", "delete")
        wait_until(lambda: any(a["command_id"] == "c5" for a in mass.acks), "the delete's ack", 60)
        assert [a["state"] for a in mass.acks if a["command_id"] == "c5"] == ["done"]
        assert bitmaps(image_b) == {}
        assert [t["id"] for t in env.status()["tasks"]] == ["vm-a"]
        assert env.status()["control_plane"]["state"] == "up"
    finally:
        env.stop(p)
    out, err = p.communicate()
    text = everything_printed(env, out, err)
    assert mass.auth_key not in text and SECRET_PW not in text
    # The credentials are kept in the state database only, which only its owner reads.
    for f in env.lib.glob("hamal.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_tasks_from_mass_write_only_inside_the_allowed_roots(tmp_path: Path, mass: FakeMass) -> None:
    """Mass could make hamal write anywhere: a target outside the folders, '..', a symbolic link
    out, a disk name with '/' in it, an existing file that is not the task's. None of it writes."""
    env = env_for(tmp_path, mass)
    root = tmp_path / "svc" / "store"
    (root / "files").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path / "via-link")
    kept = root / "files" / "vda.raw"
    kept.write_bytes(b"\xee" * (64 * MIB))  # someone's file, in the allowed folder
    tasks = {
        "outside": {"uri": f"dir:{tmp_path / 'outside'}"},
        "dots": {"uri": f"dir:{root}/../../dots"},
        "link": {"uri": f"dir:{root}/link"},
        "exists": {"uri": f"{root}/files/{{disk}}.raw"},
    }
    specs = [kvm_spec(env, tid, "write -P 1 0 1M", target=target) for tid, target in tasks.items()]
    evil = kvm_spec(env, "disk-name", "write -P 1 0 1M", target={"uri": f"{root}/files/{{disk}}"})
    evil["connection"]["images"] = {"../../../escaped": evil["connection"]["images"]["vda"]}
    # An image whose backing file is a host file: its content must not reach the store.
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret " * 4096)
    overlay = tmp_path / "svc" / "img" / "overlay.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(overlay)]
    subprocess.run(create, check=True)
    backed = kvm_spec(env, "backed", "write -P 3 0 1M")
    backed["connection"]["images"] = {"vda": str(overlay)}
    good = kvm_spec(env, "good", "write -P 2 0 1M")
    mass.set_tasks([*specs, evil, backed, good])
    p = env.start()
    try:
        wait_until(lambda: mass.results_of("good"), "the good task's result", 90)
        wait_until(lambda: len(mass.rejections) >= 4, "four rejections", 30)
        wait_until(lambda: mass.results_of("exists"), "the existing file's cycle", 60)
        wait_until(lambda: mass.results_of("backed"), "the backed image's cycle", 60)
    finally:
        env.stop(p)
    (refused, *_) = mass.results_of("backed")
    assert refused["state"] == "failed" and "outside its folder" in refused["error"], refused
    why = {r["task_id"]: r["error"] for r in mass.rejections}
    for tid in ("outside", "dots", "link"):
        assert "allowed_target_roots" in why[tid] or "'..'" in why[tid], why
    assert "not a safe disk name" in why["disk-name"], why
    (failed, *_) = mass.results_of("exists")
    assert failed["state"] == "failed" and "never written" in failed["error"], failed
    assert mass.results_of("good")[0]["state"] == "ok"
    assert kept.read_bytes() == b"\xee" * (64 * MIB)
    for escaped in (tmp_path / "outside", tmp_path / "dots", tmp_path / "via-link", tmp_path / "escaped"):
        assert not escaped.exists(), escaped
    assert not list(tmp_path.glob("**/escaped*")), "a disk name escaped its folder"


def test_a_hostile_mass_is_bounded(tmp_path: Path, mass: FakeMass) -> None:
    """A Mass that forgets the proxy after every registration, answers with more than hamal
    reads, or sends a command id that cannot be acknowledged: none of it runs away."""
    env = env_for(tmp_path, mass)
    mass.lying = True
    mass.set_tasks([kvm_spec(env, "vm-a", "write -P 1 0 1M", schedule={"interval": 3600})])
    mass.command("bad id\r\n2026-12-07 forged ERROR line", "vm-a", "pause")
    mass.command("c-ok", "vm-a", "sync_now")
    p = env.start()
    try:
        wait_until(lambda: mass.results_of("vm-a"), "vm-a's result", 90)
        wait_until(lambda: any(a["command_id"] == "c-ok" for a in mass.acks), "the good command's ack", 30)
        # Re-registering backs off: about 8 in 6 s (it was one every 50 ms: over 100).
        with mass.lock:
            mass.forget = True
            before = len(mass.registrations)
        time.sleep(6)
        with mass.lock:
            mass.forget = False
            again = len(mass.registrations) - before
        assert 2 <= again <= 10, again
        # A task list of more than 64 MiB is refused unread.
        with mass.lock:
            mass.padding = 65 << 20
            mass.tasks = [*mass.tasks]  # a new ETag: the list is fetched again
            mass.tasks.append(kvm_spec(env, "vm-b", "write -P 2 0 1M"))
        wait_until(lambda: "more than 67108864 bytes" in env.log_text(), "the refusal", 30)
        assert task_state(env, "vm-b") is None
        with mass.lock:
            mass.padding = 0
    finally:
        env.stop(p)
    text = env.log_text()
    assert "'bad id\\r\\n2026-12-07 forged ERROR line'" in text, text[-3000:]
    assert not any(line.startswith("2026-12-07 forged") for line in text.splitlines())
    assert "bad id" not in "".join(a["command_id"] for a in mass.acks)


def test_results_buffered_while_mass_is_down_arrive_once_in_order(tmp_path: Path, mass: FakeMass) -> None:
    env = env_for(tmp_path, mass, default_request_timeout=2)
    spec = kvm_spec(env, "vm-c", "write -P 3 0 2M", schedule={"interval": 2}, bandwidth={"limit": "1M"})
    mass.set_tasks([spec])
    p = env.start()
    try:
        wait_until(lambda: mass.results_of("vm-c"), "the first result", 60)
        # Mass goes down in the middle of a cycle.
        wait_until(lambda: task_state(env, "vm-c") == "running", "the next cycle", 30)
        mass.stop()
        wait_until(lambda: env.status()["control_plane"]["buffered_messages"] >= 1, "its result buffered", 60)
    finally:
        env.stop(p)
    # The proxy starts without Mass and runs its cached task; a restart keeps the buffer.
    for _ in range(2):
        before = len(_buffered_results(env))
        p = env.start()
        try:
            wait_until(lambda n=before: len(_buffered_results(env)) > n, "one more result buffered", 60)
        finally:
            env.stop(p)
    last_cycle_while_down = max(c["id"] for c in _history(env, "vm-c"))
    log = (env.logs / "hamal-period.log").read_text()
    assert log.count("Mass unreachable") == 3, log  # once per start, not at every try
    assert env.status()["control_plane"]["state"] == "down"
    # Mass is back, failing the first requests with 500s, then slower than the timeout.
    mass.fail_next = 3
    mass.start()
    p = env.start()
    try:
        wait_until(
            lambda: env.status()["control_plane"]["buffered_messages"] == 0, "the buffer delivered", 60
        )
        mass.delay = 3
        wait_until(lambda: env.status()["control_plane"]["state"] == "down", "a timeout seen", 30)
        mass.delay = 0
        wait_until(lambda: env.status()["control_plane"]["state"] == "up", "the link back", 30)
    finally:
        env.stop(p)
    delivered = [r["cycle_id"] for r in mass.results_of("vm-c")]
    assert delivered == sorted(delivered) and len(set(delivered)) == len(delivered), (
        delivered
    )  # in order, once
    ended = {c["id"] for c in _history(env, "vm-c") if c["state"] in ("ok", "partial", "failed", "cancelled")}
    still_buffered = set(_buffered_results(env))
    assert ended == set(delivered) | still_buffered and not still_buffered & set(delivered)
    assert {c for c in ended if c <= last_cycle_while_down} <= set(delivered)  # nothing lost


def _buffered_results(env: ServiceEnv) -> list[int]:
    import sqlite3

    con = sqlite3.connect(env.lib / "hamal.db")
    try:
        rows = con.execute("SELECT body FROM outbox WHERE kind = 'result' ORDER BY seq").fetchall()
    finally:
        con.close()
    return [json.loads(b)["cycle_id"] for (b,) in rows]


def _history(env: ServiceEnv, tid: str) -> list[dict[str, Any]]:
    import sqlite3

    con = sqlite3.connect(env.lib / "hamal.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM cycles WHERE task_id = ? ORDER BY id", (tid,))]
    finally:
        con.close()


def test_mass_check_says_what_is_wrong_in_one_line(tmp_path: Path, mass: FakeMass) -> None:
    env = env_for(tmp_path, mass)
    r = env.hamal("mass", "check")
    assert r.out.startswith("ok: Mass fake-mass-1 at https://127.0.0.1:") and "pinned" in r.out, r.out

    def check(expect: str, **over: Any) -> str:
        env.extra_conf = mass.conf(**over)
        env.write_conf()
        r = env.hamal("mass", "check", expect=1)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expect), r.err
        assert mass.auth_key not in r.out + r.err
        return lines[0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    check("TCP: cannot connect to 127.0.0.1:", mass_endpoint=f"https://127.0.0.1:{closed}/hypermotion/v1")
    before = len(mass.requests)
    other = FakeMass(tmp_path / "other")
    line = check("TLS pin mismatch: ", public_key_path=other.public_key)
    assert str(other.public_key) in line
    assert len(mass.requests) == before  # nothing, not even the auth key, was sent
    check("auth rejected: ", auth_key="not-the-key")
    check("route missing: ", mass_endpoint=f"https://127.0.0.1:{mass.port}/wrong/v1")
    # Without a pinned key the system CA store is used, which does not know the fake's certificate.
    check("TLS: ", public_key_path=tmp_path / "no-such-key")


def test_dns_failure_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from hamal.control.check import check

    def no_dns(*args: Any, **kw: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    conf = {
        "mass": {
            "mass_endpoint": "https://mass.example.invalid:10443/hypermotion/v1",
            "auth_key": "k" * 8,
            "hyper_exporter_id": "p1",
            "public_key_path": "/nonexistent",
            "default_request_timeout": 5,
            "get_public_ip_timeout": 5,
        }
    }
    ok, line = check(conf)
    assert not ok and line.startswith("DNS: cannot resolve mass.example.invalid"), line


def test_wrong_key_or_pin_is_said_once_and_not_hammered(tmp_path: Path, mass: FakeMass) -> None:
    env = env_for(tmp_path, mass, auth_key="not-the-key")
    env.kvm_task("local", {"vda": env.qcow2("local", 64 * MIB, "write 0 1M")})
    p = env.start()
    try:
        wait_until(lambda: task_state(env, "local") == "ok", "the file task's cycle", 60)
        before = len(mass.requests)
        time.sleep(6)
        assert len(mass.requests) - before <= 4, mass.requests  # one try per interval (2 s), not a loop
    finally:
        env.stop(p)
    log = (env.logs / "hamal-period.log").read_text()
    assert log.count("Mass refused") == 1, log
    assert "not-the-key" not in env.log_text()
    # A wrong pin: the handshake is refused before any request is made.
    other = FakeMass(tmp_path / "other")
    env.extra_conf = mass.conf(public_key_path=other.public_key)
    env.write_conf(period="interval = 2\n")
    before = len(mass.requests)
    p = env.start()
    try:
        wait_until(lambda: "pinned one" in (env.logs / "hamal-period.log").read_text(), "the pin refused")
        time.sleep(3)
    finally:
        env.stop(p)
    assert len(mass.requests) == before


def test_task_ids_belong_to_one_origin(tmp_path: Path, mass: FakeMass) -> None:
    env = env_for(tmp_path, mass)
    env.kvm_task("shared", {"vda": env.qcow2("shared", 64 * MIB, "write 0 1M")})
    mass.set_tasks([kvm_spec(env, "shared"), kvm_spec(env, "from-mass", "write 0 1M")])
    p = env.start()
    try:
        wait_until(lambda: mass.rejections and mass.results_of("from-mass"), "the rejection and a result", 60)
        mass.command("c9", "shared", "pause")  # Mass cannot command a task of a file
        wait_until(lambda: mass.acks, "the command's ack")
        assert mass.acks[0]["state"] == "rejected" and "task file" in mass.acks[0]["message"]
    finally:
        env.stop(p)
    assert "already used by" in mass.rejections[0]["error"] and mass.rejections[0]["task_id"] == "shared"
    origins = {t["id"]: t["origin"] for t in env.status()["tasks"]}
    assert origins["shared"].endswith("shared.json") and origins["from-mass"] == "mass"
    assert not mass.results_of("shared")  # a file task's cycles are not Mass's business


def test_outbox_keeps_results_in_order_and_progress_newest_only(tmp_path: Path) -> None:
    from hamal.control.link import MassLink
    from hamal.service.state import State

    conf = {
        "DEFAULT": {"hamal_lib_dir": str(tmp_path)},
        "period": {"interval": 5},
        "mass": {
            "mass_endpoint": "https://127.0.0.1:1/x",
            "auth_key": "k" * 8,
            "hyper_exporter_id": "p1",
            "public_key_path": "/nonexistent",
            "default_request_timeout": 5,
            "get_public_ip_timeout": 5,
            "enable_heartbeat_msg": True,
            "enable_get_public_ips": False,
        },
    }
    st = State(str(tmp_path / "hamal.db"))
    link = MassLink(conf, st.path, lambda: (0, 0))
    sent: list[tuple[str, Any]] = []
    link.client.post = lambda route, body: sent.append((route, body))  # type: ignore[method-assign]
    for i in range(3):
        link.queue_progress("a", 1, 1, {"phase": "sync", "disks": [], "n": i})
        link.queue_progress("b", 2, 1, {"phase": "sync", "disks": []})
    result = {"state": "ok", "bytes": 0, "disks": {}}
    link.queue_result(st, "b", 2, 1, "2026-01-01T00:00:00Z", 1.0, result)  # b's progress goes
    for cycle in (3, 4):
        link.queue_result(st, "c", cycle, 1, "2026-01-01T00:00:00Z", 1.0, result)
    link._drain(st)
    assert [r for r, _ in sent] == [
        "tasks/b/results",
        "tasks/c/results",
        "tasks/c/results",
        "tasks/a/progress",
    ]
    assert [b["cycle_id"] for r, b in sent if r.endswith("results")] == [2, 3, 4]
    assert st.outbox_count() == 0
    assert stat.S_IMODE(os.stat(tmp_path / "hamal.db").st_mode) == 0o600
