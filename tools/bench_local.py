"""Local full-sync cases for tools/bench (`--only local`), each against the fastest tools a user
would pick (cp, qemu-img convert, nbdcopy) in the same run, times including `sync`, with peak RSS
and CPU seconds: a fully allocated 4 GiB image; fragmented images of 1 and 4 GiB (1 MiB extents
scattered at random, half allocated: the short syncs the service runs many of); the sparse 4 GiB
image onto a block device (a loop device); and 8 disks at once (one hamal job with
parallel_sync_disks_count = 8 against 8 nbdcopy processes at once)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from bench import GIB, MIB, digest, make_image, report, run_cases, warm


def fragmented_image(path: Path, size: int, seed: int) -> None:
    """1 MiB extents of random data at random places, half of the image allocated."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(seed)
    n = size // MIB
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for i in rng.sample(range(n), n // 2):
            os.pwrite(f.fileno(), rng.randbytes(MIB), i * MIB)
    tmp.rename(path)


def peers(hamal: str, src: Path, dst: Path, size: int) -> list[tuple[str, list[str]]]:
    truncate = f"truncate -s {size} {dst} && " if not dst.is_block_device() else ""
    return [
        ("hamal sync", [hamal, "sync", str(src), str(dst), "--no-progress"]),
        ("cp --sparse=always", ["cp", "--sparse=always", str(src), str(dst)]),
        (
            "qemu-img convert",
            [
                "qemu-img",
                "convert",
                "-n" if dst.is_block_device() else "-q",
                "-f",
                "raw",
                "-O",
                "raw",
                str(src),
                str(dst),
            ],
        ),
        ("nbdcopy", ["sh", "-c", f"{truncate}nbdcopy {src} {dst}"]),
    ]


def case(hamal: str, src: Path, dst: Path, runs: int, title: str) -> list[dict]:
    warm(src)
    expect = digest(src)
    size = src.stat().st_size
    cases = peers(hamal, src, dst, size)
    if dst.is_block_device():
        cases = [c for c in cases if not c[0].startswith("cp")]  # cp would replace the node
    rows = run_cases(cases, dst, runs, expect)
    data = _allocated(src)
    for r in rows:
        r["cpu_s_per_gib"] = round(r["cpu_s"] / (data / GIB), 3)
    best = min(r["median_s"] for r in rows[1:])
    rows[0]["target_met"] = rows[0]["median_s"] <= best
    report(f"{title}; ratio to the fastest peer", rows, best)
    return rows


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def loop_device(backing: Path, size: int):
    with open(backing, "wb") as f:
        f.truncate(size)
    out = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def eight_disks(hamal: str, work: Path, runs: int) -> list[dict]:
    """8 fragmented 1 GiB disks: one hamal job syncing all 8 at once vs 8 nbdcopy at once."""
    srcs = [work / f"frag8-{i}.raw" for i in range(8)]
    for i, s in enumerate(srcs):
        fragmented_image(s, GIB, seed=100 + i)
        warm(s)
    out = work / "eight"
    out.mkdir(exist_ok=True)
    dsts = [out / f"d{i}.raw" for i in range(8)]
    plan = [(str(s), str(d)) for s, d in zip(srcs, dsts)]
    driver = (
        "import sys, json, hamal; from hamal import sync\n"
        f"plan = {plan!r}\n"
        "disks = [sync.disk(s, d, disk_id=f'd{i}') for i, (s, d) in enumerate(plan)]\n"
        "with sync.start(disks, hamal.load_config(), sync.SyncOptions(parallel_disks=8)) as job:\n"
        "    job.wait()\n"
        "bad = [r['error'] for r in job.results() if r.get('error')]\n"
        "sys.exit(f'failed: {bad}' if bad else 0)\n"
    )
    python = str(Path(hamal).parent / "python")
    script = " & ".join(f"truncate -s {GIB} {d} && nbdcopy {s} {d}" for s, d in plan) + " & wait"
    cases = [
        ("hamal, one job, 8 disks at once", [python, "-c", driver]),
        ("8 nbdcopy at once", ["sh", "-c", script]),
    ]
    expect = [digest(s) for s in srcs]
    rows = run_cases(cases, dsts[0], runs, expect[0])
    for r in rows:  # run_cases checked the first disk; every disk is checked here
        r["ok"] = r["ok"] and [digest(d) for d in dsts] == expect
    report(
        "8 fragmented 1 GiB disks at once (0.5 GiB data each); ratio to nbdcopy", rows, rows[1]["median_s"]
    )
    for d in dsts:
        d.unlink(missing_ok=True)
    return rows


def local_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    full = work / "alloc-4g.raw"
    make_image(full, 4 * GIB, 4 * GIB, seed=11)
    out["full_allocated"] = case(
        hamal, full, work / "alloc-out.raw", runs, "Full sync, 4 GiB fully allocated"
    )
    for gib in (1, 4):
        src = work / f"frag-{gib}g.raw"
        fragmented_image(src, gib * GIB, seed=gib)
        out[f"fragmented_{gib}g"] = case(
            hamal,
            src,
            work / "frag-out.raw",
            runs,
            f"Full sync, fragmented {gib} GiB (1 MiB extents, half allocated)",
        )
    sparse = work / "full-4g.raw"
    make_image(sparse, 4 * GIB, 2 * GIB, seed=1)
    backing = work / "loop-backing.raw"
    dev = loop_device(backing, 4 * GIB)
    try:
        out["block_device"] = case(
            hamal, sparse, dev, runs, f"Full sync of the sparse 4 GiB image onto {dev}"
        )
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)
        backing.unlink(missing_ok=True)
    out["eight_disks"] = eight_disks(hamal, work, runs)
    return out
