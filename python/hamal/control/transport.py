"""HTTPS to the control plane with the server's key pinned, and Mass's JSON envelope.

``[mass] public_key_path`` holds the console's public key (a PEM ``PUBLIC KEY``, or a PEM
certificate whose key is used): the TLS handshake is made without a CA check and the server's
key must then be exactly that one, before a single byte of a request (with its ``auth_key``) is
sent. Without that file the system CA store and the host name are checked as usual. A plain
``http://`` endpoint works, with a warning from the caller. Every failure is a ``MassError``
whose ``kind`` says where it failed, so ``hamal mass check`` can say it in one line.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from hamal.errors import ConfigError, MassError

OK_CODE = "00000000"
AUTH_REJECTED = "10000401"
UNKNOWN_PROXY = "10000404"
#: Largest answer read from Mass (a task list of tens of thousands of tasks fits): a bigger one
#: is refused unread, so a broken or hostile server cannot fill the proxy's memory.
MAX_ANSWER = 64 << 20


def load_pinned_key(path: str) -> bytes:
    """The DER SubjectPublicKeyInfo of the PEM public key or certificate at ``path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(f"[mass] public_key_path = {path}: cannot read: {e.strerror}") from None
    try:
        if b"BEGIN CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ConfigError(
            f"[mass] public_key_path = {path}: not a PEM public key or certificate ({e})"
        ) from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_of_cert(der_cert: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_der_x509_certificate(der_cert).public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(spki: bytes) -> str:
    return hashlib.sha256(spki).hexdigest()[:16]


class _Connection(http.client.HTTPSConnection):
    """One TLS connection; ``pinned`` set: the server's key must be that one."""

    def __init__(self, host: str, port: int, timeout: float, ctx: ssl.SSLContext, pinned: bytes | None):
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._ctx, self._pinned = ctx, pinned

    def connect(self) -> None:
        where = f"{self.host}:{self.port}"
        try:
            http.client.HTTPConnection.connect(self)
        except socket.gaierror as e:
            raise MassError("dns", f"cannot resolve {self.host}: {e.strerror}") from None
        except socket.timeout:
            raise MassError("timeout", f"no TCP connection to {where} within {self.timeout:g} s") from None
        except OSError as e:
            raise MassError("tcp", f"cannot connect to {where}: {e.strerror or e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests, no waits
        try:
            self.sock = self._ctx.wrap_socket(self.sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raise MassError("tls", f"TLS with {where}: certificate not trusted: {e.verify_message}") from None
        except (ssl.SSLError, OSError) as e:
            raise MassError("tls", f"TLS handshake with {where} failed: {e}") from None
        if self._pinned is not None:
            der = self.sock.getpeercert(binary_form=True)
            got = spki_of_cert(der) if der else b""
            if got != self._pinned:
                self.sock.close()
                raise MassError(
                    "pin",
                    f"TLS with {where}: the server's public key (sha256 {fingerprint(got)}...) is not "
                    f"the pinned one (sha256 {fingerprint(self._pinned)}...)",
                )


@dataclass
class Answer:
    status: int
    etag: str | None
    data: Any


class Transport:
    """Requests to ``base_url`` + path, one kept-alive connection, JSON in and out."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float, public_key_path: str) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("https", "http") or not u.hostname:
            raise ConfigError(f"[mass] mass_endpoint = {base_url}: not an https:// (or http://) URL")
        self.base_url = base_url.rstrip("/")
        self.scheme, self.host = u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path.rstrip("/")
        self.headers = headers
        self.timeout = timeout
        self.pinned: bytes | None = None
        self.pin_path: str | None = None
        self.ctx: ssl.SSLContext | None = None
        if self.scheme == "https":
            if public_key_path and os.path.exists(public_key_path):
                self.pinned = load_pinned_key(public_key_path)
                self.pin_path = public_key_path
                self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self.ctx.check_hostname = False
                self.ctx.verify_mode = ssl.CERT_NONE  # the pin replaces the CA check
            else:
                self.ctx = ssl.create_default_context()
        self.conn: http.client.HTTPConnection | None = None

    def trust(self) -> str:
        """How the server is trusted, for messages."""
        if self.scheme == "http":
            return "plain HTTP, not encrypted"
        return f"TLS, key pinned by {self.pin_path}" if self.pin_path else "TLS, system CA store"

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.ctx is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return _Connection(self.host, self.port, timeout, self.ctx, self.pinned)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        etag: str | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """One request; a kept-alive connection the server closed meanwhile is reopened once."""
        for reused in (self.conn is not None, False):
            try:
                return self._once(method, path, body, etag, timeout or self.timeout)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if not reused:
                    raise MassError("tcp", f"{method} {self.base_url}{path}: connection lost: {e}") from None
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: Any, etag: str | None, timeout: float) -> Answer:
        url = f"{self.base_url}{path}"
        if self.conn is None:
            self.conn = self._connect(timeout)
            self.conn.connect()
        self.conn.timeout = timeout
        if self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        headers = {"Accept": "application/json", **self.headers}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if etag:
            headers["If-None-Match"] = etag
        try:
            self.conn.request(method, self.path + path, body=payload, headers=headers)
            resp = self.conn.getresponse()
            declared = resp.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_ANSWER:
                raw = b"x" * (MAX_ANSWER + 1)  # not read: refused below
            else:
                raw = resp.read(MAX_ANSWER + 1)
        except socket.timeout:
            raise MassError("timeout", f"{method} {url}: no answer within {timeout:g} s") from None
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            raise
        except (OSError, http.client.HTTPException) as e:
            raise MassError("tcp", f"{method} {url}: {e}") from None
        if len(raw) > MAX_ANSWER:
            self.close()
            raise MassError("protocol", f"{method} {url}: an answer of more than {MAX_ANSWER} bytes, refused")
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        if resp.status == 304:
            return Answer(304, etag, None)
        try:
            env = json.loads(raw) if raw else None
        except ValueError:
            env = None
        if not isinstance(env, dict) or not isinstance(env.get("code"), str):
            if resp.status == 404:
                raise MassError("route", f"{method} {url} answered 404: no such route", status=404)
            raise MassError(
                "protocol",
                f"{method} {url} answered HTTP {resp.status} without Mass's JSON",
                status=resp.status,
            )
        code, message = env["code"], str(env.get("message") or "")
        if 200 <= resp.status < 300 and code == OK_CODE:
            return Answer(resp.status, resp.getheader("ETag"), env.get("data"))
        what = f"{method} {url}: HTTP {resp.status}, code {code}: {message or 'no message'}"
        if code == AUTH_REJECTED or resp.status in (401, 403):
            raise MassError("auth", what, status=resp.status, code=code)
        if code == UNKNOWN_PROXY:
            raise MassError("unknown_proxy", what, status=resp.status, code=code)
        raise MassError("http", what, status=resp.status, code=code)
