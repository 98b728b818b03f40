"""The routes of ``docs/mass-api.yaml``: one method per route, bodies as the contract says."""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any

from hamal import _native
from hamal.control.transport import Answer, Transport
from hamal.errors import ConfigError
from hamal.service.tasks import PLATFORMS, SCHEMA_VERSION

TARGET_KINDS = ["file", "block", "nbd", "dir", "s3"]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def message_id() -> str:
    """Mass recognises a resent message by this id (at-least-once delivery)."""
    return uuid.uuid4().hex


def host_addresses() -> list[str]:
    """This host's addresses as its name resolves (no traffic is sent)."""
    try:
        _, _, addrs = socket.gethostbyname_ex(socket.gethostname())
    except OSError:
        return []
    return sorted(a for a in set(addrs) if not a.startswith("127."))


def hamal_info(public: list[str], started: str) -> dict[str, Any]:
    """What the proxy tells Mass when it registers (also written to ``hamal_info_path``)."""
    return {
        "version": _native.__version__,
        "host": socket.gethostname(),
        "addresses": host_addresses(),
        "public_addresses": public,
        "started": started,
        "capabilities": {
            "platforms": list(PLATFORMS),
            "targets": TARGET_KINDS,
            "task_schema": SCHEMA_VERSION,
        },
    }


class MassClient:
    def __init__(self, conf: dict[str, Any]) -> None:
        m = conf["mass"]
        self.endpoint = str(m["mass_endpoint"])
        if not self.endpoint:
            raise ConfigError("[mass] mass_endpoint is not set: there is no control plane to talk to")
        self.proxy_id = str(m["hyper_exporter_id"])
        if not self.proxy_id:
            raise ConfigError("[mass] hyper_exporter_id is not set: Mass cannot tell this proxy apart")
        headers = {"X-Auth-Key": str(m["auth_key"]), "X-Hyper-Exporter-Id": self.proxy_id}
        self.http = Transport(
            self.endpoint, headers, float(m["default_request_timeout"]), str(m["public_key_path"])
        )
        self.public_ip_timeout = float(m["get_public_ip_timeout"])

    def route(self, rest: str) -> str:
        return f"/sync-proxies/{self.proxy_id}/{rest}"

    def ping(self) -> Any:
        return self.http.request("GET", "/ping").data

    def public_ip(self) -> str:
        data = self.http.request("GET", self.route("public-ip"), timeout=self.public_ip_timeout).data
        return str(data["ip"])

    def register(self, info: dict[str, Any]) -> Any:
        return self.http.request("POST", self.route("register"), info).data

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        data = self.http.request("POST", self.route("heartbeat"), body).data
        return data if isinstance(data, dict) else {}

    def tasks(self, etag: str | None) -> Answer:
        return self.http.request("GET", self.route("tasks"), etag=etag)

    def post(self, rest: str, body: dict[str, Any]) -> Any:
        return self.http.request("POST", self.route(rest), body).data

    def close(self) -> None:
        self.http.close()


def lib_free_bytes(lib_dir: str) -> int:
    try:
        st = os.statvfs(lib_dir)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
