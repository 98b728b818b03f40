"""Ceph RBD benchmarks for tools/bench (`--only rbd`), on a throw-away single-node Ceph started
here (bluestore OSD on a sparse file): the 4 GiB test image imported into RBD, then a full sync
by hamal vs `rbd export` to a file, and an incremental by hamal vs `rbd export-diff --from-snap`
on the same two snapshots."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from bench import GIB, MIB, digest, make_image, timed, warm

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from ceph_cluster import CephCluster  # noqa: E402

CHANGES = 64  # 4 MiB writes between the snapshots (256 MiB), plus 8 discards of 4 MiB


def rbd(cluster: CephCluster, *args: str) -> None:
    subprocess.run(["rbd", "--conf", str(cluster.conf), "--no-progress", *args], check=True)


def change_image(cluster: CephCluster, image: str, size: int) -> int:
    rng = random.Random(5)
    ops = [f"write:{rng.randrange(size // (4 * MIB)) * 4 * MIB}:{4 * MIB}:{i}" for i in range(CHANGES)]
    ops += [f"discard:{rng.randrange(size // (4 * MIB)) * 4 * MIB}:{4 * MIB}" for _ in range(8)]
    cmd = ["/usr/bin/python3", str(TESTS / "rbd_io.py"), str(cluster.conf), "rbd", image, *ops]
    subprocess.run(cmd, check=True)
    return CHANGES * 4 * MIB


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def interleave(cases: list[tuple[str, list[str], Path | None]], runs: int, prepare) -> dict[str, dict]:
    """Runs each case `runs` times, round by round; `prepare(name)` resets its output first."""
    rows = {name: {"times": [], "rss": 0} for name, _, _ in cases}
    for _ in range(runs):
        for name, cmd, _ in cases:
            prepare(name)
            t, r = timed(cmd)
            rows[name]["times"].append(t)
            rows[name]["rss"] = max(rows[name]["rss"], r)
    return rows


def rbd_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    src = work / "full-4g.raw"
    make_image(src, 4 * GIB, 2 * GIB, seed=1)
    warm(src)
    cluster = CephCluster(work / "ceph-rbd", bluestore_gib=16, rgw=False)
    cluster.start()
    try:
        cluster.create_rbd_pool("rbd")
        rbd(cluster, "import", str(src), "rbd/bench")
        rbd(cluster, "snap", "create", "rbd/bench@s1")
        conf = cluster.conf
        out, base, exp = work / "rbd-out.raw", work / "rbd-base.raw", work / "rbd-export.raw"

        def reset(name: str) -> None:
            for p in (out, exp, work / "rbd.diff"):
                p.unlink(missing_ok=True)
            if name == "hamal incremental":
                sparse_copy(base, out)  # the copy of s1 the incremental brings to s2

        full_cases = [
            (
                "hamal full sync",
                [hamal, "sync", f"rbd:rbd/bench@s1?conf={conf}", str(out), "--no-progress"],
                out,
            ),
            (
                "rbd export",
                ["rbd", "--conf", str(conf), "export", "--no-progress", "rbd/bench@s1", str(exp)],
                exp,
            ),
        ]
        full = interleave(full_cases, runs, reset)
        expect = digest(src)
        ok_full = {}
        for name, cmd, path in full_cases:
            reset(name)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            ok_full[name] = digest(path) == expect
            if path == out:
                sparse_copy(out, base)

        changed = change_image(cluster, "bench", 4 * GIB)
        rbd(cluster, "snap", "create", "rbd/bench@s2")
        exp.unlink(missing_ok=True)
        rbd(cluster, "export", "rbd/bench@s2", str(exp))
        expect2 = digest(exp)
        inc_cases = [
            (
                "hamal incremental",
                [hamal, "sync", f"rbd:rbd/bench@s2?from_snap=s1&conf={conf}", str(out), "--no-progress"],
                out,
            ),
            (
                "rbd export-diff",
                [
                    "rbd",
                    "--conf",
                    str(conf),
                    "export-diff",
                    "--no-progress",
                    "--from-snap",
                    "s1",
                    "rbd/bench@s2",
                    str(work / "rbd.diff"),
                ],
                None,
            ),
        ]
        inc = interleave(inc_cases, runs, reset)
        reset("hamal incremental")
        subprocess.run(inc_cases[0][1], check=True, stdout=subprocess.DEVNULL)
        ok_inc = digest(out) == expect2
        for p in (out, base, exp, work / "rbd.diff"):
            p.unlink(missing_ok=True)
    finally:
        cluster.stop()

    def rows(data: dict[str, dict], ok: dict[str, bool]) -> list[dict]:
        return [
            {
                "name": n,
                "median_s": statistics.median(v["times"]),
                "times": v["times"],
                "peak_rss": v["rss"],
                "ok": ok.get(n, True),
            }
            for n, v in data.items()
        ]

    result = {
        "rbd_full": rows(full, ok_full),
        "rbd_incremental": rows(inc, {"hamal incremental": ok_inc}) + [{"changed_bytes": changed}],
    }
    report(result, src)
    return {"rbd_full": result["rbd_full"], "rbd_incremental": result["rbd_incremental"][:-1]}


def report(result: dict[str, list[dict]], src: Path) -> None:
    data = src.stat().st_blocks * 512 / GIB
    full, inc = result["rbd_full"], result["rbd_incremental"]
    print(f"\nRBD full sync of the 4 GiB image ({data:.1f} GiB data) to a file, time includes sync")
    table(full, full[1]["median_s"], "rbd export")
    print(f"\nRBD incremental, {inc[-1]['changed_bytes'] // MIB} MiB written, 32 MiB discarded")
    table(inc[:-1], inc[1]["median_s"], "rbd export-diff")


def table(rows: list[dict], base: float, peer: str) -> None:
    print(f"{'case':<22} {'median s':>9} {'throughput vs ' + peer:>28} {'peak RSS MiB':>13}  content")
    for r in rows:
        print(
            f"{r['name']:<22} {r['median_s']:>9.3f} {base / r['median_s']:>28.2f} "
            f"{r['peak_rss'] / MIB:>13.1f}  {'identical' if r['ok'] else 'MISMATCH'}"
        )


if __name__ == "__main__":
    work = Path(sys.argv[2]).resolve()
    print(json.dumps(rbd_benches(sys.argv[1], work, int(sys.argv[3])), indent=2))
