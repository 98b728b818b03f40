"""``hamal sync`` and ``hamal verify`` end to end on real sparse files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import MIB, allocated, make_image, run_hamal, sha256


def test_full_sync_is_identical_and_keeps_holes(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.raw"
    r = run_hamal("sync", str(image), f"file:{target}", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["mode"] == "full"
    assert sha256(image) == sha256(target)
    assert summary["bytes_written"] == allocated(image)
    # Holes stay holes: the target allocates about what the source does, far below its size.
    assert allocated(target) <= allocated(image) * 1.01 + 256 * 1024
    assert allocated(target) < os.path.getsize(target) * 0.75


def test_incremental_rewrites_only_the_changed_ranges(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.raw"
    assert run_hamal("sync", str(image), str(target)).code == 0
    changed = [(3 * MIB + 512, 8192), (40 * MIB, 2 * MIB)]
    with open(image, "r+b") as f:
        for off, ln in changed:
            f.seek(off)
            f.write(os.urandom(ln))
    # A marker the sync must not touch: outside the changed ranges, target differs from source.
    with open(target, "r+b") as f:
        f.seek(20 * MIB)
        f.write(b"MARKER" * 100)
    changed_file = tmp_path / "changed.json"
    changed_file.write_text(json.dumps(changed))
    r = run_hamal("sync", str(image), str(target), "--changed", str(changed_file), "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["mode"] == "incremental"
    assert s["bytes_total"] == 8192 + 2 * MIB
    with open(target, "rb") as t, open(image, "rb") as src:
        for off, ln in changed:
            t.seek(off)
            src.seek(off)
            assert t.read(ln) == src.read(ln)
        t.seek(20 * MIB)
        assert t.read(600) == b"MARKER" * 100
    # Once the marker is gone again, the two are identical.
    with open(target, "r+b") as t, open(image, "rb") as src:
        src.seek(20 * MIB)
        t.seek(20 * MIB)
        t.write(src.read(600))
    assert sha256(image) == sha256(target)


def test_zero_chunks_become_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    with open(src, "wb") as f:  # allocated, but all zero
        f.write(bytes(16 * MIB))
    r = run_hamal("sync", str(src), str(dst), "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["bytes_zero"] == 16 * MIB and s["bytes_written"] == 0
    assert allocated(dst) < MIB
    assert sha256(src) == sha256(dst)


def test_checksum_digest_matches_verify(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.raw"
    for algo in ("blake3", "sha256"):
        if target.exists():
            target.unlink()
        s = json.loads(run_hamal("sync", str(image), str(target), "--checksum", algo, "--json").out)
        v = run_hamal("verify", str(image), str(target), "--checksum", algo, "--json")
        assert v.code == 0, v.err
        assert json.loads(v.out)["content_digest"] == s["content_digest"]


def test_verify_reports_the_offset_of_a_difference(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.raw"
    assert run_hamal("sync", str(image), str(target)).code == 0
    assert run_hamal("verify", str(image), str(target)).code == 0
    with open(target, "r+b") as f:
        f.seek(9 * MIB + 5)
        f.write(b"\x01")
    r = run_hamal("verify", str(image), str(target))
    assert r.code == 3
    assert "1 of" in r.err and str(8 * MIB) in r.err  # the 4 MiB chunk holding the byte


def test_forced_pread_fallback(image: Path, tmp_path: Path) -> None:
    for args, env, want in [
        (["--io", "pread"], {}, "pread"),
        ([], {"HAMAL_FORCE_PREAD": "1"}, "pread"),
    ]:
        target = tmp_path / f"t-{want}-{len(args)}.raw"
        r = run_hamal("sync", str(image), str(target), "--json", *args, env=env)
        assert r.code == 0, r.err
        assert json.loads(r.out)["io_backend"] == want
        assert sha256(image) == sha256(target)


def test_io_uring_is_used_when_available(image: Path, tmp_path: Path) -> None:
    import hamal

    status = hamal.io_uring_status()
    if status is not None:
        print(f"io_uring unavailable here: {status}")
        r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--io", "uring")
        assert r.code == 1 and "io_uring" in r.err
        return
    # Batched reads (into a chunk store) go through the ring; the local file-to-file copy, one
    # piece at a time per thread, uses plain pread/pwrite unless told otherwise.
    for target, args, want in [
        (f"dir:{tmp_path / 'store'}", ["--disk", "d"], "io_uring"),
        (str(tmp_path / "t.raw"), [], "pread"),
        (str(tmp_path / "u.raw"), ["--io", "uring"], "io_uring"),
    ]:
        r = run_hamal("sync", str(image), target, "--json", *args)
        assert r.code == 0, r.err
        assert json.loads(r.out)["io_backend"] == want, target
    assert sha256(image) == sha256(tmp_path / "t.raw") == sha256(tmp_path / "u.raw")


def test_human_summary_and_multiple_disk_ids(image: Path, tmp_path: Path) -> None:
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--disk-id", "vm1-disk0")
    assert r.code == 0, r.err
    assert r.out.startswith("vm1-disk0: full sync of") and "written" in r.out


def test_large_sparse_disk_costs_its_data_not_its_size(tmp_path: Path) -> None:
    src, dst = tmp_path / "big.raw", tmp_path / "big-t.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, almost all hole
        f.seek(123 * MIB)
        f.write(os.urandom(MIB))
    r = run_hamal("sync", str(src), str(dst), "--json", timeout=60)
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["size"] == 1 << 40 and s["bytes_written"] == MIB
    with open(dst, "rb") as f:
        f.seek(123 * MIB)
        with open(src, "rb") as g:
            g.seek(123 * MIB)
            assert f.read(MIB) == g.read(MIB)


def test_make_image_helper_is_sparse(tmp_path: Path) -> None:
    p = tmp_path / "x.raw"
    make_image(p, 16 * MIB, fill=0.25)
    assert 0 < allocated(p) < 16 * MIB


def test_demo_runs_the_service_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    r = run_hamal("demo", "--dir", str(work), "--size", "64M", timeout=300)
    assert r.code == 0, r.err
    # 2 VMs x 2 disks x 3 rounds, each version checked against its disk at its cycle.
    assert "demo ok: 12 versions" in r.out and r.out.count("identical to the disk at its cycle") == 12, r.out
    assert "round 3" in r.out and "web  kvm VM web" in r.out, "hamal status is shown"
    assert not any((work / "lib" / "journal").iterdir())
    assert {"hamal-period.log", "vm-web-demo-web.log", "vm-db-demo-db.log"} <= {
        p.name for p in (work / "log").iterdir()
    }


def test_a_quiet_sync_never_imports_logging_yet_warnings_show(image: Path, tmp_path: Path) -> None:
    """Python's logging is imported only once something is logged (it was a fifth of a short
    sync's start-up); the engine's warnings still reach stderr in the CLI's format."""
    conf = tmp_path / "hamal.conf"
    conf.write_text("")  # no "hamal.conf not found" warning
    env = {"HAMAL_CONF": str(conf), "PYTHONPROFILEIMPORTTIME": "1"}
    r = run_hamal("sync", str(image), str(tmp_path / "a.raw"), "--no-progress", env=env)
    assert r.code == 0, r.err
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.err.splitlines() if ln.startswith("import time:")}
    assert "hamal._native" in imported and "logging" not in imported, sorted(imported)

    larger = tmp_path / "larger.raw"
    larger.write_bytes(bytes(os.path.getsize(image) + MIB))
    r = run_hamal("sync", str(image), str(larger), "--no-progress", env=env)
    assert r.code == 0, r.err
    assert "hamal: WARNING: target is larger than the source" in r.err, r.err
