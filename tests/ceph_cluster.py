"""A throw-away single-node Ceph cluster on 127.0.0.1 only: radosgw for the S3 tests, RBD pools
for the librbd source tests.

One monitor, one memstore OSD, optionally a manager and radosgw; ``auth none`` or cephx. Facts it
relies on
(learned the hard way): radosgw needs ``ms mon client mode = crc`` under ``auth none`` or it
waits 300 s for the monitor; each map change waits ``paxos propose interval`` (1 s by default);
radosgw creates its pools lazily and slowly unless they exist before it starts; stopping must go
radosgw, OSD, monitor, or shutdowns hang.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "HAMALTESTACCESSKEY00"
SECRET_KEY = "hamal-test-secret-key-0000000000000000000"
RGW_POOLS = [
    ".rgw.root",
    "default.rgw.log",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
]
DAEMONS = ["ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "radosgw-admin", "ceph"]


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"ceph test cluster: timed out waiting for {what}")


class CephCluster:
    def __init__(
        self, root: Path, bluestore_gib: int = 0, rgw: bool = True, cephx: bool = False, mgr: bool = False
    ):
        """``bluestore_gib`` > 0 keeps the OSD's data in a sparse file of that size instead of
        RAM (memstore holds about twice the data in memory). ``cephx`` turns authentication on:
        the admin keyring is ``root/admin.keyring``, named in the config. ``mgr`` starts a
        manager (``mgr.x``) and waits until it is active."""
        self.root = root
        self.bluestore_gib = bluestore_gib
        self.with_rgw = rgw
        self.with_mgr = mgr
        self.cephx = cephx
        self.admin_keyring = root / "admin.keyring"
        self.conf = root / "ceph.conf"
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.pids: dict[str, int] = {}

    def ceph(self, *args: str, stdin: str | None = None, timeout: float = 30) -> str:
        r = subprocess.run(
            ["ceph", "--conf", str(self.conf), "--connect-timeout", "10", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def write_conf(self) -> None:
        r = self.root
        for d in ("mon", "osd", "mgr", "run", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        fsid = Path("/proc/sys/kernel/random/uuid").read_text().strip()
        auth = "cephx" if self.cephx else "none"
        keyring = f"keyring = {self.admin_keyring}\n" if self.cephx else ""
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = {auth}
auth service required = {auth}
auth client required = {auth}
{keyring}auth allow insecure global id reclaim = false
run dir = {r}/run
pid file = {r}/run/$name.pid
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon mgr inactive grace = 315360000
paxos propose interval = 0.01
# A test stops the OSD (SIGSTOP) for a while: its threads must not count as hung afterwards.
osd op thread timeout = 600
osd op thread suicide timeout = 1200
threadpool default timeout = 600
osd heartbeat grace = 600

[mon.a]
mon data = {r}/mon
public addr = v2:127.0.0.1:{self.mon_port}

[mgr.x]
mgr data = {r}/mgr
keyring = {r}/mgr.keyring

[osd.0]
osd data = {r}/osd
keyring = {r}/osd.keyring
{self.osd_store_conf()}

[client.rgw.t]
# tcp_nodelay: without it radosgw sends an answer's body ~40 ms after its header (Nagle
# waiting for the client's delayed ACK), on every GET; the README tells operators the same.
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
rgw data = {r}/rgw
ms mon client mode = crc
client mount timeout = 30
""")

    def osd_store_conf(self) -> str:
        if not self.bluestore_gib:
            return f"osd objectstore = memstore\nmemstore device bytes = {8 << 30}"
        block = self.root / "osd-block.img"
        with open(block, "wb") as f:
            f.truncate(self.bluestore_gib << 30)
        return (
            f"osd objectstore = bluestore\nbluestore block path = {block}\n"
            "bluestore block create = false\nbluestore block db create = false\n"
            "bluestore block wal create = false\nbluestore fsck on mkfs = false\n"
            "bdev enable discard = false\nbluestore cache autotune = false\n"
            "bluestore cache size = 268435456\nosd memory target = 1073741824"
        )

    def run(self, *cmd: str) -> None:
        r = subprocess.run([*cmd, "--conf", str(self.conf)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")

    def pid_of(self, name: str) -> int:
        return int((self.root / "run" / f"{name}.pid").read_text())

    def make_mon_keyring(self) -> str:
        """The monitor's keyring: /dev/null without cephx; with it, mon. and client.admin keys."""
        if not self.cephx:
            return "/dev/null"
        mon = self.root / "mon.keyring"
        tool = ["ceph-authtool", "--gen-key", "--create-keyring"]
        _run([*tool, str(mon), "-n", "mon.", "--cap", "mon", "allow *"])
        caps = ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"]
        _run([*tool, str(self.admin_keyring), "-n", "client.admin", *caps])
        _run(["ceph-authtool", str(mon), "--import-keyring", str(self.admin_keyring)])
        return str(mon)

    def start(self) -> None:
        self.write_conf()
        self.run("ceph-mon", "--id", "a", "--mkfs", "--keyring", self.make_mon_keyring())
        self.run("ceph-mon", "--id", "a")
        wait_for("the monitor", lambda: self.ceph("health") is not None)
        osd_id = self.ceph("osd", "create").strip()
        self.ceph("osd", "crush", "add", f"osd.{osd_id}", "1", "root=default")
        if self.cephx:
            caps = ["mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *"]
            self.ceph("auth", "get-or-create", f"osd.{osd_id}", *caps, "-o", str(self.root / "osd.keyring"))
        self.run("ceph-osd", "--id", osd_id, "--mkfs")
        self.run("ceph-osd", "--id", osd_id)
        wait_for("the OSD", lambda: " 1 up" in self.ceph("osd", "stat"))
        if self.with_mgr:
            self.start_mgr()
        if self.with_rgw:
            self.setup_rgw()

    def start_mgr(self) -> None:
        if self.cephx:
            caps = ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"]
            self.ceph("auth", "get-or-create", "mgr.x", *caps, "-o", str(self.root / "mgr.keyring"))
        self.run("ceph-mgr", "--id", "x")
        wait_for(
            "the manager", lambda: '"available": true' in self.ceph("mgr", "stat", "--format", "json-pretty")
        )

    def create_rbd_pool(self, pool: str) -> None:
        self.ceph(stdin=f"osd pool create {pool} 8\nosd pool application enable {pool} rbd\n", timeout=60)
        _run(["rbd", "--conf", str(self.conf), "pool", "init", pool])

    def create_client(self, name: str, caps: list[str]) -> Path:
        """A cephx user with these caps; returns its keyring file."""
        keyring = self.root / f"client.{name}.keyring"
        self.ceph("auth", "get-or-create", f"client.{name}", *caps, "-o", str(keyring))
        return keyring

    def setup_rgw(self) -> None:
        cmds = "".join(f"osd pool create {p} 8\nosd pool application enable {p} rgw\n" for p in RGW_POOLS)
        self.ceph(stdin=cmds, timeout=60)
        self.start_rgw()
        self.run(
            "radosgw-admin",
            "user",
            "create",
            "--uid=hamal",
            "--display-name=hamal",
            f"--access-key={ACCESS_KEY}",
            f"--secret-key={SECRET_KEY}",
        )

    def start_rgw(self) -> None:
        subprocess.run(["radosgw", "--conf", str(self.conf), "-n", "client.rgw.t"], check=True, timeout=60)

        def answers() -> bool:
            with urllib.request.urlopen(self.endpoint, timeout=2) as r:
                return r.status == 200

        wait_for("radosgw", answers)

    def kill_rgw(self) -> None:
        """SIGKILLs radosgw (a server crash)."""
        pid = self.pid_of("client.rgw.t")
        _signal(pid, signal.SIGKILL)
        _wait_gone(pid)

    def stop(self) -> None:
        for name in ("client.rgw.t", "mgr.x", "osd.0", "mon.a"):
            try:
                pid = self.pid_of(name)
            except (OSError, ValueError):
                continue
            _signal(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10):
                _signal(pid, signal.SIGKILL)
                _wait_gone(pid)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _signal(pid: int, sig: int) -> None:
    try:
        import os

        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    """True once the process is gone or a zombie (the container's init reaps late)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False
