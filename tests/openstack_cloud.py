"""A throw-away OpenStack on 127.0.0.1 for the OpenStack adapter's tests: RabbitMQ, Keystone
(under uwsgi) and Cinder (api, scheduler, volume with the RBD driver) from Debian's packages,
sqlite databases, on the tests' single-node Ceph (which runs a manager: the RBD driver needs
one). Nova is the one part faked (``fake_nova.py``). Facts it relies on: RabbitMQ named
``rabbit@localhost`` on 127.0.0.1; Keystone's sqlite serialises writes (one uwsgi process);
Cinder's ``scheduler_driver_init_wait_time`` (else the first volume waits 60 s) and
``[keystone_authtoken] interface = public`` (bootstrap makes no internal endpoint)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ceph_cluster import CephCluster, free_port, wait_for

PROGRAMS = ["rabbitmq-server", "keystone-manage", "uwsgi", "cinder-api", "cinder-scheduler", "cinder-volume"]
ADMIN_PASSWORD = "os-Admin-pw-17"
POOL = "volumes"


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return r, (json.loads(raw) if raw else None)


class OpenStack:
    def __init__(self, root: Path, ceph: CephCluster) -> None:
        self.root = root
        self.ceph = ceph
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.keystone_port = free_port()
        self.cinder_port = free_port()
        self.rabbit_port = free_port()
        self.keystone = f"http://127.0.0.1:{self.keystone_port}/v3"
        self.cinder = f"http://127.0.0.1:{self.cinder_port}/v3"

    # Starting and stopping

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def start(self) -> OpenStack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ceph.create_rbd_pool(POOL)
        self.start_rabbit()
        self.start_keystone()
        self.start_cinder()
        return self

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()

    def start_rabbit(self) -> None:
        base = self.root / "rabbit"
        base.mkdir(exist_ok=True)
        env = {
            "RABBITMQ_NODENAME": f"rabbit{self.rabbit_port}@localhost",  # unique: a leftover keeps its name
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.rabbit_port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "HOME": str(base),
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),  # not in the caller's folder
        }
        (base / "rabbitmq-env.conf").write_text("")
        # The server itself, not Debian's wrapper (which switches to the rabbitmq user).
        self._spawn("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env)
        wait_for("RabbitMQ", lambda: self._port_open(self.rabbit_port), timeout=90)

    @staticmethod
    def _port_open(port: int) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def start_keystone(self) -> None:
        base = self.root / "keystone"
        for d in ("fernet-keys", "credential-keys"):
            (base / d).mkdir(parents=True, exist_ok=True)
        conf = base / "keystone.conf"
        conf.write_text(
            f"[DEFAULT]\nlog_file = {base}/keystone.log\n"
            f"[database]\nconnection = sqlite:///{base}/keystone.db?timeout=60\n"
            f"[token]\nprovider = fernet\n"
            f"[fernet_tokens]\nkey_repository = {base}/fernet-keys\n"
            f"[credential]\nkey_repository = {base}/credential-keys\n"
        )
        manage = ["keystone-manage", "--config-file", str(conf)]
        who = ["--keystone-user", "root", "--keystone-group", "root"]
        for step in (["db_sync"], ["fernet_setup", *who], ["credential_setup", *who]):
            subprocess.run([*manage, *step], check=True, capture_output=True, timeout=300)
        # WAL: Keystone's readers (token checks) then never block its writers.
        con = sqlite3.connect(base / "keystone.db")
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
        url = f"http://127.0.0.1:{self.keystone_port}/v3/"
        subprocess.run(
            [*manage, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-admin-url", url,
             "--bootstrap-public-url", url, "--bootstrap-region-id", "RegionOne"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        self._spawn(
            "keystone",
            ["uwsgi", "--plugin", "python3", "--http-socket", f"127.0.0.1:{self.keystone_port}",
             "--wsgi-file", "/usr/bin/keystone-wsgi-public", "--processes", "1", "--threads", "1",
             "--lazy-apps", "--die-on-term"],
            {"OS_KEYSTONE_CONFIG_FILES": str(conf)},
        )  # fmt: skip
        wait_for("Keystone", lambda: self.token() is not None, timeout=90)

    def token(self, user: str = "admin", password: str = ADMIN_PASSWORD) -> str | None:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}},
                },
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
            }
        }
        try:
            r, _ = _http("POST", f"{self.keystone}/auth/tokens", body)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return None
        return r.headers["X-Subject-Token"]

    def register_service(self, kind: str, url: str) -> None:
        """A service and its endpoints in Keystone's catalog."""
        token = self.token()
        _, svc = _http("POST", f"{self.keystone}/services", {"service": {"type": kind, "name": kind}}, token)
        for iface in ("public", "internal", "admin"):
            ep = {
                "service_id": svc["service"]["id"],
                "interface": iface,
                "region_id": "RegionOne",
                "url": url,
            }
            _http("POST", f"{self.keystone}/endpoints", {"endpoint": ep}, token)

    def start_cinder(self) -> None:
        base = self.root / "cinder"
        base.mkdir(exist_ok=True)
        conf = base / "cinder.conf"
        conf.write_text(
            f"[DEFAULT]\ntransport_url = rabbit://guest:guest@127.0.0.1:{self.rabbit_port}/\n"
            f"auth_strategy = keystone\nenabled_backends = ceph\nstate_path = {base}\n"
            f"osapi_volume_listen = 127.0.0.1\nosapi_volume_listen_port = {self.cinder_port}\n"
            f"osapi_volume_workers = 1\nmy_ip = 127.0.0.1\nhost = hamal-test\n"
            f"scheduler_driver_init_wait_time = 5\nlog_dir = {base}\n"
            f"[database]\nconnection = sqlite:///{base}/cinder.db\n"
            f"[oslo_concurrency]\nlock_path = {base}/lock\n"
            f"[keystone_authtoken]\nwww_authenticate_uri = http://127.0.0.1:{self.keystone_port}\n"
            f"auth_url = http://127.0.0.1:{self.keystone_port}\nauth_type = password\n"
            f"project_domain_id = default\nuser_domain_id = default\nproject_name = admin\n"
            f"username = admin\npassword = {ADMIN_PASSWORD}\ninterface = public\n"
            f"[nova]\nauth_url = http://127.0.0.1:{self.keystone_port}\nauth_type = password\n"
            f"project_domain_id = default\nuser_domain_id = default\nproject_name = admin\n"
            f"username = admin\npassword = {ADMIN_PASSWORD}\ninterface = public\nregion_name = RegionOne\n"
            f"[ceph]\nvolume_driver = cinder.volume.drivers.rbd.RBDDriver\nvolume_backend_name = ceph\n"
            f"rbd_pool = {POOL}\nrbd_ceph_conf = {self.ceph.conf}\nrbd_user = admin\n"
            f"rbd_flatten_volume_from_snapshot = false\nrbd_max_clone_depth = 5\n"
        )
        subprocess.run(["cinder-manage", "--config-file", str(conf), "db", "sync"], check=True,
                       capture_output=True, timeout=600)  # fmt: skip
        self.register_service("volumev3", f"http://127.0.0.1:{self.cinder_port}/v3/%(project_id)s")
        self.cinder_conf = conf
        for service in ("cinder-scheduler", "cinder-volume", "cinder-api"):
            self._spawn(service, [service, "--config-file", str(conf)])
        wait_for("Cinder", lambda: self._volume_service_up() and self._backend_known(), timeout=120)

    def stop_service(self, name: str) -> None:
        p = self.procs.pop(name)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def start_service(self, name: str) -> None:
        self._spawn(name, [name, "--config-file", str(self.cinder_conf)])
        if name == "cinder-api":
            wait_for("Cinder's API", lambda: self._volume_service_up(), timeout=120)

    def _volume_service_up(self) -> bool:
        token = self.token()
        try:
            _, body = _http("GET", f"{self.cinder}/{self.project_id(token)}/os-services", token=token)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False
        states = {s["binary"]: s["state"] for s in body["services"]}
        return states.get("cinder-volume") == "up" and states.get("cinder-scheduler") == "up"

    def _backend_known(self) -> bool:
        """The scheduler has the volume service's capabilities. A service can be up before it
        has them, and a volume created then fails with NoValidBackend (seen in CI)."""
        return bool(self.volumes_api("GET", "scheduler-stats/get_pools")["pools"])

    def project_id(self, token: str | None = None) -> str:
        token = token or self.token()
        req = urllib.request.Request(f"{self.keystone}/auth/tokens")
        req.add_header("X-Auth-Token", token or "")
        req.add_header("X-Subject-Token", token or "")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["token"]["project"]["id"]

    # Cinder, as a cloud user would use it

    def volumes_api(self, method: str, path: str, body: Any = None, micro: str = "3.44") -> Any:
        token = self.token()
        req_url = f"{self.cinder}/{self.project_id(token)}/{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(req_url, data=data, method=method)
        for k, v in {"Content-Type": "application/json", "X-Auth-Token": token or "",
                     "OpenStack-API-Version": f"volume {micro}"}.items():  # fmt: skip
            req.add_header(k, v)
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return json.loads(raw) if raw else None

    def create_volume(self, name: str, size_gib: int = 1) -> str:
        vol = self.volumes_api("POST", "volumes", {"volume": {"name": name, "size": size_gib}})["volume"]

        def available() -> bool:
            status = self.volumes_api("GET", f"volumes/{vol['id']}")["volume"]["status"]
            if status == "error":  # final: say so now, not after the timeout
                raise AssertionError(f"Cinder could not create volume {name}: see {self.root}/cinder/*.log")
            return status == "available"

        wait_for(f"volume {name}", available, timeout=120)
        return str(vol["id"])

    def attach(self, vid: str, server: str) -> None:
        """Attaches a volume to a (fake Nova) server, as Nova would: an attachment, completed."""
        connector = {"host": "compute-1", "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux"}
        att = self.volumes_api(
            "POST",
            "attachments",
            {"attachment": {"volume_uuid": vid, "instance_uuid": server, "connector": connector}},
        )["attachment"]
        self.volumes_api("POST", f"attachments/{att['id']}/action", {"os-complete": None})
        wait_for(f"volume {vid} in use", lambda: self.volumes_api("GET", f"volumes/{vid}")["volume"]["status"]
                 == "in-use", timeout=60)  # fmt: skip

    def detach(self, vid: str) -> None:
        for att in self.volumes_api("GET", f"attachments?volume_id={vid}", micro="3.27")["attachments"]:
            self.volumes_api("DELETE", f"attachments/{att['id']}", micro="3.27")
        status = lambda: self.volumes_api("GET", f"volumes/{vid}")["volume"]["status"]  # noqa: E731
        wait_for(f"volume {vid} detached", lambda: status() == "available", timeout=60)

    def extend(self, vid: str, gib: int) -> None:
        """Extends an in-use volume (Cinder tells Nova, here the fake)."""
        self.volumes_api("POST", f"volumes/{vid}/action", {"os-extend": {"new_size": gib}}, micro="3.42")

        def extended() -> bool:
            vol = self.volumes_api("GET", f"volumes/{vid}")["volume"]
            return bool(vol["size"] == gib and vol["status"] == "in-use")

        wait_for(f"volume {vid} extended", extended, timeout=120)

    def wait_gone(self, snapshot_id: str) -> None:
        def gone() -> bool:
            try:
                self.volumes_api("GET", f"snapshots/{snapshot_id}")
            except urllib.error.HTTPError as e:
                return e.code == 404
            return False

        wait_for(f"snapshot {snapshot_id} deleted", gone, timeout=120)


if __name__ == "__main__":  # manual: python tests/openstack_cloud.py DIR
    import sys

    root = Path(sys.argv[1])
    ceph = CephCluster(root / "ceph", rgw=False, mgr=True)
    ceph.start()
    cloud = OpenStack(root / "os", ceph)
    try:
        t0 = time.monotonic()
        cloud.start()
        print("up in", round(time.monotonic() - t0, 1), "s")
        vid = cloud.create_volume("v1")
        print("volume", vid, time.monotonic() - t0)
    finally:
        cloud.stop()
        ceph.stop()
