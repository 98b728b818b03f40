"""The one faked part of the tests' OpenStack: the few Nova routes the adapter uses, its servers
kept here and their volumes read from Cinder's attachments, so the two stay consistent.
Registered in Keystone's catalog as the ``compute`` service. Tokens are checked against
Keystone (a wrong one is a 401, as Nova would say)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ceph_cluster import free_port


class FakeNova:
    def __init__(self, cloud: Any) -> None:
        self.cloud = cloud
        self.port = free_port()
        self.servers: dict[str, dict[str, Any]] = {}
        self.events: list[Any] = []
        self.calls: list[str] = []
        nova = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                nova.serve(self, "GET")

            def do_POST(self) -> None:
                nova.serve(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2.1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_server(self, sid: str, name: str, addresses: dict[str, list[str]]) -> None:
        self.servers[sid] = {
            "id": sid,
            "name": name,
            "status": "ACTIVE",
            "addresses": {
                net: [{"addr": a, "version": 6 if ":" in a else 4} for a in ips]
                for net, ips in addresses.items()
            },
        }

    def _token_ok(self, token: str | None) -> bool:
        req = urllib.request.Request(f"{self.cloud.keystone}/auth/tokens")
        req.add_header("X-Auth-Token", token or "")
        req.add_header("X-Subject-Token", token or "")
        try:
            with urllib.request.urlopen(req, timeout=30):
                return True
        except urllib.error.HTTPError:
            return False

    def serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        self.calls.append(f"{method} {h.path}")
        if not self._token_ok(h.headers.get("X-Auth-Token")):
            return self.send(
                h,
                401,
                {"error": {"code": 401, "message": "The request you have made requires authentication."}},
            )
        parts = h.path.split("?")[0].strip("/").split("/")
        if method == "POST" and parts[-1] == "os-server-external-events":  # Cinder's volume-extended
            length = int(h.headers.get("Content-Length") or 0)
            events = json.loads(h.rfile.read(length))["events"]
            self.events += events
            return self.send(h, 200, {"events": [e | {"code": 200, "status": "completed"} for e in events]})
        if len(parts) >= 3 and parts[1] == "servers" and parts[2] in self.servers:
            sid = parts[2]
            if len(parts) == 3:
                return self.send(h, 200, {"server": self.servers[sid]})
            if parts[3] == "os-volume_attachments" and len(parts) == 5:
                # Cinder asks before it deletes an attachment: a detaching Nova has let it go.
                return self.send(h, 404, {"itemNotFound": {"code": 404, "message": "volume not attached"}})
            if parts[3] == "os-volume_attachments":
                found = self.cloud.volumes_api("GET", f"attachments?instance_id={sid}", micro="3.27")
                att = [
                    {
                        "id": a["volume_id"],
                        "volumeId": a["volume_id"],
                        "serverId": sid,
                        "device": f"/dev/vd{chr(98 + i)}",
                    }
                    for i, a in enumerate(found["attachments"])
                ]
                return self.send(h, 200, {"volumeAttachments": att})
        self.send(h, 404, {"itemNotFound": {"code": 404, "message": f"{h.path} not found"}})

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)
