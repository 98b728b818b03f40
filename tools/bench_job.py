"""One hamal job over several disks and a chunk store, as the service runs them: the driver of
tools/bench's many-disk store cases (it imports nothing but hamal, so its time is hamal's).

    bench_job.py backup STORE KEY_FILE DISK...                  full syncs, disk ids d0, d1, ...
    bench_job.py again STORE KEY_FILE DISK... -- LIST.json...   incrementals, a changed list each
    bench_job.py restore STORE KEY_FILE OUT_DIR COUNT           the newest versions to OUT_DIR/dN.raw
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hamal
from hamal import sync


def plan(kind: str, store: str, args: list[str]) -> list[dict]:
    if kind == "restore":
        out, count = args[0], int(args[1])
        return [sync.disk(store, f"{out}/d{i}.raw", disk_id=f"d{i}") for i in range(count)]
    if kind == "again":
        cut = args.index("--")
        lists = [json.loads(Path(f).read_text()) for f in args[cut + 1 :]]
        return [
            sync.disk(d, store, disk_id=f"d{i}", changed=[(o, n) for o, n in c])
            for i, (d, c) in enumerate(zip(args[:cut], lists))
        ]
    return [sync.disk(d, store, disk_id=f"d{i}") for i, d in enumerate(args)]


def main(argv: list[str]) -> None:
    kind, store, key = argv[:3]
    disks = plan(kind, store, argv[3:])
    options = sync.SyncOptions(parallel_disks=len(disks), key_file=key)
    with sync.start(disks, hamal.load_config(), options) as job:
        job.wait()
    bad = [r["error"] for r in job.results() if r.get("error")]
    if bad:
        sys.exit(f"failed: {bad}")


if __name__ == "__main__":
    main(sys.argv[1:])
