"""OpenStack control-plane benchmark for tools/bench (`--only openstack`): the adapter against the
tests' real Keystone and Cinder (RBD driver) on a throw-away Ceph, Nova faked. Measured per
snapshot mode: one cycle's API time for a server with 2 volumes without the data (orphan check,
discovery, snapshots, the previous snapshots' removal; target under 3 s). The data path is the
RBD source's (`--only rbd`: against `rbd export` / `export-diff`)."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace


def openstack_benches(work: Path, runs: int) -> dict[str, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from ceph_cluster import CephCluster
    from fake_nova import FakeNova
    from hamal.platforms import openstack_api
    from hamal.platforms.openstack import OpenStackAdapter
    from openstack_cloud import ADMIN_PASSWORD, OpenStack

    base = work / "openstack"
    if base.exists():
        import shutil

        shutil.rmtree(base)
    base.mkdir(parents=True)
    ceph = CephCluster(base / "ceph", rgw=False, mgr=True)
    rows = []
    ceph.start()
    cloud = nova = None
    try:
        cloud = OpenStack(base / "os", ceph).start()
        nova = FakeNova(cloud)
        cloud.register_service("compute", nova.url)
        pw = base / "pw"
        pw.write_text(ADMIN_PASSWORD)
        adapter = OpenStackAdapter()
        for mode in ("cinder", "rbd"):
            sid = str(uuid.uuid4())
            nova.add_server(sid, f"bench-{mode}", {})
            for i in range(2):
                cloud.attach(cloud.create_volume(f"{mode}-{i}"), sid)
            conn = {"auth_url": cloud.keystone, "username": "admin", "password_file": str(pw),
                    "project_name": "admin", "snapshot_mode": mode, "ceph_conf": str(ceph.conf)}  # fmt: skip
            task = SimpleNamespace(id=f"bench-{mode}", vm_uuid=sid, vm_name=sid, connection=conn)
            cursors: dict[str, str | None] = {}
            times = []
            for i in range(max(runs, 1) + 1):
                openstack_api._SESSIONS.clear()  # each cycle is a new worker process: a new login
                t0 = time.monotonic()
                adapter.cleanup_orphans(task, {c for c in cursors.values() if c})
                vm = adapter.discover(task)
                cycle = adapter.begin(task, vm, cursors)
                for dc in cycle.disks:
                    dc.committed = True
                adapter.commit(cycle)
                if i:  # the first cycle has no previous snapshot to remove
                    times.append(time.monotonic() - t0)
                cursors = {dc.disk.id: dc.new_cursor for dc in cycle.disks}
            med = statistics.median(times)
            name = f"OpenStack adapter, {mode} snapshots, 2 volumes"
            rows.append({"name": name, "cycle_api_s": round(med, 2), "ok": med < 3})
    finally:
        if nova:
            nova.stop()
        if cloud:
            cloud.stop()
        ceph.stop()
    print("\nOpenStack adapter vs real Keystone and Cinder (RBD driver), a server with 2 volumes")
    for r in rows:
        print(f"  {r['name']}: API time per cycle without data, median: {r['cycle_api_s']} s (target < 3)")
    return {"openstack": rows}
