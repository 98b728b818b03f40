"""A block device as the target (a loop device): writes aligned to its blocks go to the device
with O_DIRECT, past the host's page cache; unaligned ones (a changed list's odd offsets) go
through the page cache. Either way the device reads back as the source. Needs root and losetup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MIB, make_image, run_hamal, sha256

SIZE = 64 * MIB


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Path]:
    """A loop device of SIZE bytes full of old random data (so holes must be zeroed)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup (util-linux) for a loop device")
    back = tmp_path / "back.img"
    back.write_bytes(os.urandom(SIZE))
    r = subprocess.run(["losetup", "-f", "--show", str(back)], capture_output=True, text=True, check=True)
    dev = Path(r.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def _conf(tmp_path: Path) -> Path:
    """A hamal.conf keeping the journal (and locks) under tmp_path."""
    conf = tmp_path / "hamal.conf"
    conf.write_text(f"[DEFAULT]\nhamal_lib_dir = {tmp_path / 'lib'}\n")
    return conf


def _direct_descriptors(pid: int, dev: Path) -> list[bool]:
    """For each descriptor of process `pid` open on `dev`: whether it has O_DIRECT."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != str(dev):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:  # closed meanwhile
            continue
        flags = int(next(line.split()[1] for line in info.splitlines() if line.startswith("flags:")), 8)
        found.append(bool(flags & os.O_DIRECT))
    return found


def test_a_block_device_is_written_with_o_direct(device: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, SIZE, seed=21, fill=0.6)
    cmd = [sys.executable, "-m", "hamal", "sync", str(src), str(device), "--bwlimit", "16M", "--no-progress"]
    env = {**os.environ, "HAMAL_CONF": str(_conf(tmp_path))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: set[bool] = set()
    while proc.poll() is None:  # about 2 s at 16 MiB/s
        seen.update(_direct_descriptors(proc.pid, device))
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert True in seen, f"no descriptor of {device} had O_DIRECT while the sync ran: {seen}"
    assert sha256(device) == sha256(src)


def test_unaligned_changes_go_through_the_page_cache(device: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_image(src, SIZE, seed=22, fill=0.5)
    env = {"HAMAL_CONF": str(_conf(tmp_path))}
    r = run_hamal("sync", str(src), str(device), "--no-progress", env=env)
    assert r.code == 0, r.err
    assert sha256(device) == sha256(src)

    # Changes at odd offsets and lengths beside aligned ones, some inside holes, some zeroing data.
    changed = [[1000, 5], [MIB + 17, 300_000], [5 * MIB, 2 * MIB], [9 * MIB - 1, 3], [SIZE - 7, 7]]
    with open(src, "r+b") as f:
        for i, (offset, length) in enumerate(changed):
            f.seek(offset)
            f.write(bytes(length) if i == 2 else os.urandom(length))
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    r = run_hamal(
        "sync", str(src), str(device), "--changed", str(tmp_path / "changed.json"), "--json", env=env
    )
    assert r.code == 0, r.err
    assert sha256(device) == sha256(src)
