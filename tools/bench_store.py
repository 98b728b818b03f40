"""Chunk-store benchmarks for tools/bench (`--only store`), on a throw-away radosgw started here:
an idle 2 TiB disk re-synced with an empty change list, and the 4 GiB image uploaded by hamal
and by `rclone copy`, then restored by hamal."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from bench import GIB, MIB, digest, make_image, timed, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ceph_cluster import ACCESS_KEY, SECRET_KEY, CephCluster  # noqa: E402


class Bucket:
    def __init__(self, cluster: CephCluster, name: str) -> None:
        import boto3

        self.name = name
        self.client = boto3.client(
            "s3",
            endpoint_url=cluster.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=name)

    def objects(self, prefix: str) -> list[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return [o for page in pages for o in page.get("Contents", [])]

    def stored_bytes(self, prefix: str) -> int:
        return sum(o["Size"] for o in self.objects(prefix))

    def empty(self, prefix: str) -> None:
        keys = [{"Key": o["Key"]} for o in self.objects(prefix)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.name, Delete={"Objects": keys[i : i + 1000]})


def write_conf(work: Path, cluster: CephCluster) -> None:
    (work / "hamal.conf").write_text(
        f"[DEFAULT]\nhamal_lib_dir = {work / 'lib'}\n"
        f"[s3]\nendpoint = {cluster.endpoint}\naccess_key_id = {ACCESS_KEY}\n"
        f"secret_access_key = {SECRET_KEY}\n[sync]\nupload_metadata_to_oss = True\n"
    )


def idle_bench(hamal: str, work: Path, bucket: Bucket, runs: int) -> list[dict]:
    """Re-sync of an unchanged 2 TiB sparse disk with an empty change list."""
    src = work / "idle-2t.raw"
    make_image(src, 2048 * GIB, 256 * MIB, seed=7)
    store = f"s3://{bucket.name}/idle"
    first, _ = timed([hamal, "sync", str(src), store, "--disk", "idle", "--no-progress"])
    empty = work / "empty.json"
    empty.write_text("[]")
    times, rss, written = [], 0, []
    for _ in range(runs):
        before = bucket.stored_bytes("idle/")
        t, r = timed(
            [hamal, "sync", str(src), store, "--disk", "idle", "--changed", str(empty), "--no-progress"]
        )
        times.append(t)
        rss = max(rss, r)
        written.append(bucket.stored_bytes("idle/") - before)
    return [
        {
            "name": "hamal idle re-sync",
            "median_s": statistics.median(times),
            "times": times,
            "peak_rss": rss,
            "stored_bytes": max(written),
            "first_full_s": first,
            "ok": True,
        }
    ]


def upload_bench(hamal: str, work: Path, bucket: Bucket, runs: int) -> list[dict]:
    """Full upload of the 4 GiB test image: hamal vs rclone copy; then hamal restore."""
    src = work / "full-4g.raw"
    make_image(src, 4 * GIB, 2 * GIB, seed=1)
    warm(src)
    expect = digest(src)
    rclone_env = {
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Ceph",
        "RCLONE_CONFIG_BENCH_ENDPOINT": bucket.client.meta.endpoint_url,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    os.environ.update(rclone_env)
    # A CA bundle in the environment makes rclone 1.60 refuse its HTTP transport; the endpoint
    # is plain HTTP on 127.0.0.1 anyway.
    os.environ.pop("AWS_CA_BUNDLE", None)
    out = work / "restored.raw"
    rows = {
        n: {"times": [], "rss": 0, "ok": True} for n in ("hamal sync to S3", "rclone copy", "hamal restore")
    }

    def note(name: str, t: float, r: int) -> None:
        rows[name]["times"].append(t)
        rows[name]["rss"] = max(rows[name]["rss"], r)

    for i in range(runs):
        store = f"s3://{bucket.name}/up{i}"
        note("hamal sync to S3", *timed([hamal, "sync", str(src), store, "--disk", "d", "--no-progress"]))
        note("rclone copy", *timed(["rclone", "copy", str(src), f"bench:{bucket.name}/rclone/"]))
        out.unlink(missing_ok=True)
        note("hamal restore", *timed([hamal, "restore", store, str(out), "--disk", "d", "--no-progress"]))
        if i == 0:
            rows["hamal restore"]["ok"] = digest(out) == expect
        bucket.empty(f"up{i}/")
        bucket.empty("rclone/")
    out.unlink(missing_ok=True)
    return [
        {
            "name": n,
            "median_s": statistics.median(v["times"]),
            "times": v["times"],
            "peak_rss": v["rss"],
            "ok": v["ok"],
        }
        for n, v in rows.items()
    ]


def store_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    # On disk: memstore would hold every uploaded byte twice in RAM.
    cluster = CephCluster(work / "ceph", bluestore_gib=32)
    cluster.start()
    try:
        write_conf(work, cluster)
        bucket = Bucket(cluster, "hamal-bench")
        idle = idle_bench(hamal, work, bucket, runs)
        r = idle[0]
        print(
            f"\nIdle 2 TiB sparse disk, empty change list, to radosgw: median {r['median_s']:.3f} s, "
            f"at most {r['stored_bytes']} bytes stored per run, peak RSS {r['peak_rss'] / MIB:.1f} MiB "
            f"(first full sync {r['first_full_s']:.1f} s)"
        )
        up = upload_bench(hamal, work, bucket, runs)
        base = up[1]["median_s"]
        print("\nUpload of the 4 GiB image to radosgw (time includes sync); ratio to rclone copy")
        print(f"{'case':<26} {'median s':>9} {'ratio':>7} {'peak RSS MiB':>13}  content")
        for x in up:
            print(
                f"{x['name']:<26} {x['median_s']:>9.3f} {x['median_s'] / base:>7.2f} "
                f"{x['peak_rss'] / MIB:>13.1f}  {'identical' if x['ok'] else 'MISMATCH'}"
            )
        rate = up[0]["median_s"] / up[2]["median_s"]
        print(f"restore rate / upload rate: {rate:.2f}")
        return {"store_idle": idle, "store_upload": up}
    finally:
        cluster.stop()


if __name__ == "__main__":
    work = Path(sys.argv[2]).resolve()
    print(json.dumps(store_benches(sys.argv[1], work, int(sys.argv[3])), indent=2))
