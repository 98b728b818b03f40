"""VDDK benchmark for tools/bench (`--only vddk`): the 4 GiB test image read through the fake
VixDiskLib (rust/fake-vddk, built here; VDDK itself cannot be downloaded) against the same file
read directly by hamal's file source, in the same run. The difference is what the VDDK path
costs: the worker process, the pipe, and VDDK's sector-based async reads. Targets on disk and
on tmpfs (no write-back in the time)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench import GIB, digest, make_image, report, run_cases, warm

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from fake_vddk import build_variants, make_vm  # noqa: E402


def vddk_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    src = work / "full-4g.raw"
    if not src.exists():
        make_image(src, 4 * GIB, 2 * GIB, seed=1)
    base = work / "vddk"
    if base.exists():
        import shutil

        shutil.rmtree(base)
    base.mkdir()
    libs = build_variants(base / "libs")
    vm = make_vm(base)
    os.link(src, vm.disk)
    env = vm.env()
    env.pop("FAKE_VDDK_LOG")  # no call log: it would cost more than the reads
    os.environ.update(env)
    warm(src)
    expect = digest(src)
    uri = vm.uri(libs["v8"])
    out: dict[str, list[dict]] = {}
    for key, where in (("vddk_disk", work), ("vddk_tmpfs", Path("/dev/shm"))):
        with tempfile.TemporaryDirectory(dir=where) as d:
            dst = Path(d) / "out.raw"
            cases = [
                ("hamal sync file source", [hamal, "sync", str(src), str(dst), "--no-progress"]),
                ("hamal sync vddk (fake)", [hamal, "sync", uri, str(dst), "--no-progress"]),
            ]
            rows = run_cases(cases, dst, runs, expect)
        title = f"Full sync of the 4 GiB image through VDDK vs the file source, target on {where}"
        report(f"{title}; ratio to the file source", rows, rows[0]["median_s"])
        out[key] = rows
    return out
