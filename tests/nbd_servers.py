"""Real NBD servers for the tests: qemu-nbd and nbdkit on private unix sockets, stopped
after each test. Nothing listens on TCP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (apt-get install {package}); tools/test installs it")


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Server:
    def __init__(self, cmd: list[str], sock: Path) -> None:
        self.cmd, self.sock = cmd, sock
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Server:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not listening(self.sock):  # the file appears at bind(), a moment before listen()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"{self.cmd[0]} did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        """What the server printed (after ``stop``)."""
        return self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""


def qemu_nbd(
    image: Path,
    sock: Path,
    *,
    fmt: str = "raw",
    read_only: bool = True,
    bitmap: str | None = None,
    export: str | None = None,
    extra: list[str] | None = None,
    shared: int | None = 8,
) -> Server:
    """``shared=None`` keeps qemu-nbd's default: one client at a time, no multi-conn."""
    need("qemu-nbd", "qemu-utils")
    cmd = ["qemu-nbd", "-f", fmt, "-t", "-k", str(sock)]
    cmd += ["-e", str(shared)] if shared else []
    cmd += ["-r"] if read_only else []
    cmd += ["-B", bitmap] if bitmap else []
    cmd += ["-x", export] if export else []
    return Server([*cmd, *(extra or []), str(image)], sock)


def nbdkit_file(image: Path, sock: Path) -> Server:
    need("nbdkit", "nbdkit")
    return Server(["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"], sock)


def qemu_io(image: Path, *cmds: str) -> None:
    """Runs qemu-io commands (``write -P 0x11 0 1M``, ...) on a qcow2 image."""
    need("qemu-io", "qemu-utils")
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[dict]:
    need("nbdinfo", "libnbd-bin")
    out = subprocess.run(
        ["nbdinfo", "--json", f"--map={context}", uri], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, ln in sorted(extents):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln)
        else:
            out.append((off, ln))
    return out


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(server: Server) -> Server:
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def sockdir():
    """A short directory for unix sockets (paths are limited to 108 bytes; pytest's are long)."""
    d = Path(tempfile.mkdtemp(prefix="hnbd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
