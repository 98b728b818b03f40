"""Stock NBD servers as users run them: a default qemu-nbd (one client, no multi-conn) as
source and target, nbdkit without structured replies, Debian's nbd-server, and the end of a
failed negotiation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MIB, make_image, one_error_line, run_hamal, sha256
from nbd_servers import Server, need, qemu_nbd


def test_a_default_qemu_nbd_export_as_source_and_target(tmp_path: Path, servers, sockdir) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    make_image(src, 64 * MIB, seed=31)
    server = servers(qemu_nbd(src, sockdir / "one.sock", shared=None))
    t0 = time.monotonic()
    r = run_hamal("sync", server.uri, str(out), "--readers", "4")
    assert r.code == 0, r.err
    assert time.monotonic() - t0 < 10, "no wait for connections the server will not serve"
    assert sha256(out) == sha256(src)
    backing = tmp_path / "backing.raw"
    backing.write_bytes(b"\xee" * (64 * MIB))
    target = servers(qemu_nbd(backing, sockdir / "w.sock", read_only=False, shared=None))
    r = run_hamal("sync", str(src), target.uri, "--writers", "2", "--journal", str(tmp_path / "j"))
    assert r.code == 0, r.err
    target.stop()
    assert sha256(backing) == sha256(src)


def test_nbdkit_without_structured_replies(tmp_path: Path, servers, sockdir) -> None:
    need("nbdkit", "nbdkit")
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    make_image(src, 32 * MIB, seed=32)
    sock = sockdir / "nosr.sock"
    server = servers(Server(["nbdkit", "--no-sr", "-f", "-U", str(sock), "file", f"file={src}"], sock))
    r = run_hamal("sync", server.uri, str(out), "--json")
    assert r.code == 0, r.err
    assert sha256(out) == sha256(src)
    r = run_hamal("sync", server.uri, str(tmp_path / "b.raw"), "--bitmap", "b0")
    line = one_error_line(r.err)
    assert r.code == 1 and "lacks structured replies, which --bitmap needs" in line, line


@pytest.fixture
def nbd_server(tmp_path: Path):
    """Debian's nbd-server on 127.0.0.1, serving export "disk" from tmp_path/src.raw."""
    need("nbd-server", "nbd-server")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    conf, pid = tmp_path / "nbd-server.conf", tmp_path / "nbd-server.pid"
    conf.write_text(
        f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\n"
        f"[disk]\nexportname = {tmp_path / 'src.raw'}\nreadonly = true\n"
    )
    make_image(tmp_path / "src.raw", 16 * MIB, seed=33)
    subprocess.run(["nbd-server", "-C", str(conf), "-p", str(pid)], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 10
        while not pid.exists():
            assert time.monotonic() < deadline, "nbd-server did not start"
            time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}/disk"
    finally:
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)


def test_debians_nbd_server(tmp_path: Path, nbd_server: str) -> None:
    out = tmp_path / "out.raw"
    r = run_hamal("sync", nbd_server, str(out))
    assert r.code == 0, r.err
    assert sha256(out) == sha256(tmp_path / "src.raw")
    r = run_hamal("sync", nbd_server, str(tmp_path / "b.raw"), "--bitmap", "b0")
    assert r.code == 1 and "lacks structured replies" in one_error_line(r.err)


def test_a_failed_negotiation_ends_with_abort(tmp_path: Path, servers, sockdir) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 8 * MIB, seed=34)
    server = servers(qemu_nbd(src, sockdir / "a.sock", export="disk0"))
    r = run_hamal("sync", f"nbd+unix:///other?socket={server.sock}", str(tmp_path / "o.raw"))
    assert r.code == 1 and "unknown export" in one_error_line(r.err)
    time.sleep(0.2)
    server.stop()
    assert "Bad magic" not in server.stderr(), "the negotiation ended with NBD_OPT_ABORT"


class Qemu:
    """A QEMU with no guest (``-machine none``) serving a qcow2 image as node ``drive0``,
    driven over QMP as libvirt drives a running VM."""

    def __init__(self, image: Path, sockdir: Path) -> None:
        root = Path(os.environ.get("HAMAL_QEMU_SYSTEM", Path(__file__).parents[1] / ".cache" / "qemu-system"))
        binary = root / "usr" / "bin" / "qemu-system-x86_64"
        if not binary.exists():
            pytest.skip(f"QEMU's system emulator is not unpacked at {root} (tools/test does it)")
        self.qmp_path, self.nbd_path = sockdir / "qmp.sock", sockdir / "live.sock"
        env = {**os.environ, "QEMU_MODULE_DIR": str(root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu")}
        self.proc = subprocess.Popen(
            [str(binary), "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-blockdev", f"driver=qcow2,node-name=drive0,file.driver=file,file.filename={image}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.stderr
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.qmp_path))
        self.io = self.sock.makefile("rw")
        self.io.readline()  # the greeting
        self.cmd("qmp_capabilities")
        self.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.nbd_path)}})

    def cmd(self, command: str, **args: object) -> object:
        self.io.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.io.flush()
        while True:
            reply = json.loads(self.io.readline())
            if "error" in reply:
                raise AssertionError(f"{command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def write(self, what: str) -> None:
        """A guest-style write through the block layer (tracked by enabled bitmaps)."""
        self.cmd("human-monitor-command", **{"command-line": f'qemu-io drive0 "{what}"'})

    def export(self, name: str, bitmap: str | None = None) -> str:
        args: dict[str, object] = {"type": "nbd", "id": name, "node-name": "drive0", "name": name}
        if bitmap:
            args["bitmaps"] = [bitmap]
        self.cmd("block-export-add", **args)
        return f"nbd+unix:///{name}?socket={self.nbd_path}"

    def stop(self) -> None:
        self.cmd("quit")
        self.proc.wait(timeout=10)


def test_a_live_qemu_export_with_a_disabled_bitmap_copy(tmp_path: Path, sockdir) -> None:
    image, target = tmp_path / "vm.qcow2", tmp_path / "target.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", str(image)], check=True, capture_output=True
    )
    qemu = Qemu(image, sockdir)
    try:
        qemu.cmd("block-dirty-bitmap-add", node="drive0", name="b0", persistent=True)
        r = run_hamal("sync", qemu.export("full"), str(target))
        assert r.code == 0, r.err
        for w in ("write -P 0x22 1M 64k", "write -P 0x33 20M 128k", "write -P 0x44 63M 64k"):
            qemu.write(w)
        # As libvirt does: export a disabled copy of the bitmap, the enabled one keeps tracking.
        qemu.cmd("block-dirty-bitmap-add", node="drive0", name="b0-copy", disabled=True)
        qemu.cmd("block-dirty-bitmap-merge", node="drive0", target="b0-copy", bitmaps=["b0"])
        uri = qemu.export("inc", bitmap="b0-copy")
        r = run_hamal("sync", uri, str(target), "--bitmap", "b0-copy", "--json")
        assert r.code == 0, r.err
        summary = json.loads(r.out)
        assert summary["mode"] == "incremental"
        assert summary["bytes_total"] == 256 * 1024, "exactly the dirty extents"
        r = run_hamal("verify", uri, str(target))
        assert r.code == 0, r.err + r.out
    finally:
        qemu.stop()
