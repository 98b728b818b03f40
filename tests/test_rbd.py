"""The librbd source on a real single-node Ceph started by the tests: full and incremental syncs
to files and chunk stores compared byte for byte with ``rbd export``, discards, no-op syncs,
snapshot helpers, cephx, and the errors an operator meets."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ceph_cluster import CephCluster, free_port, missing_programs
from conftest import DEFAULT_CONF, MIB, one_error_line, run_hamal
from hamal import _native
from hamal.errors import CephError

SYSTEM_PYTHON = "/usr/bin/python3"
RBD_IO = str(Path(__file__).with_name("rbd_io.py"))
_names = itertools.count()


def _needs() -> str | None:
    missing = missing_programs() + [p for p in ("rbd", "ceph-authtool") if shutil.which(p) is None]
    if missing:
        return f"Ceph is not installed (missing {', '.join(missing)}); tools/test installs it"
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import rbd"], capture_output=True)
    if r.returncode != 0:
        return "python3-rbd is not installed (tools/test installs it)"
    return None


@dataclass
class Rbd:
    cluster: CephCluster
    pool: str
    root: Path
    auth: str = ""  # extra URI options (cephx id and keyring)

    def rbd(self, *args: str) -> str:
        r = subprocess.run(
            ["rbd", "--conf", str(self.cluster.conf), *args], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"rbd {' '.join(args)}: {r.stderr}"
        return r.stdout

    def new_image(self, size: int) -> str:
        name = f"img{next(_names)}"
        self.rbd("create", "--size", f"{size // MIB}M", f"{self.pool}/{name}")
        return name

    def io(self, image: str, *ops: str) -> None:
        cmd = [SYSTEM_PYTHON, RBD_IO, str(self.cluster.conf), self.pool, image, *ops]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def snap(self, image: str, name: str) -> None:
        self.rbd("snap", "create", f"{self.pool}/{image}@{name}")

    def export(self, image: str, snap: str) -> bytes:
        out = self.root / f"export-{image}-{snap}.raw"
        out.unlink(missing_ok=True)
        self.rbd("export", "--no-progress", f"{self.pool}/{image}@{snap}", str(out))
        return out.read_bytes()

    def diff(self, image: str, snap: str, from_snap: str | None = None) -> tuple[int, int]:
        """``rbd diff``'s (data bytes, zero bytes): what an exact diff should read and zero."""
        base = ["--from-snap", from_snap] if from_snap else []
        out = json.loads(self.rbd("diff", "--format", "json", *base, f"{self.pool}/{image}@{snap}"))
        data = sum(e["length"] for e in out if e["exists"] in (True, "true"))
        return data, sum(e["length"] for e in out) - data

    def uri(self, image: str, snap: str | None = None, conf: bool = True, **opts: str) -> str:
        """The image's URI; ``conf=False`` leaves the config to ``CEPH_CONF``."""
        conf_opt = [f"conf={self.cluster.conf}"] if conf else []
        q = "&".join([*conf_opt, *(f"{k}={v}" for k, v in opts.items())])
        return f"rbd:{self.pool}/{image}{'@' + snap if snap else ''}?{q}{self.auth}"


def start_cluster(root: Path, cephx: bool) -> CephCluster:
    cluster = CephCluster(root, rgw=False, cephx=cephx, mgr=True)
    try:
        cluster.start()
        cluster.create_rbd_pool("rbd")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def rbd_env(ceph: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Rbd:
    """An ``auth none`` pool on the session's Ceph (the one radosgw runs on)."""
    why = _needs()
    if why:
        pytest.skip(why)
    ceph.create_rbd_pool("rbd")
    return Rbd(ceph, "rbd", tmp_path_factory.mktemp("rbd"))


@pytest.fixture(scope="module")
def cephx_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rbd]:
    """A second cluster with cephx on and a client.hamal user limited to the rbd pool."""
    why = _needs()
    if why:
        pytest.skip(why)
    cluster = start_cluster(tmp_path_factory.mktemp("ceph-cephx"), cephx=True)
    try:
        keyring = cluster.create_client("hamal", ["mon", "profile rbd", "osd", "profile rbd pool=rbd"])
        yield Rbd(cluster, "rbd", tmp_path_factory.mktemp("rbd-cephx"), auth=f"&id=hamal&keyring={keyring}")
    finally:
        cluster.stop()


def sync(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    r = run_hamal("sync", *args, "--json", "--no-progress", env=env, timeout=timeout)
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_full_incremental_discard_and_noop_to_file(rbd_env: Rbd, tmp_path: Path) -> None:
    img = rbd_env.new_image(64 * MIB)
    rbd_env.io(img, "write:0:3145728:1", "write:10485760:6291456:2", "write:41943040:1048576:3")
    rbd_env.snap(img, "s1")
    target = tmp_path / "disk.raw"
    full = sync(rbd_env.uri(img, "s1"), str(target))
    assert target.read_bytes() == rbd_env.export(img, "s1")
    assert (full["bytes_total"], 0) == rbd_env.diff(img, "s1"), "a full sync reads only allocated extents"
    assert full["bytes_total"] < 16 * MIB

    # Change some data, add some, and discard a range that held data (an unaligned middle part
    # and a whole 4 MiB object).
    rbd_env.io(img, "write:1048576:65536:4", "write:52428800:2097152:5", "discard:11534336:2097152")
    rbd_env.io(img, "discard:41943040:1048576")
    rbd_env.snap(img, "s2")
    inc = sync(rbd_env.uri(img, "s2", from_snap="s1"), str(target))
    expected = rbd_env.export(img, "s2")
    assert target.read_bytes() == expected
    assert expected[11534336 : 11534336 + 2097152] == bytes(2097152), "the discard reads as zeros"
    data, zeros = rbd_env.diff(img, "s2", "s1")
    assert inc["bytes_total"] == data < 6 * MIB, "an incremental reads only what changed"
    assert inc["holes_zeroed"] == zeros >= 2 * MIB, "discarded ranges are zeroed, not read"

    rbd_env.snap(img, "s3")
    noop = sync(rbd_env.uri(img, "s3", from_snap="s2"), str(target))
    assert noop["bytes_total"] == 0 and noop["holes_zeroed"] == 0, noop
    assert target.read_bytes() == expected


def test_whole_object_diff_and_ceph_conf_from_the_environment(rbd_env: Rbd, tmp_path: Path) -> None:
    img = rbd_env.new_image(32 * MIB)
    rbd_env.io(img, "write:0:1048576:6", "write:20971520:4194304:7")
    rbd_env.snap(img, "a")
    target = tmp_path / "disk.raw"
    env = {"CEPH_CONF": str(rbd_env.cluster.conf)}  # found the way librados finds it
    sync(rbd_env.uri(img, "a", conf=False, whole_object="1"), str(target), env=env)
    rbd_env.io(img, "write:4096:4096:8", "discard:20971520:4194304")
    rbd_env.snap(img, "b")
    sync(rbd_env.uri(img, "b", conf=False, from_snap="a", whole_object="1"), str(target), env=env)
    assert target.read_bytes() == rbd_env.export(img, "b")


def test_full_and_incremental_into_a_chunk_store(rbd_env: Rbd, tmp_path: Path) -> None:
    img = rbd_env.new_image(48 * MIB)
    rbd_env.io(img, "write:0:8388608:9", "write:33554432:1048576:10")
    rbd_env.snap(img, "s1")
    store = f"dir:{tmp_path / 'store'}"
    v1 = sync(rbd_env.uri(img, "s1"), store, "--disk", "vol-1")["version"]
    rbd_env.io(img, "write:4194304:4096:11", "discard:33554432:1048576")
    rbd_env.snap(img, "s2")
    v2 = sync(rbd_env.uri(img, "s2", from_snap="s1"), store, "--disk", "vol-1")["version"]
    for version, snap in ((v1, "s1"), (v2, "s2")):
        out = tmp_path / f"restored-{version}.raw"
        r = run_hamal("restore", store, str(out), "--disk", "vol-1", "--version", version, "--no-progress")
        assert r.code == 0, r.err
        assert out.read_bytes() == rbd_env.export(img, snap), f"version {version} = {snap}"


def test_verify_compares_a_snapshot_with_its_copy(rbd_env: Rbd, tmp_path: Path) -> None:
    img = rbd_env.new_image(16 * MIB)
    rbd_env.io(img, "write:0:2097152:12")
    rbd_env.snap(img, "s1")
    target = tmp_path / "disk.raw"
    sync(rbd_env.uri(img, "s1"), str(target))
    assert run_hamal("verify", rbd_env.uri(img, "s1"), str(target)).code == 0
    with open(target, "r+b") as f:
        f.seek(MIB)
        f.write(b"\xff")
    assert run_hamal("verify", rbd_env.uri(img, "s1"), str(target)).code == 3


def test_errors_name_what_is_wrong(rbd_env: Rbd, tmp_path: Path) -> None:
    img = rbd_env.new_image(8 * MIB)
    rbd_env.snap(img, "s1")
    target = str(tmp_path / "t.raw")
    conf = str(rbd_env.cluster.conf)
    cases = [
        (f"rbd:nopool/{img}@s1?conf={conf}", "no such pool"),
        (f"rbd:rbd/ghost@s1?conf={conf}", "no image 'rbd/ghost'"),
        (f"rbd:rbd/{img}@nosnap?conf={conf}", "no snapshot 'nosnap'"),
        (f"rbd:rbd/{img}@s1?conf={conf}&from_snap=s0", "no snapshot 's0'"),
        (f"rbd:rbd/{img}?conf={conf}", "add @SNAP"),
        (f"rbd:rbd/{img}@s1?conf={tmp_path}/missing.conf", "missing.conf"),
        (f"rbd:rbd/{img}@s1?conf={conf}&size=1", "unknown option 'size'"),
    ]
    for uri, why in cases:
        r = run_hamal("sync", uri, target, timeout=90)
        assert r.code == 1, (uri, r.err)
        assert why in one_error_line(r.err), (uri, r.err)
    r = run_hamal("sync", str(tmp_path / "t.raw"), f"rbd:rbd/{img}@s1?conf={conf}")
    assert r.code == 1 and "sources only" in one_error_line(r.err), r.err


def test_unreachable_monitors_fail_within_the_timeout(rbd_env: Rbd, tmp_path: Path) -> None:
    conf = tmp_path / "nowhere.conf"
    conf.write_text(f"[global]\nmon host = v2:127.0.0.1:{free_port()}\nauth client required = none\n")
    began = time.monotonic()
    r = run_hamal("sync", f"rbd:rbd/img@s1?conf={conf}&timeout=3", str(tmp_path / "t.raw"), timeout=60)
    took = time.monotonic() - began
    assert r.code == 1 and "no answer from the Ceph monitors within 3 s" in one_error_line(r.err), r.err
    assert took < 20, f"took {took:.1f} s"
    began = time.monotonic()
    with pytest.raises(CephError, match="no answer from the Ceph monitors"):
        _native.rbd_list_snapshots(f"rbd:rbd/img?conf={conf}&timeout=2")
    assert time.monotonic() - began < 15


def test_missing_librbd_says_what_to_install(tmp_path: Path) -> None:
    env = {"HAMAL_LIBRBD": "/nonexistent/librbd.so.1"}
    r = run_hamal("sync", "rbd:rbd/img@s1", str(tmp_path / "t.raw"), env=env)
    line = one_error_line(r.err)
    assert r.code == 1 and "/nonexistent/librbd.so.1" in line and "apt-get install librbd1" in line, r.err


def test_snapshot_helpers(rbd_env: Rbd) -> None:
    img = rbd_env.new_image(8 * MIB)
    uri = rbd_env.uri(img)
    assert _native.rbd_list_snapshots(uri) == []
    a = _native.rbd_create_snapshot(uri, "a")
    b = _native.rbd_create_snapshot(uri, "b", protect=True)
    assert (a["name"], a["protected"], a["size"]) == ("a", False, 8 * MIB)
    assert b["protected"] and b["id"] > a["id"]
    assert [s["name"] for s in _native.rbd_list_snapshots(uri)] == ["a", "b"]
    assert "b" in rbd_env.rbd("snap", "ls", f"rbd/{img}")
    with pytest.raises(CephError, match="already exists"):
        _native.rbd_create_snapshot(uri, "a")
    with pytest.raises(CephError, match="'b' is protected"):
        _native.rbd_remove_snapshot(uri, "b")
    _native.rbd_remove_snapshot(uri, "b", unprotect=True)
    _native.rbd_protect_snapshot(uri, "a")
    assert _native.rbd_list_snapshots(uri)[0]["protected"]
    _native.rbd_protect_snapshot(uri, "a", protected=False)
    _native.rbd_remove_snapshot(uri, "a")
    assert _native.rbd_list_snapshots(uri) == []
    with pytest.raises(CephError, match="no snapshot 'zz'"):
        _native.rbd_remove_snapshot(uri, "zz")
    with pytest.raises(CephError, match="no image"):
        _native.rbd_list_snapshots(rbd_env.uri("ghost"))


def test_cephx_user_syncs_and_bad_keys_are_refused(cephx_env: Rbd, tmp_path: Path) -> None:
    img = cephx_env.new_image(16 * MIB)
    cephx_env.io(img, "write:0:4194304:13")
    cephx_env.snap(img, "s1")
    target = tmp_path / "disk.raw"
    sync(cephx_env.uri(img, "s1"), str(target))
    assert target.read_bytes() == cephx_env.export(img, "s1")
    assert [s["name"] for s in _native.rbd_list_snapshots(cephx_env.uri(img))] == ["s1"]

    # A keyring holding a key the cluster never issued for client.hamal.
    wrong = tmp_path / "wrong.keyring"
    subprocess.run(
        ["ceph-authtool", "--create-keyring", "--gen-key", "-n", "client.hamal", str(wrong)], check=True
    )
    conf = cephx_env.cluster.conf
    began = time.monotonic()
    r = run_hamal("sync", f"rbd:rbd/{img}@s1?conf={conf}&id=hamal&keyring={wrong}&timeout=10", str(target))
    assert r.code == 1 and "authentication as client.hamal refused" in one_error_line(r.err), r.err
    assert time.monotonic() - began < 30
    r = run_hamal("sync", f"rbd:rbd/{img}@s1?conf={conf}&id=hamal&keyring={tmp_path}/none", str(target))
    assert r.code == 1 and f"keyring {tmp_path}/none" in one_error_line(r.err), r.err


def test_hung_osd_fails_the_sync_in_bounded_time_and_a_rerun_resumes(cephx_env: Rbd, tmp_path: Path) -> None:
    img = cephx_env.new_image(64 * MIB)
    cephx_env.io(img, *(f"write:{i * 4 * MIB}:{4 * MIB}:{100 + i}" for i in range(16)))
    cephx_env.snap(img, "s1")
    target = tmp_path / "disk.raw"
    uri = cephx_env.uri(img, "s1", timeout="4")
    cmd = [sys.executable, "-m", "hamal", "sync", uri, str(target), "--bwlimit", "8M", "--no-progress"]
    env = {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)}
    journal = Path(f"{target}.hamal-journal")
    osd = cephx_env.cluster.pid_of("osd.0")
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) as p:
        # Let some chunks become durable (journaled), then freeze the OSD under the sync.
        end = time.monotonic() + 60
        while time.monotonic() < end and not (journal.exists() and journal.stat().st_size > 200):
            time.sleep(0.1)
        os.kill(osd, signal.SIGSTOP)
        try:
            began = time.monotonic()
            _, err = p.communicate(timeout=60)
            took = time.monotonic() - began
        finally:
            os.kill(osd, signal.SIGCONT)
    assert p.returncode == 1, err
    line = one_error_line(err)
    assert "RBD read failed at offset" in line and "timed out" in line, err
    assert took < 30, f"took {took:.1f} s"
    again = sync(uri, str(target))
    assert again["bytes_resumed"] > 0, again
    assert target.read_bytes() == cephx_env.export(img, "s1")


def test_a_clone_reads_through_its_parent(rbd_env: Rbd, tmp_path: Path) -> None:
    """OpenStack volumes made from images are clones: a full sync must include the parent's
    data, and an incremental what the clone changed over it (writes and discards)."""
    parent = rbd_env.new_image(32 * MIB)
    rbd_env.io(parent, "write:0:8388608:20", "write:16777216:4194304:21")
    rbd_env.snap(parent, "base")
    rbd_env.rbd("snap", "protect", f"{rbd_env.pool}/{parent}@base")
    child = f"clone{next(_names)}"
    rbd_env.rbd("clone", f"{rbd_env.pool}/{parent}@base", f"{rbd_env.pool}/{child}")
    rbd_env.io(child, "write:1048576:65536:22", "write:25165824:1048576:23")
    rbd_env.snap(child, "c1")
    target = tmp_path / "clone.raw"
    full = sync(rbd_env.uri(child, "c1"), str(target))
    assert target.read_bytes() == rbd_env.export(child, "c1")
    assert full["bytes_total"] >= 12 * MIB, "the parent's data is read"
    rbd_env.io(child, "write:2097152:4096:24", "discard:16777216:2097152")
    rbd_env.snap(child, "c2")
    sync(rbd_env.uri(child, "c2", from_snap="c1"), str(target))
    expected = rbd_env.export(child, "c2")
    assert target.read_bytes() == expected
    assert expected[16777216 : 16777216 + 2097152] == bytes(2097152), "the discard over the parent"


def test_an_image_in_a_namespace(rbd_env: Rbd, tmp_path: Path) -> None:
    ns = f"ns{next(_names)}"
    rbd_env.rbd("namespace", "create", "--pool", rbd_env.pool, "--namespace", ns)
    spaced = Rbd(rbd_env.cluster, f"{rbd_env.pool}/{ns}", rbd_env.root)
    img = spaced.new_image(16 * MIB)
    spaced.io(img, "write:0:1048576:30", "write:8388608:2097152:31")
    spaced.snap(img, "s1")
    target = tmp_path / "ns.raw"
    sync(spaced.uri(img, "s1"), str(target))
    assert target.read_bytes() == spaced.export(img, "s1")
