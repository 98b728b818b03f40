"""A target whose writes fail only at write-back (the page cache took them): a loop device over
a file on a tiny tmpfs, so the device returns EIO once the tmpfs is full. The sync must fail
and say so; it must not commit. Needs root, mount and losetup (skipped, saying why, elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MIB, one_error_line, run_hamal


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs and set up a loop device"
    if not shutil.which("losetup"):
        return "losetup is not installed (util-linux)"
    return None


@pytest.fixture
def failing_device(tmp_path: Path) -> Iterator[Path]:
    why = _why_not()
    if why:
        pytest.skip(why)
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        back = small / "back.img"
        with open(back, "wb") as f:
            f.truncate(128 * MIB)  # sparse: only 8 MiB of it can ever be written
        r = subprocess.run(["losetup", "-f", "--show", str(back)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop device: {r.stderr.strip()}")
        dev = Path(r.stdout.strip())
        try:
            yield dev
        finally:
            subprocess.run(["losetup", "-d", str(dev)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_write_back_error_fails_the_sync(failing_device: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(96 * MIB))
    journal = tmp_path / "journal"
    r = run_hamal("sync", str(src), str(failing_device), "--journal", str(journal), "--no-progress")
    line = one_error_line(r.err)
    assert r.code != 0 and str(failing_device) in line and "Input/output error" in line, r.err
    # Not committed: the journal stays for a rerun instead of being removed by a commit.
    assert journal.exists()
