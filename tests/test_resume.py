"""A sync killed with SIGKILL resumes from its journal and ends byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_CONF, MIB, make_image, run_hamal, sha256
from hamal import load_config, sync

JOURNAL_HEADER = 48  # magic, plan fingerprint, start time
JOURNAL_RECORD = 48  # chunk index, digest, bytes stored


def journal_records(journal: Path) -> int:
    """Chunks the journal lists in whole batches (each batch: a u32 count, the records, an
    8-byte check), 0 when there is none yet. Counting bytes instead took 19 chunks in 4 batches
    for 20."""
    data = journal.read_bytes() if journal.exists() else b""
    pos, records = JOURNAL_HEADER, 0
    while pos + 4 <= len(data):
        count = int.from_bytes(data[pos : pos + 4], "little")
        end = pos + 4 + count * JOURNAL_RECORD + 8
        if end > len(data):
            break
        records, pos = records + count, end
    return records


def kill_mid_sync(
    src: Path, dst: Path, bwlimit: str, min_chunks: int, journal: Path | None = None, conf: str = ""
) -> None:
    """Starts a slowed ``hamal sync`` (1 MiB chunks, flushed every 0.1 s) and SIGKILLs it once
    the journal (by default ``DST.hamal-journal``) lists at least ``min_chunks`` chunks."""
    journal = journal or Path(str(dst) + ".hamal-journal")
    env = {**os.environ, "HAMAL_CONF": conf or str(DEFAULT_CONF)}
    cmd = [sys.executable, "-m", "hamal", "sync", str(src), str(dst), "--bwlimit", bwlimit]
    cmd += ["--fsync-period", "0.1", "--chunk-size", "1M", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while journal_records(journal) < min_chunks and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_rerun_resumes_and_is_identical(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    journal = Path(str(dst) + ".hamal-journal")
    make_image(src, 256 * MIB, seed=5, fill=0.6)
    kill_mid_sync(src, dst, "32M", min_chunks=20)
    assert journal_records(journal) > 0, "the kill came before anything was journaled"
    assert sha256(src) != sha256(dst), "the kill came after the sync had finished"

    r = run_hamal("sync", str(src), str(dst), "--chunk-size", "1M", "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["bytes_resumed"] >= 20 * MIB, s  # the journaled chunks were not copied again
    assert s["bytes_written"] + s["bytes_zero"] + s["bytes_resumed"] == s["bytes_total"]
    assert s["bytes_written"] < s["bytes_total"]
    assert sha256(src) == sha256(dst)
    assert not journal.exists(), "the journal is removed at commit"


def test_journal_of_another_plan_is_not_trusted(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make_image(src, 32 * MIB, seed=6)
    journal = Path(str(dst) + ".hamal-journal")
    journal.write_bytes(b"HAMALJ01" + bytes(32) + b"garbage")
    r = run_hamal("sync", str(src), str(dst), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["bytes_resumed"] == 0
    assert sha256(src) == sha256(dst)


def test_changed_source_invalidates_the_journal(tmp_path: Path) -> None:
    """A journal written for other source content must not make a rerun skip chunks."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make_image(src, 64 * MIB, seed=7, fill=1.0)
    kill_mid_sync(src, dst, "16M", min_chunks=4)
    with open(src, "r+b") as f:  # the source changes before the rerun (a new snapshot)
        f.write(os.urandom(MIB))
    r = run_hamal("sync", str(src), str(dst), "--chunk-size", "1M", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["bytes_resumed"] == 0
    assert sha256(src) == sha256(dst)


def test_a_block_device_keeps_its_journal_under_hamal_lib_dir_and_resumes(tmp_path: Path) -> None:
    """Not ``/dev/loopN.hamal-journal``: /dev is a tmpfs, and a reboot would lose the journal."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup (util-linux) for a loop device")
    src, back = tmp_path / "src.raw", tmp_path / "back.img"
    make_image(src, 64 * MIB, seed=8, fill=0.7)
    with open(back, "wb") as f:
        f.truncate(64 * MIB)
    lib, conf = tmp_path / "lib", tmp_path / "hamal.conf"
    conf.write_text(f"[DEFAULT]\nhamal_lib_dir = {lib}\n")
    dev = Path(
        subprocess.run(
            ["losetup", "-f", "--show", str(back)], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    try:
        journal = Path(sync.journal_path(load_config(str(conf)), str(dev)))
        assert journal.parent == lib / "journal"
        kill_mid_sync(src, dev, "8M", min_chunks=8, journal=journal, conf=str(conf))
        assert journal_records(journal) > 0, "the kill came before anything was journaled"
        assert not Path(f"{dev}.hamal-journal").exists()

        r = run_hamal(
            "sync", str(src), str(dev), "--chunk-size", "1M", "--json", env={"HAMAL_CONF": str(conf)}
        )
        assert r.code == 0, r.err
        s = json.loads(r.out)
        assert s["bytes_resumed"] >= 8 * MIB, s  # resumed from the journal under hamal_lib_dir
        assert sha256(dev) == sha256(src)
        assert not journal.exists(), "the journal is removed at commit"
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)
