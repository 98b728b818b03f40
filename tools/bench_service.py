"""Service benchmark for tools/bench (`--only service`): 10 qcow2 VMs with 2 disks each (20
disks) kept in a dir: store by hamal-period. A first round of cycles syncs them in full; then
a round with nothing changed is timed (target: under 10 s here), with the service's own cost per
VM cycle (its wall time minus the engine's, from the state database: snapshot, plan, commit,
log; target under 0.5 s) and the peak RSS of the loop and of the largest worker (targets
100 MiB and 256 MiB), as the loop logs them when it stops."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
VMS, DISKS = 10, ("vda", "vdb")


def _setup(base: Path) -> Path:
    shutil.rmtree(base, ignore_errors=True)
    for d in ("tasks", "img", "log", "lib"):
        (base / d).mkdir(parents=True)
    conf = base / "hamal.conf"
    conf.write_text(
        f"[DEFAULT]\nhamal_lib_dir = {base}/lib\nhamal_info_path = {base}/lib/hamal_info\n"
        f"log_dir = {base}/log\n"
        f"[period]\ntasks_dir = {base}/tasks\n[metrics]\nlisten =\n"
    )
    for i in range(VMS):
        images = {}
        for d in DISKS:
            img = base / "img" / f"vm{i}-{d}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} 0 8M", str(img)],
                check=True,
                capture_output=True,
            )
            images[d] = str(img)
        task = {
            "version": 1,
            "vm": {"platform": "kvm", "uuid": f"bench-{i}", "name": f"vm{i}"},
            "connection": {"images": images},
            "target": {"uri": f"dir:{base}/store"},
        }
        (base / "tasks" / f"vm{i}.json").write_text(json.dumps(task))
    return conf


def _round(conf: Path) -> float:
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "hamal.service.period", "--config", str(conf), "--once"],
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"hamal-period failed: {p.stderr}")
    return took


def service_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    base = work / "service"
    conf = _setup(base)
    full = _round(conf)
    idle = [_round(conf) for _ in range(max(runs, 1))]
    db = sqlite3.connect(base / "lib" / "hamal.db")
    overheads = []
    for seconds, detail in db.execute(
        "SELECT seconds, detail FROM cycles WHERE state = 'ok' ORDER BY id DESC LIMIT ?", (VMS,)
    ):
        engine = max(d["summary"]["seconds"] for d in json.loads(detail).values())
        overheads.append(seconds - engine)
    log = (base / "log" / "hamal-period.log").read_text()
    loop_rss, worker_rss = (
        int(x) for x in re.findall(r"peak RSS: loop (\d+) MiB, largest worker (\d+) MiB", log)[-1]
    )
    row = {
        "name": f"hamal-period, {VMS} VMs x {len(DISKS)} disks",
        "first_round_s": round(full, 3),
        "median_s": statistics.median(idle),
        "cycle_overhead_s": round(statistics.median(overheads), 3),
        "loop_rss_mib": loop_rss,
        "worker_rss_mib": worker_rss,
        "ok": statistics.median(idle) < 10,
    }
    print(f"\nService: {VMS} qcow2 VMs x {len(DISKS)} disks (1 GiB, 8 MiB data each) into a dir: store")
    print(f"  first round (full): {full:.2f} s")
    print(f"  idle round (nothing changed), median of {len(idle)}: {row['median_s']:.2f} s (target < 10 s)")
    print(
        f"  service overhead per VM cycle beyond the engine, median: {row['cycle_overhead_s']:.3f} s "
        "(target < 0.5 s)"
    )
    print(f"  peak RSS: loop {loop_rss} MiB (target < 100), largest worker {worker_rss} MiB (target < 256)")
    return {"service": [row]}
