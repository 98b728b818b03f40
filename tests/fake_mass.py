"""A fake Mass for the tests: HTTPS on 127.0.0.1 with a self-signed certificate, the routes of
``docs/mass-api.yaml``, and every request (and every answer it gives) validated against that
document with jsonschema. What it received is kept for the tests to look at; faults (down,
500s, slow answers, a forgotten proxy) are switched on by the tests."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from certs import self_signed_ca_true
from cryptography import x509
from cryptography.hazmat.primitives import serialization

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "mass-api.yaml"
BASE = "/hypermotion/v1"


class Contract:
    """The OpenAPI document as route patterns and jsonschema validators."""

    def __init__(self, path: Path = CONTRACT) -> None:
        self.doc = yaml.safe_load(path.read_text())
        self.routes: list[tuple[re.Pattern[str], str, str]] = []
        self.validators: dict[int, jsonschema.Draft202012Validator] = {}
        for template in self.doc["paths"]:
            pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
            self.routes.append((re.compile(f"^{pattern}$"), template, template))

    def _schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {**schema, "components": self.doc["components"]}

    def resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            node: Any = self.doc
            for part in obj["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            obj = node
        return obj

    def errors(self, schema: dict[str, Any], value: Any) -> list[str]:
        v = self.validators.get(id(schema))
        if v is None:
            v = self.validators[id(schema)] = jsonschema.Draft202012Validator(self._schema(schema))
        return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(value)]

    def match(self, method: str, path: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
        for rx, template, _ in self.routes:
            m = rx.match(path)
            if m:
                return self.doc["paths"][template].get(method.lower()), m.groupdict()
        return None, {}

    def check_request(self, op: dict[str, Any], params: dict[str, str], headers: Any, body: Any) -> list[str]:
        problems = []
        if not headers.get("X-Auth-Key"):
            problems.append("no X-Auth-Key header")
        for p in op.get("parameters", []):
            p = self.resolve(p)
            value = params.get(p["name"]) if p["in"] == "path" else headers.get(p["name"])
            if value is None:
                if p.get("required"):
                    problems.append(f"missing {p['in']} parameter {p['name']}")
                continue
            problems += [f"{p['name']}: {e}" for e in self.errors(p["schema"], value)]
        rb = op.get("requestBody")
        if rb:
            schema = rb["content"]["application/json"]["schema"]
            problems += [f"body {e}" for e in self.errors(schema, body)]
        elif body is not None:
            problems.append("a body on a route that takes none")
        return problems

    def check_response(self, op: dict[str, Any], status: int, body: Any) -> list[str]:
        resp = op["responses"].get(str(status)) or op["responses"].get("default")
        if resp is None:
            return [f"status {status} not in the contract"]
        resp = self.resolve(resp)
        if "content" not in resp:
            return [] if body is None else ["a body where the contract has none"]
        return self.errors(resp["content"]["application/json"]["schema"], body)


def self_signed(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key; returns (cert, key, public key PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_ca_true(folder)
    pub = folder / "public_key"
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    pub.write_bytes(
        c.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return cert, key, pub


class FakeMass:
    def __init__(
        self, folder: Path, auth_key: str = "mass-auth-key-0001", proxy_id: str = "proxy-test-1"
    ) -> None:
        self.cert, self.key, self.public_key = self_signed(folder)
        self.contract = Contract()
        self.auth_key = auth_key
        self.proxy_id = proxy_id
        self.lock = threading.Lock()
        self.port = _free_port()
        self.server: ThreadingHTTPServer | None = None
        self.conns: set[socket.socket] = set()
        # Faults
        self.fail_next = 0
        self.delay = 0.0
        self.registered = False
        # Lies: its own answers then break the contract, so they are not checked against it
        self.lying = False
        self.forget = False  # every call after registering: "unknown proxy"
        self.padding = 0  # bytes of filler in the task list's answer
        # What it has and what it received
        self.tasks: list[Any] = []
        self.commands: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.message_ids: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}{BASE}"

    def conf(self, **over: Any) -> str:
        values = {
            "mass_endpoint": self.endpoint,
            "auth_key": self.auth_key,
            "hyper_exporter_id": self.proxy_id,
            "public_key_path": str(self.public_key),
            "default_request_timeout": 3,
            "enable_get_public_ips": "True",
            "get_public_ip_timeout": 2,
        } | over
        return "[mass]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())

    # Running

    def start(self) -> FakeMass:
        fake = self

        class Handler(_Handler):
            mass = fake

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Mass goes down: the listener and every open connection close."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.lock:
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    # Mass's side of the data

    def set_tasks(self, tasks: list[Any]) -> None:
        with self.lock:
            self.tasks = list(tasks)

    def command(self, cid: str, task_id: str, action: str, reason: str = "") -> None:
        with self.lock:
            self.commands.append({"id": cid, "task_id": task_id, "action": action, "reason": reason})

    def etag(self) -> str:
        blob = json.dumps([self.tasks, self.commands], sort_keys=True).encode()
        return '"' + hashlib.sha256(blob).hexdigest()[:16] + '"'

    def results_of(self, tid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.results if r["task_id"] == tid]

    def count(self, route_end: str) -> int:
        with self.lock:
            return sum(1 for _, p in self.requests if p.endswith(route_end))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envelope(data: Any = None, code: str = "00000000", message: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        out["data"] = data
    return out


class _Handler(BaseHTTPRequestHandler):
    mass: FakeMass
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.mass.lock:
            self.mass.conns.add(self.connection)

    def finish(self) -> None:
        with self.mass.lock:
            self.mass.conns.discard(self.connection)
        super().finish()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _send(
        self, status: int, body: Any, op: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> None:
        if op is not None and not self.mass.lying:
            for v in self.mass.contract.check_response(op, status, body):
                self.mass.violations.append(f"answer {status} to {self.command} {self.path}: {v}")
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if raw:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _send_padded(self, body: dict[str, Any], padding: int, tag: str) -> None:
        """``body`` with a ``padding`` of that many bytes, chunked and made as it is sent (the
        test process does not hold it), with no length announced."""
        head, tail = json.dumps({**body, "padding": ""}).rsplit('""', 1)
        self.send_response(200)
        self.send_header("ETag", tag)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b"x" * (1 << 20)
        try:
            for part in (head.encode() + b'"', *[piece] * (padding >> 20), b'"' + tail.encode()):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy stopped reading: what the test wants

    def _serve(self, method: str) -> None:
        m = self.mass
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with m.lock:
            m.requests.append((method, self.path))
        if not self.path.startswith(BASE + "/"):
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        path = self.path[len(BASE) :]
        op, params = m.contract.match(method, path)
        if op is None:
            m.violations.append(f"{method} {path}: not in the contract")
            return self._send(404, envelope(code="10000404", message="no such route"), None)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = "<not JSON>"
        problems = m.contract.check_request(op, params, self.headers, body)
        if m.delay:
            time.sleep(m.delay)
        if self.headers.get("X-Auth-Key") != m.auth_key:
            return self._send(401, envelope(code="10000401", message="auth_key rejected"), op)
        if problems:
            m.violations += [f"{method} {path}: {p}" for p in problems]
            return self._send(400, envelope(code="10000400", message="; ".join(problems)), op)
        if m.fail_next > 0:
            m.fail_next -= 1
            return self._send(500, envelope(code="10000500", message="injected failure"), op)
        name = op["operationId"]
        if params.get("proxy_id", m.proxy_id) != m.proxy_id:
            return self._send(404, envelope(code="10000404", message="unknown proxy"), op)
        if name not in ("ping", "publicIp", "register") and (m.forget or not m.registered):
            return self._send(404, envelope(code="10000404", message="register first"), op)
        status, data, headers = getattr(self, f"op_{name}")(body, params)
        if status is not None:
            self._send(status, envelope(data) if status == 200 else data, op, headers)

    # Routes

    def op_ping(self, body: Any, params: dict[str, str]) -> Any:
        return 200, {"version": "fake-mass-1", "server_time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}, None

    def op_publicIp(self, body: Any, params: dict[str, str]) -> Any:
        return 200, {"ip": self.client_address[0]}, None

    def op_register(self, body: Any, params: dict[str, str]) -> Any:
        with self.mass.lock:
            self.mass.registrations.append(body)
            self.mass.registered = True
        return 200, {"proxy_id": self.mass.proxy_id}, None

    def op_heartbeat(self, body: Any, params: dict[str, str]) -> Any:
        m = self.mass
        with m.lock:
            m.heartbeats.append(body)
            data = {"tasks_changed": body.get("tasks_etag") != m.etag(), "commands": list(m.commands)}
        return 200, data, None

    def op_listTasks(self, body: Any, params: dict[str, str]) -> Any:
        m = self.mass
        with m.lock:
            tag = m.etag()
            if self.headers.get("If-None-Match") == tag:
                return 304, None, {"ETag": tag}
            data = {"tasks": list(m.tasks), "commands": list(m.commands)}
            if m.padding:
                self._send_padded(envelope(data), m.padding, tag)
                return None, None, None
            return 200, data, {"ETag": tag}

    def _message(self, kind: list[dict[str, Any]], body: Any) -> Any:
        with self.mass.lock:
            if body["message_id"] not in self.mass.message_ids:  # at-least-once: a resend is known
                self.mass.message_ids.append(body["message_id"])
                kind.append(body)
        return 200, None, None

    def op_taskProgress(self, body: Any, params: dict[str, str]) -> Any:
        return self._message(self.mass.progress, body)

    def op_cycleResult(self, body: Any, params: dict[str, str]) -> Any:
        return self._message(self.mass.results, body)

    def op_taskRejection(self, body: Any, params: dict[str, str]) -> Any:
        return self._message(self.mass.rejections, body)

    def op_commandAck(self, body: Any, params: dict[str, str]) -> Any:
        m = self.mass
        with m.lock:
            m.commands = [c for c in m.commands if c["id"] != params["command_id"]]
        return self._message(m.acks, body)
