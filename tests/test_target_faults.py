"""A target that fails once it is full: a loop device over a file on a tiny tmpfs, so the device
returns EIO once the tmpfs is full. Aligned writes go to the device with O_DIRECT and fail
themselves; unaligned ones go through the page cache and fail only at write-back. Either way the
sync must fail and say so; it must not commit. Needs root, mount and losetup (skipped, saying
why, elsewhere)."""

from __future__ import annotations

import json
import os
import re
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


# The loop driver passes the tmpfs's ENOSPC to a direct write; write-back sees only EIO, in the
# writer's wait for its oldest ranges or in the commit's fsync, whichever comes first.
@pytest.mark.parametrize(
    "writes, failure",
    [
        ("direct", r"write failed at offset \d+: No space left on device"),
        ("write-back", r"(write-back|fsync) failed.*: Input/output error"),
    ],
)
def test_a_full_device_fails_the_sync(
    failing_device: Path, tmp_path: Path, writes: str, failure: str
) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(96 * MIB))
    journal = tmp_path / "journal"
    args = ["sync", str(src), str(failing_device), "--journal", str(journal), "--no-progress"]
    if writes == "write-back":  # every MiB but its first byte: no write is block-aligned
        changed = tmp_path / "changed.json"
        changed.write_text(json.dumps([[m * MIB + 1, MIB - 1] for m in range(96)]))
        args += ["--changed", str(changed)]
    r = run_hamal(*args)
    line = one_error_line(r.err)
    assert r.code != 0 and re.search(f"target {failing_device}: {failure}", line), r.err
    # Not committed: the journal stays for a rerun instead of being removed by a commit.
    assert journal.exists()
