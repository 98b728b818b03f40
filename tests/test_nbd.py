"""NBD: sources and targets against qemu-nbd and nbdkit, dirty bitmaps, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_CONF, MIB, make_image, one_error_line, run_hamal, sha256
from nbd_servers import merged, nbdinfo_map, nbdkit_file, qemu_io, qemu_nbd


def allocated_per_nbdinfo(uri: str) -> list[tuple[int, int]]:
    # base:allocation type bit 2 = zero; data is what reads non-zero.
    return merged([(e["offset"], e["length"]) for e in nbdinfo_map(uri) if not e["type"] & 2])


@pytest.mark.parametrize("server_kind", ["qemu-nbd", "nbdkit"])
def test_full_sync_from_export_and_map_agrees_with_nbdinfo(tmp_path, servers, sockdir, server_kind) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 64 * MIB, seed=11)
    start = qemu_nbd if server_kind == "qemu-nbd" else nbdkit_file
    server = servers(start(src, sockdir / "s.sock"))
    m = json.loads(run_hamal("map", server.uri, "--json").out)
    assert m["size"] == 64 * MIB
    assert [tuple(e) for e in m["allocated"]] == allocated_per_nbdinfo(server.uri)
    r = run_hamal("sync", server.uri, str(tmp_path / "out.raw"), "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["io_backend"] == "nbd" and s["bytes_total"] == sum(ln for _, ln in m["allocated"])
    assert s["bytes_total"] < 64 * MIB  # holes were not read
    assert sha256(src) == sha256(tmp_path / "out.raw")


def test_dirty_bitmap_incremental_reads_only_dirty_extents(tmp_path, servers, sockdir) -> None:
    img, target = tmp_path / "disk.qcow2", tmp_path / "target.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "256M"], check=True)
    qemu_io(img, "write -P 0x11 0 8M", "write -P 0x22 100M 2M", "write -P 0x33 200M 1M")
    server = servers(qemu_nbd(img, sockdir / "a.sock", fmt="qcow2"))
    assert run_hamal("sync", server.uri, str(target)).code == 0
    server.stop()

    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    qemu_io(img, "write -P 0xab 1M 64k", "write -P 0xcd 150M 4k", "write -z 100M 1M")
    server = servers(qemu_nbd(img, sockdir / "b.sock", fmt="qcow2", bitmap="b0"))
    dirty = merged(
        [(e["offset"], e["length"]) for e in nbdinfo_map(server.uri, "qemu:dirty-bitmap:b0") if e["type"] & 1]
    )
    m = json.loads(run_hamal("map", server.uri, "--bitmap", "b0", "--json").out)
    assert [tuple(e) for e in m["changed"]] == dirty
    r = run_hamal("sync", server.uri, str(target), "--bitmap", "b0", "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    dirty_bytes = sum(ln for _, ln in dirty)
    assert s["mode"] == "incremental"
    # Read: the dirty extents that hold data; the zeroed 1 MiB is zeroed without reading.
    assert s["bytes_total"] + s["holes_zeroed"] == dirty_bytes
    assert s["holes_zeroed"] >= MIB and s["bytes_total"] < 2 * MIB
    server.stop()
    full = tmp_path / "full.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(full)], check=True)
    assert sha256(full) == sha256(target)


def test_nbd_target_through_writable_qemu_nbd(tmp_path, servers, sockdir) -> None:
    src, backing = tmp_path / "src.raw", tmp_path / "backing.raw"
    make_image(src, 32 * MIB, seed=12)
    backing.write_bytes(b"\xee" * (32 * MIB))  # old content everywhere: holes must be zeroed
    server = servers(qemu_nbd(backing, sockdir / "t.sock", read_only=False))
    r = run_hamal("sync", str(src), server.uri, "--journal", str(tmp_path / "j"), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["holes_zeroed"] > 0
    server.stop()
    assert sha256(src) == sha256(backing)
    # hamal verify reads NBD too.
    server = servers(qemu_nbd(backing, sockdir / "t2.sock"))
    assert run_hamal("verify", str(src), server.uri).code == 0


def test_restore_from_chunk_store_to_nbd_target(tmp_path, servers, sockdir) -> None:
    src, backing = tmp_path / "src.raw", tmp_path / "backing.raw"
    make_image(src, 32 * MIB, seed=14)
    store = f"dir:{tmp_path / 'store'}"
    # 1 MiB store chunks (the restore reads them through its own 4 MiB grid); some are holes.
    assert run_hamal("sync", str(src), store, "--disk", "d", "--chunk-size", "1M").code == 0
    backing.write_bytes(b"\xee" * (32 * MIB))  # stale content: the store's zero chunks must win
    server = servers(qemu_nbd(backing, sockdir / "r.sock", read_only=False))
    r = run_hamal("restore", store, server.uri, "--disk", "d", "--journal", str(tmp_path / "j"), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["holes_zeroed"] > 0
    server.stop()
    assert sha256(src) == sha256(backing)


def test_server_killed_mid_sync_fails_cleanly_then_rerun_completes(tmp_path, servers, sockdir) -> None:
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    make_image(src, 128 * MIB, seed=13, fill=1.0)
    server = servers(qemu_nbd(src, sockdir / "k.sock"))
    cmd = [sys.executable, "-m", "hamal", "sync", server.uri, str(out), "--bwlimit", "16M", "--no-progress"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)},
    )
    deadline = time.monotonic() + 30
    while not (out.exists() and out.stat().st_blocks > 0):  # the sync is writing
        assert time.monotonic() < deadline and proc.poll() is None, "the sync did not start"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1
    line = one_error_line(err)
    assert server.uri in line and ("closed" in line or "reset" in line or "Broken pipe" in line), line
    server.start()
    r = run_hamal("sync", server.uri, str(out))
    assert r.code == 0, r.err
    assert "not resuming" in r.err and "cannot tell which snapshot it serves" in r.err, r.err
    assert sha256(src) == sha256(out)


def test_bad_uri_unknown_export_missing_bitmap(tmp_path, servers, sockdir) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 8 * MIB, seed=14)
    r = run_hamal("sync", "nbd+unix:///disk", str(tmp_path / "o.raw"))
    assert r.code == 1 and "missing ?socket=PATH" in one_error_line(r.err)
    r = run_hamal("sync", f"nbd+unix:///disk?socket={sockdir}/none.sock", str(tmp_path / "o.raw"))
    assert r.code == 1 and "No such file" in one_error_line(r.err)
    server = servers(qemu_nbd(src, sockdir / "x.sock", export="disk0"))
    r = run_hamal("sync", f"nbd+unix:///other?socket={server.sock}", str(tmp_path / "o.raw"))
    assert r.code == 1 and "unknown export" in one_error_line(r.err)
    r = run_hamal(
        "sync", f"nbd+unix:///disk0?socket={server.sock}", str(tmp_path / "o.raw"), "--bitmap", "nope"
    )
    line = one_error_line(r.err)
    assert r.code == 1 and "dirty bitmap 'nope' is not exported" in line
    assert not (tmp_path / "o.raw").exists()
    r = run_hamal("sync", str(src), str(tmp_path / "o.raw"), "--bitmap", "b0")
    assert r.code == 1 and "needs an NBD source" in one_error_line(r.err)


def make_tls_creds(d: Path, name: str = "hamal test CA") -> None:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, laid out
    as qemu's tls-creds-x509 and hamal's ?tls-certificates= expect (ca-cert.pem, server-*.pem,
    client-*.pem). qemu-nbd verifies client certificates by default."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    def issue(who: str, subject: str, ext: str) -> None:
        key, csr, cert = (str(d / f"{who}-{x}") for x in ("key.pem", "req.pem", "cert.pem"))
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-addext",
            ext,
            "-keyout",
            key,
            "-out",
            csr,
        )
        ca = ["-CA", str(d / "ca-cert.pem"), "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial"]
        ssl("x509", "-req", "-in", csr, *ca, "-days", "2", "-copy_extensions", "copy", "-out", cert)

    d.mkdir(parents=True, exist_ok=True)
    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(d / "ca-key.pem"),
        "-out",
        str(d / "ca-cert.pem"),
    )
    issue("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    issue("client", "/CN=hamal client", "extendedKeyUsage=clientAuth")


def test_tls_sync_and_refusals(tmp_path, servers, sockdir) -> None:
    src = tmp_path / "src.raw"
    make_image(src, 16 * MIB, seed=15)
    creds, other = tmp_path / "tls", tmp_path / "other-ca"
    make_tls_creds(creds)
    make_tls_creds(other, name="another CA")
    extra = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={creds}", "--tls-creds", "tls0"]
    server = servers(qemu_nbd(src, sockdir / "tls.sock", extra=extra))
    out = tmp_path / "o.raw"
    # A plain client is told the server wants TLS.
    r = run_hamal("sync", server.uri, str(out))
    assert r.code == 1 and "requires TLS: use an nbds:// URI" in one_error_line(r.err)
    # With the right CA the sync runs inside TLS.
    tls_uri = f"nbds+unix:///?socket={server.sock}&tls-certificates={creds}"
    r = run_hamal("sync", tls_uri, str(out), "--json")
    assert r.code == 0, r.err
    assert sha256(src) == sha256(out)
    # A server certificate from an unknown CA is refused.
    r = run_hamal(
        "sync", f"nbds+unix:///?socket={server.sock}&tls-certificates={other}", str(tmp_path / "p.raw")
    )
    line = one_error_line(r.err)
    assert r.code == 1 and "TLS: the server's certificate is not signed by a CA this host trusts" in line, (
        line
    )
    assert f"trusted CA {other}/ca-cert.pem" in line, line
    # A certificate for another name is refused too.
    r = run_hamal("sync", tls_uri + "&tls-hostname=elsewhere.example", str(tmp_path / "p.raw"))
    line = one_error_line(r.err)
    assert r.code == 1 and "but the server was reached as elsewhere.example" in line, line
    r = run_hamal("sync", f"nbds+unix:///?socket={server.sock}", str(tmp_path / "p.raw"))
    assert r.code == 1 and "needs ?tls-certificates=DIR" in one_error_line(r.err)
    assert not (tmp_path / "p.raw").exists()
