"""``hamal demo``: the product on an embedded default, with local files only.

Makes two qcow2 "VMs" with two disks each (qemu-img), writes their task files, and runs the
service ``hamal-period`` in standalone mode into a ``dir:`` chunk store: a first round of
cycles (full), guest-style writes (qemu-io), a second and a third round (incremental). Then it
prints ``hamal status`` and restores every version of every disk, checking each is
byte-identical to its disk at the time of its cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

from hamal import _native, sync
from hamal.errors import PlanError
from hamal.service import status
from hamal.units import human

MIB = 1 << 20
VMS = ("web", "db")
DISKS = ("vda", "vdb")


def _run(*cmd: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise PlanError(f"{cmd[0]} not found: the demo needs qemu-utils (tools/demo installs it)") from None
    if p.returncode != 0:
        raise PlanError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p.stdout


def _write(image: str, rng: random.Random, size: int, count: int) -> int:
    """Writes ``count`` patterned ranges at random places; returns the bytes written."""
    cmds, total = [], 0
    for _ in range(count):
        length = rng.choice([64 << 10, MIB, 2 * MIB])
        offset = rng.randrange(0, size - length) // 65536 * 65536
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {length}"]
        total += length
    _run("qemu-io", "-f", "qcow2", *cmds, image)
    return total


def _sha(image: str, workdir: str) -> str:
    raw = os.path.join(workdir, "reference.raw")
    _run("qemu-img", "convert", "-O", "raw", image, raw)
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    os.remove(raw)
    return h.hexdigest()


def _setup(workdir: str, size: int) -> tuple[str, dict[str, dict[str, str]]]:
    for d in ("store", "lib", "log", "tasks", "images"):
        shutil.rmtree(os.path.join(workdir, d), ignore_errors=True)
        os.makedirs(os.path.join(workdir, d))
    conf = os.path.join(workdir, "hamal.conf")
    with open(conf, "w") as f:
        f.write(
            f"[DEFAULT]\nhamal_lib_dir = {workdir}/lib\nhamal_info_path = {workdir}/lib/hamal_info\n"
            f"log_dir = {workdir}/log\n[period]\ninterval = 60\ntasks_dir = {workdir}/tasks\n"
            "[metrics]\nlisten =\n"
        )
    rng = random.Random(42)
    vms: dict[str, dict[str, str]] = {}
    for vm in VMS:
        vms[vm] = {}
        for disk in DISKS:
            image = os.path.join(workdir, "images", f"{vm}-{disk}.qcow2")
            _run("qemu-img", "create", "-q", "-f", "qcow2", image, str(size))
            _write(image, rng, size, 24)
            vms[vm][disk] = image
        task = {
            "version": 1,
            "id": vm,
            "vm": {"platform": "kvm", "uuid": f"demo-{vm}", "name": vm},
            "connection": {"images": vms[vm]},
            "target": {"uri": f"dir:{workdir}/store"},
            "retention": {"keep": 10},
        }
        with open(os.path.join(workdir, "tasks", f"{vm}.json"), "w") as f:
            json.dump(task, f, indent=2)
    return conf, vms


def _round(conf: str, n: int, vms: dict[str, dict[str, str]], workdir: str, refs: dict) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "hamal.service.period", "--config", conf, "--once"],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise PlanError(f"hamal-period round {n} failed; see {workdir}/log:\n{p.stderr}")
    report = status.status(_native.load_config(conf).as_dict())
    moved = sum(d["bytes_last_cycle"] or 0 for t in report["tasks"] for d in t["disks"])
    print(f"   round {n}: {len(report['tasks'])} VMs, {human(moved)} moved")
    for vm, disks in vms.items():
        for disk, image in disks.items():
            refs.setdefault(f"{vm}-{disk}", []).append(_sha(image, workdir))


def run_demo(workdir: str, size: int) -> int:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    conf, vms = _setup(workdir, size)
    print(f"1. made 2 VMs with 2 qcow2 disks of {human(size)} each, tasks in {workdir}/tasks")
    refs: dict[str, list[str]] = {}
    print("2. hamal-period, first cycles (full):")
    _round(conf, 1, vms, workdir, refs)
    rng = random.Random(7)
    for n in (2, 3):
        written = sum(_write(img, rng, size, 3) for img in vms["web"].values())
        print(f"3. guest writes: {human(written)} on web's disks; db stays idle")
        _round(conf, n, vms, workdir, refs)
    print("4. hamal status:")
    report = status.status(_native.load_config(conf).as_dict())
    print("   " + status.render(report).replace("\n", "\n   "))
    print("5. restoring every version:")
    cfg = _native.load_config(conf)
    store = f"dir:{workdir}/store"
    versions, _ = _native.list_versions(store, cfg)
    for v in versions:
        out = os.path.join(workdir, "restored.raw")
        if os.path.exists(out):
            os.remove(out)
        sync.start([sync.disk(store, out, disk_id=v["disk"], version=v["version"])], cfg).wait()
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(4 * MIB), b""):
                h.update(block)
        os.remove(out)
        i = [x["version"] for x in versions if x["disk"] == v["disk"]].index(v["version"])
        if h.hexdigest() != refs[v["disk"]][i]:
            raise SystemExit(f"   {v['disk']} version {v['version']}: restore FAILED: content differs")
        print(f"   {v['disk']:<8} {v['version']}: identical to the disk at its cycle")
    print(f"demo ok: {len(versions)} versions restored byte-identical; logs in {workdir}/log")
    return 0
