"""The chunk store against the backup tools users would otherwise pick, for tools/bench
(`--only backup`): restic (Debian's 0.14: dedup, compression, encryption, S3 backend) and borg
(Debian's borgbackup), all encrypted and compressed, on the same 2 GiB image (0.8 GiB data):
first backup, a second after 80 MiB changed (restic and borg rescan the file; hamal gets the
changed list, as the service gives it), restore of the latest, bytes stored. Into a local
directory (hamal `dir:`, restic's local repository, borg) and into radosgw (hamal `s3://`,
restic's S3 backend), started here. Times include `sync`; medians of fresh repositories."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import GIB, MIB, digest, make_image, timed_cpu, warm

PASSWORD = "bench-password"
CHANGED = 80 * MIB


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def change(disk: Path, list_file: Path, seed: int) -> None:
    """80 MiB of new data in 20 scattered 4 MiB pieces; their list for hamal."""
    rng = random.Random(seed)
    size = disk.stat().st_size
    pieces = sorted({rng.randrange(0, size // (4 * MIB)) * 4 * MIB for _ in range(40)})[:20]
    with open(disk, "r+b") as f:
        for off in pieces:
            os.pwrite(f.fileno(), os.urandom(4 * MIB), off)
    list_file.write_text(json.dumps([[off, 4 * MIB] for off in pieces]))


class Tool:
    """One tool's three steps, as commands, and the restored files (one per disk)."""

    def __init__(self, name: str, first: list[str], again: list[str], restore: list[str], outs: list[Path]):
        self.name, self.first, self.again, self.restore, self.outs = name, first, again, restore, outs


def tools(hamal: str, work: Path, disks: list[Path], changes: list[Path], s3: dict | None) -> list[Tool]:
    """One disk: the `hamal` CLI. Several: one hamal job over all of them (tools/bench_job.py),
    against one restic or borg run over all the files, as each would be used."""
    key = work / "bench.key"
    key.write_text("ab" * 32)
    r = work / "repos"
    out = work / "restores"
    if s3 is None:
        store = f"dir:{r / 'hamal'}"
        restic_repo = str(r / "restic")
    else:
        store = f"s3://{s3['bucket']}/hamal"
        restic_repo = f"s3:{s3['endpoint']}/{s3['bucket']}/restic"
    if len(disks) == 1:
        h = [hamal, "sync", str(disks[0]), store, "--disk", "d0", "--key-file", str(key), "--no-progress"]
        restore = [hamal, "restore", store, str(out / "hamal" / "d0.raw"), "--disk", "d0"]
        steps = (h, [*h, "--changed", str(changes[0])], [*restore, "--key-file", str(key), "--no-progress"])
    else:
        job = [str(Path(hamal).parent / "python"), str(Path(__file__).parent / "bench_job.py")]
        files = [str(d) for d in disks]
        steps = (
            [*job, "backup", store, str(key), *files],
            [*job, "again", store, str(key), *files, "--", *map(str, changes)],
            [*job, "restore", store, str(key), str(out / "hamal"), str(len(disks))],
        )
    (out / "hamal").mkdir(parents=True, exist_ok=True)
    hamal_tool = Tool("hamal", *steps, [out / "hamal" / f"d{i}.raw" for i in range(len(disks))])
    files = [str(d) for d in disks]
    restic = ["restic", "-q", "-r", restic_repo, "--compression", "auto"]
    restic_tool = Tool(
        "restic",
        [*restic, "backup", *files],
        [*restic, "backup", *files],
        [*restic, "restore", "latest", "--target", str(out / "restic")],
        [out / "restic" / f.lstrip("/") for f in files],
    )
    result = [hamal_tool, restic_tool]
    if s3 is None:
        borg_repo = str(r / "borg")
        borg = ["borg", "create", "--compression", "zstd,3"]
        result.append(
            Tool(
                "borg",
                [*borg, f"{borg_repo}::one", *files],
                [*borg, f"{borg_repo}::two", *files],
                [
                    "sh",
                    "-c",
                    f"mkdir -p {out / 'borg'} && cd {out / 'borg'} && borg extract {borg_repo}::two",
                ],
                [out / "borg" / f.lstrip("/") for f in files],
            )
        )
    return result


def puts_alone(bucket, disks: list[Path], changes: list[Path], run: int) -> float:
    """The server's own floor for the incremental: the changed pieces of every disk, read into
    memory first, as plain PUTs from as many boto3 threads as hamal uploads with (8 for one
    disk, 3 per disk when the budget is shared by several), then `sync`."""
    threads = 8 if len(disks) == 1 else 3 * len(disks)
    blobs = []
    for disk, changed in zip(disks, changes):
        with open(disk, "rb") as f:
            blobs += [os.pread(f.fileno(), n, off) for off, n in json.loads(changed.read_text())]
    os.sync()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda i: bucket.client.put_object(Bucket=bucket.name, Key=f"floor/{run}/{i}", Body=blobs[i]),
                range(len(blobs)),
            )
        )
    os.sync()
    return time.perf_counter() - t0


def gets_alone(bucket, keys: list[str]) -> float:
    """The server's own floor for the restore: the first version's chunk objects (as many as
    the restore reads; 20 of them per disk replaced since) as plain GETs from 16 boto3 threads,
    bodies read and dropped: no decrypting, decompressing, hashing or writing."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: bucket.client.get_object(Bucket=bucket.name, Key=k)["Body"].read(), keys))
    return time.perf_counter() - t0


def init_repos(work: Path, s3: dict | None) -> None:
    r = work / "repos"
    shutil.rmtree(r, ignore_errors=True)
    shutil.rmtree(work / "restores", ignore_errors=True)
    r.mkdir(parents=True)
    (work / "restores").mkdir()
    restic_repo = str(r / "restic") if s3 is None else f"s3:{s3['endpoint']}/{s3['bucket']}/restic"
    subprocess.run(["restic", "-q", "-r", restic_repo, "init", "--repository-version", "2"], check=True)
    if s3 is None:
        subprocess.run(
            ["borg", "init", "--encryption", "repokey-blake2", str(r / "borg")],
            check=True,
            capture_output=True,
        )


def run(hamal: str, work: Path, runs: int, s3: dict | None, bucket=None, count: int = 1) -> list[dict]:
    """One 2 GiB disk (0.8 GiB data), or `count` disks of 1 GiB (0.4 GiB data each) at once."""
    os.environ.update({"RESTIC_PASSWORD": PASSWORD, "BORG_PASSPHRASE": PASSWORD})
    base = work / "backup"
    base.mkdir(exist_ok=True)
    if count == 1:
        pristine = [work / "bk-2g.raw"]
        make_image(pristine[0], 2 * GIB, 820 * MIB, seed=21)
    else:
        pristine = [work / f"bk-1g-{i}.raw" for i in range(count)]
        for i, p in enumerate(pristine):
            make_image(p, GIB, 410 * MIB, seed=31 + i)
    # Names of their own per case: nothing of the other case's disks is ever read as this one's.
    disks = [base / f"disk{i}-of-{count}.raw" for i in range(count)]
    changes = [base / f"changed{i}-of-{count}.json" for i in range(count)]
    steps = ("first", "incremental", "restore")
    rows: dict[str, dict] = {}
    floor: list[float] = []  # PUTs alone, per run
    get_floor: list[float] = []  # GETs alone, per run
    for i in range(runs):
        if bucket is not None:
            bucket.empty("")
        init_repos(base, s3)
        for p, d in zip(pristine, disks):
            subprocess.run(["cp", "--sparse=always", str(p), str(d)], check=True)
            warm(d)
        ts = tools(hamal, base, disks, changes, s3)
        # Each run starts every step with the next tool: the one before leaves its freed memory
        # behind, which this VM hands back to its host, so the next one's first touches of
        # memory cost ~0.5 ms per MiB (the likely reason why hamal, always first before, took
        # twice the CPU for the incremental into a directory that it takes run alone).
        ts = ts[i % len(ts) :] + ts[: i % len(ts)]
        for t in ts:  # first backups, every tool on the same content
            _note(rows, t.name, "first", timed_cpu(t.first))
        first_chunks = [] if bucket is None else [o["Key"] for o in bucket.objects("hamal/chunks/")]
        for n, (d, c) in enumerate(zip(disks, changes)):
            change(d, c, seed=i * 100 + n)
            warm(d)
        expect = [digest(d) for d in disks]
        for t in ts:
            _note(rows, t.name, "incremental", timed_cpu(t.again))
        if bucket is not None:
            floor.append(puts_alone(bucket, disks, changes, i))
        for t in ts:
            _note(rows, t.name, "restore", timed_cpu(t.restore))
            bad = [o.name for o, e in zip(t.outs, expect) if digest(o) != e]
            if bad:  # which run and which disks, to tell a flaw from a disturbed run
                print(f"{t.name} restore, run {i + 1}: {', '.join(bad)} differ from the source", flush=True)
            rows[f"{t.name} restore"]["ok"] = rows[f"{t.name} restore"].get("ok", True) and not bad
        if bucket is not None:
            get_floor.append(gets_alone(bucket, first_chunks))
        if s3 is None:
            for t in ts:
                rows[f"{t.name} first"].setdefault("stored", []).append(du(base / "repos" / t.name))
        else:
            for t in ts:
                rows[f"{t.name} first"].setdefault("stored", []).append(bucket.stored_bytes(f"{t.name}/"))
        shutil.rmtree(base / "restores", ignore_errors=True)
    out = []
    for name, v in rows.items():
        out.append(
            {
                "name": name,
                "median_s": statistics.median(v["times"]),
                "times": v["times"],
                "cpu_s": statistics.median(v["cpu"]),
                "peak_rss": v["rss"],
                "stored_bytes": int(statistics.median(v["stored"])) if "stored" in v else None,
                "ok": v.get("ok", True),
            }
        )
    where = "radosgw (S3)" if s3 else "a local directory"
    what = "2 GiB image, 0.8 GiB data" if count == 1 else f"{count} images of 1 GiB, 0.4 GiB data each"
    print(f"\nBackup tools into {where}: {what}, then {CHANGED // MIB} MiB changed in each")
    print(
        f"{'case':<24} {'median s':>9} {'hamal/it':>9} {'peak RSS MiB':>13} {'CPU s':>7} {'stored MiB':>11}"
    )
    for step in steps:
        base_s = rows[f"hamal {step}"]
        for r in (x for x in out if x["name"].endswith(step)):
            stored = f"{r['stored_bytes'] / MIB:>11.0f}" if r["stored_bytes"] else f"{'':>11}"
            ratio = statistics.median(base_s["times"]) / r["median_s"]
            print(
                f"{r['name']:<24} {r['median_s']:>9.3f} {ratio:>9.2f} {r['peak_rss'] / MIB:>13.1f} "
                f"{r['cpu_s']:>7.2f} {stored}{'' if r['ok'] else '  MISMATCH'}"
            )
    puts = sum(len(json.loads(c.read_text())) for c in changes)
    changed = f"the same {count} x {CHANGED // MIB} MiB as {puts} PUTs from memory"
    restored = f"the first version's {len(first_chunks)} chunk objects as GETs"
    floors = (("PUTs alone", "incremental", floor, changed), ("GETs alone", "restore", get_floor, restored))
    for name, step, times, what in floors:
        if times:
            f = statistics.median(times)
            h = statistics.median(rows[f"hamal {step}"]["times"])
            print(f"radosgw alone, {what} (boto3): {f:.3f} s; hamal's {step} {h / f:.2f}x that")
            out.append({"name": f"{name} {step}", "median_s": f, "times": times, "ok": True})
    return out


def _note(rows: dict[str, dict], tool: str, step: str, measured: tuple[float, int, float]) -> None:
    t, rss, cpu = measured
    r = rows.setdefault(f"{tool} {step}", {"times": [], "cpu": [], "rss": 0})
    r["times"].append(t)
    r["cpu"].append(cpu)
    r["rss"] = max(r["rss"], rss)


def backup_benches(hamal: str, work: Path, runs: int) -> dict[str, list[dict]]:
    out = {"backup_dir": run(hamal, work, runs, None), "backup_dir_8": run(hamal, work, runs, None, count=8)}
    from bench_store import Bucket, write_conf
    from ceph_cluster import ACCESS_KEY, SECRET_KEY, CephCluster

    cluster = CephCluster(work / "ceph", bluestore_gib=32)
    cluster.start()
    try:
        write_conf(work, cluster)
        bucket = Bucket(cluster, "hamal-backup")
        os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        os.environ.pop("AWS_CA_BUNDLE", None)
        s3 = {"endpoint": cluster.endpoint, "bucket": "hamal-backup"}
        out["backup_s3"] = run(hamal, work, runs, s3, bucket)
        out["backup_s3_8"] = run(hamal, work, runs, s3, bucket, count=8)
    finally:
        cluster.stop()
    return out
