"""``hamal demo``: the main job on an embedded default, with local files only.

Makes a sparse image with scattered random extents, syncs it in full to a raw file and to a
chunk store (``dir:``), changes some ranges (one of them to zeros), syncs only those with a
changed list, verifies the file, and restores both store versions and checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys

from hamal import _native, sync
from hamal.config import load_config
from hamal.progress import wait_with_progress
from hamal.units import human

MIB = 1 << 20


def make_sparse_image(path: str, size: int, seed: int = 42) -> int:
    """Writes random data into about half of the 1 MiB blocks of a sparse file; returns bytes written."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for block in range(size // MIB):
            if rng.random() < 0.5:
                f.seek(block * MIB)
                f.write(rng.randbytes(MIB))
                written += MIB
    return written


def change_image(path: str, size: int, seed: int = 7) -> list[tuple[int, int]]:
    """Rewrites a few scattered ranges (the last one with zeros); returns them as [offset, length]."""
    rng = random.Random(seed)
    changed = []
    with open(path, "r+b") as f:
        for i in range(8):
            offset = rng.randrange(0, size - MIB) // 4096 * 4096
            length = rng.choice([4096, 65536, MIB])
            f.seek(offset)
            f.write(bytes(length) if i == 7 else rng.randbytes(length))
            changed.append((offset, length))
    merged: list[tuple[int, int]] = []
    for off, ln in sorted(changed):  # a platform never reports overlaps; merge ours
        if merged and off <= merged[-1][0] + merged[-1][1]:
            start = merged[-1][0]
            merged[-1] = (start, max(merged[-1][0] + merged[-1][1], off + ln) - start)
        else:
            merged.append((off, ln))
    return merged


def run_demo(workdir: str, size: int) -> int:
    os.makedirs(workdir, exist_ok=True)
    src, dst = os.path.join(workdir, "source.raw"), os.path.join(workdir, "target.raw")
    changed_path = os.path.join(workdir, "changed.json")
    for p in (src, dst, dst + ".hamal-journal"):
        if os.path.exists(p):
            os.remove(p)
    store = "dir:" + os.path.abspath(os.path.join(workdir, "store"))
    shutil.rmtree(store[4:], ignore_errors=True)
    conf_path = os.path.join(workdir, "hamal.conf")
    if not os.path.exists(conf_path):  # the demo's own config: defaults, state under workdir
        lib = os.path.abspath(os.path.join(workdir, "lib"))
        text = _native.load_config("/nonexistent/hamal.conf").render()
        with open(conf_path, "w") as f:
            f.write(text.replace("hamal_lib_dir = /var/lib/hamal/", f"hamal_lib_dir = {lib}/"))
    cfg = load_config(conf_path)
    show = sys.stderr.isatty()

    data = make_sparse_image(src, size)
    original = _sha256(src)
    print(f"1. made {src}: {human(size)} sparse image with {human(data)} of random data")
    plan = [sync.disk(src, dst, disk_id="demo-file"), sync.disk(src, store, disk_id="demo")]
    s, v1 = wait_with_progress(sync.start(plan, cfg), show)
    print(f"2. full sync: {human(s['bytes_written'])} written in {s['seconds']:.2f} s [{s['io_backend']}]")
    print(f"   and to the chunk store {store}: version {v1['version']}")
    _verify(src, dst, "3.")

    changed = change_image(src, size)
    with open(changed_path, "w") as f:
        json.dump(changed, f)
    print(f"4. changed {len(changed)} ranges of the source, listed in {changed_path}")
    changes = _native.load_changed_file(changed_path)
    plan = [
        sync.disk(src, dst, disk_id="demo-file", changed=changes),
        sync.disk(src, store, disk_id="demo", changed=changes),
    ]
    s, v2 = wait_with_progress(sync.start(plan, cfg), show)
    print(
        f"5. incremental sync: {human(s['bytes_total'])} changed, {human(s['bytes_written'])} written, "
        f"{human(s['bytes_zero'])} zeroed in {s['seconds']:.2f} s; store version {v2['version']}"
    )
    _verify(src, dst, "6.")
    for step, version, want in (("7.", v1["version"], original), ("8.", v2["version"], _sha256(src))):
        out = os.path.join(workdir, f"restored-{version}.raw")
        if os.path.exists(out):
            os.remove(out)
        restore = [sync.disk(store, out, disk_id="demo", version=version)]
        wait_with_progress(sync.start(restore, cfg), show)
        if _sha256(out) != want:
            raise SystemExit(f"{step} restore of version {version} FAILED: content differs")
        print(f"{step} restored store version {version}: identical to the source at that time")
    print("demo ok: the target and both store versions are byte-identical to the source")
    return 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def _verify(src: str, dst: str, step: str) -> None:
    r = _native.verify(src, dst)
    if r["mismatched_chunks"]:
        raise SystemExit(f"{step} verify FAILED: chunks differ at {r['mismatch_offsets']}")
    print(f"{step} verify: identical over {human(r['bytes_compared'])} ({r['chunks']} chunks)")
