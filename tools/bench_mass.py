"""Control-plane benchmark for tools/bench (`--only mass`): the service's Mass link against the
tests' fake Mass (HTTPS with a pinned key) on 127.0.0.1, with 50 Mass tasks whose cycles all
report progress, as the loop queues it (at most once per task per `task_update_wait_time`).
Measured: the link thread's CPU per request (a heartbeat, a task-list check, one progress
message; target under 5 ms), the loop's CPU to queue one progress message, and how many
progress requests Mass got per task per `task_update_wait_time` (target at most 1)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

TASKS, SECONDS, WAIT_S = 50, 10, 1.0


def mass_benches(work: Path) -> dict[str, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fake_mass import FakeMass
    from hamal import _native
    from hamal.control.link import MassLink
    from hamal.service.state import State

    base = work / "mass"
    base.mkdir(parents=True, exist_ok=True)
    mass = FakeMass(base / "fake").start()
    conf_path = base / "hamal.conf"
    conf_path.write_text(
        f"[DEFAULT]\nhamal_lib_dir = {base}/lib\nlog_dir = {base}/log\n"
        f"[period]\ninterval = 5\ntask_update_wait_time = {WAIT_S:g}\n"
        + mass.conf(enable_get_public_ips="False")
    )
    conf = _native.load_config(str(conf_path)).as_dict()
    db = base / "lib" / "hamal.db"
    for f in base.glob("lib/hamal.db*"):
        f.unlink()
    state = State(str(db))
    specs = [
        {
            "version": 1,
            "id": f"vm{i}",
            "vm": {"platform": "kvm", "uuid": f"u{i}", "name": f"vm{i}"},
            "connection": {"images": {"vda": f"/nonexistent/vm{i}.qcow2"}},
            "target": {"uri": "dir:/nonexistent"},
        }
        for i in range(TASKS)
    ]
    mass.set_tasks(specs)
    the_link = MassLink(conf, str(db), lambda: (TASKS, TASKS))
    the_link.start()
    deadline = time.monotonic() + 30
    while len(state.task_rows()) < TASKS and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    cpu0, sent0, other0 = (
        the_link.cpu_s,
        mass.count("/progress"),
        mass.count("/heartbeat") + mass.count("/tasks"),
    )
    queue_cpu = []
    disk = {"disk": "vda", "state": "running", "bytes_done": 1 << 30, "bytes_total": 4 << 30}
    msg = {"phase": "sync", "disks": [disk | {"rate_bps": 1e8, "eta_seconds": 30.0}]}
    t_end = time.monotonic() + SECONDS
    while time.monotonic() < t_end:
        t0 = time.thread_time()
        for i in range(TASKS):
            the_link.queue_progress(f"vm{i}", i + 1, 1, msg)
        queue_cpu.append((time.thread_time() - t0) / TASKS)
        time.sleep(WAIT_S)
    time.sleep(1)
    the_link.stop()
    mass.stop()
    progress = mass.count("/progress") - sent0
    requests = progress + mass.count("/heartbeat") + mass.count("/tasks") - other0
    per_task = progress / TASKS / (SECONDS / WAIT_S)
    cpu_per_request_ms = (the_link.cpu_s - cpu0) / max(requests, 1) * 1000
    row = {
        "name": f"Mass link, {TASKS} tasks reporting progress",
        "cpu_per_request_ms": round(cpu_per_request_ms, 3),
        "requests": requests,
        "queue_cpu_per_message_ms": round(statistics.median(queue_cpu) * 1000, 3),
        "progress_per_task_per_wait": round(per_task, 2),
        "violations": len(mass.violations),
        "ok": cpu_per_request_ms < 5 and per_task <= 1.0 and not mass.violations,
    }
    print(
        f"\nMass link: {TASKS} tasks reporting progress every {WAIT_S:g} s for {SECONDS} s (fake Mass, HTTPS)"
    )
    print(
        f"  link CPU per request (heartbeat, task list, one progress): {cpu_per_request_ms:.3f} ms "
        "(target < 5)"
    )
    print(f"  requests: {requests} ({progress} progress; newer progress replaces older still queued)")
    print(f"  loop CPU to queue one progress message: {row['queue_cpu_per_message_ms']} ms")
    print(f"  progress requests per task per task_update_wait_time: {per_task:.2f} (target <= 1)")
    return {"mass": [row]}
