"""Shared helpers: sparse test images and a runner for the installed ``hamal`` command."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

MIB = 1 << 20


def make_image(path: Path, size: int, seed: int = 1, fill: float = 0.5) -> None:
    """A sparse image: each 1 MiB block is random data with probability ``fill``, else a hole."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for block in range(size // MIB):
            if rng.random() < fill:
                f.seek(block * MIB)
                f.write(rng.randbytes(MIB))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_hamal(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, wrap: list[str] | None = None
) -> Result:
    """Runs ``python -m hamal ARGS`` (the installed package) with no config file unless given;
    ``wrap`` is a command prefix such as ``setpriv ...``."""
    full_env = {**os.environ, "HAMAL_CONF": "/nonexistent/hamal.conf", **(env or {})}
    p = subprocess.run(
        [*(wrap or []), sys.executable, "-m", "hamal", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def wait_until(check, what: str, timeout: float = 30) -> None:
    """Polls ``check`` until it holds; fails naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_error_line(err: str) -> str:
    # Warnings (such as the missing config, said once) may precede; the error is one line.
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("hamal: WARNING: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("hamal: error: "), err
    return lines[0]


#: Set by tools/test (and so CI): every prerequisite is installed there, so a skip is a failure.
REQUIRE_ALL = os.environ.get("HAMAL_TEST_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under tools/test, where every prerequisite must be installed: {reason}"
    return None


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "source.raw"
    make_image(p, 64 * MIB)
    return p


# NBD server fixtures (qemu-nbd, nbdkit on private unix sockets).
from nbd_servers import servers, sockdir  # noqa: E402, F401

# S3 fixtures (radosgw on a throw-away single-node Ceph).
from s3_server import ceph, s3  # noqa: E402, F401
