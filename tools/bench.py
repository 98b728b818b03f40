"""Benchmark driver for tools/bench: times whole commands (plus `sync`, since hamal fsyncs
before it commits and the peers do not) with warm source page cache, and records each
command's peak RSS from wait4()."""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


def make_image(path: Path, size: int, data_bytes: int, seed: int) -> None:
    """Sparse image with about `data_bytes` of random data in scattered 1-8 MiB extents (they
    may overlap, so somewhat less is allocated; the reports print the real amount)."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        written = 0
        while written < data_bytes:
            length = min(rng.randint(1, 8) * MIB, data_bytes - written)
            offset = rng.randrange(0, (size - length) // MIB) * MIB
            f.seek(offset)
            f.write(os.urandom(length))
            written += length
    tmp.rename(path)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def digest(path: Path) -> str:
    """Content digest that reads only allocated extents: (offset, block) for every non-zero
    1 MiB block, so holes and written zeros compare equal, as they must."""
    h = hashlib.blake2b()
    zero = bytes(MIB)
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        size = os.lseek(fd, 0, os.SEEK_END)  # also for a block device (st_size is 0 there)
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                data, hole = pos, size  # a device: no SEEK_DATA, every block is read
            block = data // MIB * MIB
            while block < hole:
                chunk = os.pread(fd, MIB, block)
                if chunk != zero[: len(chunk)]:
                    h.update(block.to_bytes(8, "little"))
                    h.update(chunk)
                block += MIB
            pos = block
    return h.hexdigest()


def timed(cmd: list[str]) -> tuple[float, int]:
    """Seconds for `cmd` followed by `sync`, and the command's own peak RSS in bytes."""
    elapsed, rss, _ = timed_cpu(cmd)
    return elapsed, rss


def timed_cpu(cmd: list[str]) -> tuple[float, int, float]:
    """Seconds for `cmd` followed by `sync`, the command's own peak RSS in bytes (of its largest
    process) and its CPU seconds (user + system, its children's included). GNU time measures
    them: Linux carries a process's RSS high-water mark across exec, so a child of this (larger)
    Python process would report at least this process's size."""
    os.sync()
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"hamal-bench-rss-{os.getpid()}"
    t0 = time.perf_counter()
    p = subprocess.run(
        ["/usr/bin/time", "-o", str(rss_file), "-f", "%M %U %S", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"benchmark command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    os.sync()
    elapsed = time.perf_counter() - t0
    peak_kib, user, system = rss_file.read_text().split()[-3:]
    rss_file.unlink()
    return elapsed, int(peak_kib) * 1024, float(user) + float(system)


def run_cases(cases: list[tuple[str, list[str]]], dst: Path, runs: int, expect: str) -> list[dict]:
    """Runs every case once untimed, checking its output, then `runs` times, interleaved round
    by round so drift in the machine's disk speed hits every tool alike, each round in another
    order. The untimed round takes the cost of first touching memory: on a VM whose free pages
    go back to the host it is ~0.5 ms per MiB, and it fell on whichever tool ran first (up to
    2.5x its later time)."""
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    cpu: dict[str, list[float]] = {name: [] for name, _ in cases}
    rss: dict[str, int] = {name: 0 for name, _ in cases}
    ok: dict[str, bool] = {}
    for round_ in range(runs + 1):
        # Each round starts with the next tool, so none always follows the same one (the one
        # before leaves its freed memory and deleted blocks behind).
        shift = round_ % len(cases)
        for name, cmd in cases[shift:] + cases[:shift]:
            if dst.is_block_device():  # zeroed, so a tool that wrote nothing cannot pass
                subprocess.run(["blkdiscard", str(dst)], check=True)
            else:
                dst.unlink(missing_ok=True)
            # The blocks just freed are discarded at the file system's next commit (mounted with
            # `discard` on these VMs): in the next tool's time, at random, unless synced first.
            os.sync()
            t, r, c = timed_cpu(cmd)
            rss[name] = max(rss[name], r)
            if round_ == 0:
                ok[name] = digest(dst) == expect
                continue
            times[name].append(t)
            cpu[name].append(c)
    return [
        {
            "name": n,
            "median_s": statistics.median(times[n]),
            "times": times[n],
            "peak_rss": rss[n],
            "cpu_s": statistics.median(cpu[n]),
            "ok": ok[n],
        }
        for n, _ in cases
    ]


def full_bench(hamal: str, work: Path, runs: int) -> list[dict]:
    src, dst = work / "full-4g.raw", work / "full-out.raw"
    make_image(src, 4 * GIB, 2 * GIB, seed=1)
    warm(src)
    expect = digest(src)
    cases = [
        ("hamal sync", [hamal, "sync", str(src), str(dst), "--no-progress"]),
        ("cp --sparse=always", ["cp", "--sparse=always", str(src), str(dst)]),
        ("qemu-img convert -O raw", ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(dst)]),
        # nbdcopy writes into an existing destination of the source's size.
        ("nbdcopy", ["sh", "-c", f"truncate -s {src.stat().st_size} {dst} && nbdcopy {src} {dst}"]),
    ]
    results = run_cases(cases, dst, runs, expect)
    dst.unlink(missing_ok=True)
    return results


def incremental_bench(hamal: str, work: Path, runs: int) -> list[dict]:
    """The same changed bytes (1% of the 8 GiB image's 4 MiB chunks, scattered over the whole
    disk) synced with --changed on an 8 GiB and on a 64 GiB image holding 1 GiB of data."""
    chunk = 4 * MIB
    n_changed = (8 * GIB // chunk) // 100
    results = []
    for size in (8 * GIB, 64 * GIB):
        src, dst = work / f"inc-{size // GIB}g.raw", work / f"inc-{size // GIB}g-out.raw"
        make_image(src, size, GIB, seed=size)
        dst.unlink(missing_ok=True)
        subprocess.run(
            [hamal, "sync", str(src), str(dst), "--no-progress"], check=True, stdout=subprocess.DEVNULL
        )
        rng = random.Random(9)
        changed = sorted(rng.sample(range(size // chunk), n_changed))
        with open(src, "r+b") as f:
            for c in changed:
                f.seek(c * chunk)
                f.write(os.urandom(chunk))
        changed_file = work / f"inc-{size // GIB}g.json"
        changed_file.write_text(json.dumps([[c * chunk, chunk] for c in changed]))
        warm(src)
        times, rss = [], []
        for _ in range(runs):
            t, r = timed([hamal, "sync", str(src), str(dst), "--changed", str(changed_file), "--no-progress"])
            times.append(t)
            rss.append(r)
        ok = digest(src) == digest(dst)
        results.append(
            {
                "name": f"incremental {size // GIB} GiB",
                "median_s": statistics.median(times),
                "times": times,
                "peak_rss": max(rss),
                "ok": ok,
                "changed_bytes": n_changed * chunk,
            }
        )
        dst.unlink()
    return results


class NbdExport:
    """qemu-nbd serving `image` read-only on a unix socket in `work` while in the `with`."""

    def __init__(
        self, image: Path, work: Path, fmt: str = "raw", bitmap: str | None = None, shared: int | None = 8
    ) -> None:
        """``shared=None``: qemu-nbd's default, one client at a time and no multi-conn."""
        self.sock = work / "bench-nbd.sock"
        self.cmd = ["qemu-nbd", "-r", "-f", fmt, "-t", "-k", str(self.sock)]
        self.cmd += ["-e", str(shared)] if shared else []
        self.cmd += (["-B", bitmap] if bitmap else []) + [str(image)]
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def __enter__(self) -> NbdExport:
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.cmd)
        while (
            not self.sock.exists()
            or subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True).returncode
        ):
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def nbd_full_bench(hamal: str, work: Path, runs: int) -> list[dict]:
    src, dst = work / "full-4g.raw", work / "nbd-out.raw"
    make_image(src, 4 * GIB, 2 * GIB, seed=1)
    warm(src)
    expect = digest(src)
    size = src.stat().st_size
    results = []
    for shared, label in ((8, "-e 8"), (None, "default, one client")):
        with NbdExport(src, work, shared=shared) as e:
            cases = [
                (f"hamal sync (qemu-nbd {label})", [hamal, "sync", e.uri, str(dst), "--no-progress"]),
                (f"nbdcopy ({label})", ["sh", "-c", f"truncate -s {size} {dst} && nbdcopy '{e.uri}' {dst}"]),
            ]
            if shared:
                cases.append(
                    (
                        "qemu-img convert (nbd)",
                        ["qemu-img", "convert", "-f", "raw", "-O", "raw", e.uri, str(dst)],
                    )
                )
            results += run_cases(cases, dst, runs, expect)
    dst.unlink(missing_ok=True)
    return results


def qemu_io(image: Path, cmds: list[str]) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, stdout=subprocess.DEVNULL)


def nbd_incremental_bench(hamal: str, work: Path, runs: int) -> list[dict]:
    """qcow2 images of 8 and 64 GiB with 1 GiB of data; a persistent bitmap; the same 80 MiB
    (1% of the 8 GiB image's 4 MiB chunks) written at scattered offsets; `sync --bitmap`."""
    chunk = 4 * MIB
    n_dirty = (8 * GIB // chunk) // 100
    results = []
    for size in (8 * GIB, 64 * GIB):
        img, dst = work / f"inc-{size // GIB}g.qcow2", work / f"inc-{size // GIB}g-nbd-out.raw"
        img.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size)], check=True)
        rng = random.Random(size)
        data_chunks = rng.sample(range(size // chunk), GIB // chunk)
        qemu_io(img, [f"write -P {c % 250 + 1} {c * chunk} {chunk}" for c in data_chunks])
        with NbdExport(img, work, fmt="qcow2") as e:
            subprocess.run(
                [hamal, "sync", e.uri, str(dst), "--no-progress"], check=True, stdout=subprocess.DEVNULL
            )
        subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
        dirty = sorted(random.Random(9).sample(range(size // chunk), n_dirty))
        qemu_io(img, [f"write -P 7 {c * chunk} {chunk}" for c in dirty])
        times, rss = [], []
        with NbdExport(img, work, fmt="qcow2", bitmap="b0") as e:
            for _ in range(runs):
                t, r = timed([hamal, "sync", e.uri, str(dst), "--bitmap", "b0", "--no-progress"])
                times.append(t)
                rss.append(r)
        raw = work / "inc-check.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
        ok = digest(raw) == digest(dst)
        raw.unlink()
        results.append(
            {
                "name": f"bitmap incremental {size // GIB} GiB",
                "median_s": statistics.median(times),
                "times": times,
                "peak_rss": max(rss),
                "ok": ok,
                "changed_bytes": n_dirty * chunk,
            }
        )
        dst.unlink()
        img.unlink()
    return results


def data_gib(work: Path) -> float:
    """Allocated data of the full-sync test image, in GiB."""
    return (work / "full-4g.raw").stat().st_blocks * 512 / GIB


def report(title: str, rows: list[dict], base: float) -> None:
    print(f"\n{title}")
    print(f"{'case':<26} {'median s':>9} {'ratio':>7} {'peak RSS MiB':>13} {'CPU s':>7}  content")
    for r in rows:
        cpu = f"{r['cpu_s']:>7.2f}" if "cpu_s" in r else f"{'-':>7}"
        print(
            f"{r['name']:<26} {r['median_s']:>9.3f} {r['median_s'] / base:>7.2f} "
            f"{r['peak_rss'] / MIB:>13.1f} {cpu}  {'identical' if r['ok'] else 'MISMATCH'}"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hamal", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="bench-work")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-incremental", action="store_true")
    groups = [
        "file",
        "nbd",
        "store",
        "rbd",
        "vddk",
        "service",
        "mass",
        "vmware",
        "openstack",
        "fc",
        "local",
        "backup",
    ]
    ap.add_argument("--only", choices=groups, help="run only one group of cases")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # One bench per work directory: two would overwrite each other's images mid-case (a peer
    # that rescans its input then backs up the other run's content and fails the check).
    lock = open(work / ".bench.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"tools/bench: another bench is running in {work}; wait for it or pass --work", file=sys.stderr)
        return 2
    os.environ["HAMAL_CONF"] = str(work / "hamal.conf")  # defaults; keeps /etc out of it
    (work / "hamal.conf").write_text("")
    file_cases, nbd_cases = a.only in (None, "file"), a.only in (None, "nbd")
    # (key, selected, run, title, base): `base` picks the row the ratios are taken against.
    suites = [
        (
            "full",
            file_cases and not a.skip_full,
            full_bench,
            lambda r: (
                f"Full sync, 4 GiB sparse image ({data_gib(work):.1f} GiB data), time includes sync; "
                "ratio to the fastest peer"
            ),
            lambda r: min(x["median_s"] for x in r[1:]),
        ),
        (
            "incremental",
            file_cases and not a.skip_incremental,
            incremental_bench,
            lambda r: (
                f"Incremental with --changed, {r[0]['changed_bytes'] // MIB} MiB changed; ratio to 8 GiB"
            ),
            lambda r: r[0]["median_s"],
        ),
        (
            "nbd_full",
            nbd_cases and not a.skip_full,
            nbd_full_bench,
            lambda r: (
                "Full copy from a qemu-nbd export of the 4 GiB image, time includes sync; ratio to hamal"
            ),
            lambda r: r[0]["median_s"],
        ),
        (
            "nbd_incremental",
            nbd_cases and not a.skip_incremental,
            nbd_incremental_bench,
            lambda r: (
                f"qcow2 dirty-bitmap incremental over NBD, {r[0]['changed_bytes'] // MIB} MiB dirty; "
                "ratio to 8 GiB"
            ),
            lambda r: r[0]["median_s"],
        ),
    ]
    out: dict[str, list[dict]] = {}
    for key, selected, run, title, base in suites:
        if selected:
            rows = run(a.hamal, work, a.runs)
            report(title(rows), rows, base(rows))
            out[key] = rows
    if a.only in (None, "store"):
        from bench_store import store_benches

        out.update(store_benches(a.hamal, work, min(a.runs, 3)))
    if a.only in (None, "rbd"):
        from bench_rbd import rbd_benches

        out.update(rbd_benches(a.hamal, work, min(a.runs, 3)))
    if a.only in (None, "vddk"):
        from bench_vddk import vddk_benches

        out.update(vddk_benches(a.hamal, work, a.runs))
    if a.only in (None, "service"):
        from bench_service import service_benches

        out.update(service_benches(a.hamal, work, min(a.runs, 3)))
    if a.only in (None, "mass"):
        from bench_mass import mass_benches

        out.update(mass_benches(work))
    if a.only in (None, "vmware"):
        from bench_vmware import vmware_benches

        out.update(vmware_benches(work, min(a.runs, 3)))
    if a.only in (None, "openstack"):
        from bench_openstack import openstack_benches

        out.update(openstack_benches(work, min(a.runs, 3)))
    if a.only in (None, "local"):
        from bench_local import local_benches

        out.update(local_benches(a.hamal, work, a.runs))
    if a.only in (None, "backup"):
        from bench_backup import backup_benches

        out.update(backup_benches(a.hamal, work, min(a.runs, 3)))
    if a.only in (None, "fc"):
        from bench_fc import fc_benches

        out.update(fc_benches(a.hamal, work, min(a.runs, 3)))
    ok = all(r["ok"] for rows in out.values() for r in rows)
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\nresults in {work / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
