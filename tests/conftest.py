"""Shared helpers: sparse test images and a runner for the installed ``hamal`` command."""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

MIB = 1 << 20

# The defaults, except where runs keep their locks and journals: a folder of this test session,
# not the machine's /var/lib/hamal. Runs that need no config of their own use this one, also
# those started without naming one (HAMAL_CONF is inherited).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="hamal-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, True)
DEFAULT_CONF = _SESSION_DIR / "hamal.conf"
DEFAULT_CONF.write_text(
    f"[DEFAULT]\nhamal_lib_dir = {_SESSION_DIR / 'lib'}\nhamal_info_path = {_SESSION_DIR / 'hamal_info'}\n"
)
os.environ.setdefault("HAMAL_CONF", str(DEFAULT_CONF))


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
    """Runs ``python -m hamal ARGS`` (the installed package) with the defaults unless given;
    ``wrap`` is a command prefix such as ``setpriv ...``."""
    full_env = {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF), **(env or {})}
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
