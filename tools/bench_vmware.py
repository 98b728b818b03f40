"""VMware control-plane benchmark for tools/bench (`--only vmware`): the adapter against the
tests' vSphere simulator (tests/vcsim) on 127.0.0.1, a VM with 3 disks (one of 2 TiB with
10,000 changed areas, vSphere-like answers of 1,000 areas). Measured: the adapter's time per
incremental cycle without the data (snapshot, changeIds, queries, removal; target under 2 s)
and the CPU of the query loop over the 2 TiB disk (target under 1 s)."""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

MIB, TIB = 1 << 20, 1 << 40
AREAS = 10_000


def vmware_benches(work: Path, runs: int) -> dict[str, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hamal.platforms.vmware import VmwareAdapter
    from vcsim import PASSWORD, USER, Disk, Vcsim

    base = work / "vmware"
    if base.exists():
        import shutil

        shutil.rmtree(base)
    base.mkdir(parents=True)
    big = Disk(2000, "vm/big.vmdk", 2 * TIB)
    disks = [big, Disk(2001, "vm/b.vmdk", 64 * MIB), Disk(2002, "vm/c.vmdk", 64 * MIB)]
    sim = Vcsim(base / "ds", {"DC0_H0_VM0": ("vmx-13", disks)}, page=1000)
    (base / "ds").mkdir()
    sim.start()
    try:
        pw = base / "pw"
        pw.write_text(PASSWORD)
        conn = {"host": "127.0.0.1", "port": sim.port, "user": USER, "password_file": str(pw)}
        task = SimpleNamespace(
            id="bench",
            vm_uuid=sim.uuid("DC0_H0_VM0"),
            vm_name="bench",
            connection=conn | {"thumbprint": sim.thumbprint()},
        )
        adapter = VmwareAdapter()
        vm = adapter.discover(task)
        cycle = adapter.begin(task, vm, {})  # first cycle: CBT enabled, full
        cursors = {dc.disk.id: dc.new_cursor for dc in cycle.disks}
        adapter.commit(cycle)
        rng = random.Random(7)
        log = sim.changes()
        log[big.file]["changes"] = [[rng.randrange(0, 2 * TIB // 65536) * 65536, 65536] for _ in range(AREAS)]
        (sim.root / "changes.json").write_text(json.dumps(log))
        walls, cpus = [], []
        for _ in range(max(runs, 1)):
            t0 = time.monotonic()
            cycle = adapter.begin(task, vm, cursors)
            adapter.commit(cycle)
            walls.append(time.monotonic() - t0)
            (dc,) = [d for d in cycle.disks if d.disk.id == "disk2000"]
            assert dc.changed is not None and len(dc.changed) > 0.99 * AREAS, dc.full_reason
        # The query loop alone, on a snapshot of its own.
        for _ in range(max(runs, 1)):
            cycle = adapter.begin(task, vm, cursors)
            h = cycle.handle
            c0 = time.process_time()
            old = json.loads(cursors["disk2000"])["change_id"]
            areas = adapter.changed_areas(h.session, h.vm, h.snapshot, 2000, 2 * TIB, old)
            cpus.append(time.process_time() - c0)
            adapter.commit(cycle)
        assert len(areas) > 0.99 * AREAS
    finally:
        sim.stop()
    row = {
        "name": "VMware adapter, 3 disks, 10,000 changed areas on a 2 TiB disk",
        "cycle_overhead_s": round(statistics.median(walls), 3),
        "query_loop_cpu_s": round(statistics.median(cpus), 3),
        "ok": statistics.median(walls) < 2 and statistics.median(cpus) < 1,
    }
    print(f"\nVMware adapter vs the vSphere simulator: 3 disks, {AREAS} changed areas on a 2 TiB disk")
    print(
        f"  cycle without data (snapshot, queries, removal), median: {row['cycle_overhead_s']} s (target < 2)"
    )
    print(f"  query loop CPU for the 2 TiB disk, median: {row['query_loop_cpu_s']} s (target < 1)")
    return {"vmware": [row]}
