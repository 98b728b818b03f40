"""An HTTP proxy on 127.0.0.1 that forwards to an S3 server but fails some requests on purpose:
every ``every``-th request gets the next fault of ``faults`` in turn: an error status with an S3
error body ("503", "429", "400", "403"), "reset" (the connection dropped without an answer) or
"cut" (the server's answer, its body cut off halfway: only GETs of objects with a body count)
or "flip" (a chunk object's body with one byte flipped, same length: only GETs under chunks/);
listings (ListObjectsV2) can lie too: "list-loop" (every page says more follows, under a token
that gives the first page again: pagination that never ends) and "list-foreign" (the first key
replaced by one outside the prefix asked for); "drop-put" answers a chunk's PUT with success
(and the right ETag) without storing it.
The Host header is passed through unchanged, so SigV4 signatures stay valid. ``payloads``
counts how PUT bodies were signed: "unsigned", "sha256" (the body's own hash) or "wrong";
``calls`` counts requests by method and the folder of their key under the store's prefix
(path-style: ``/bucket/prefix/versions/d0/x.json`` is ``("GET", "versions")``)."""

from __future__ import annotations

import collections
import hashlib
import http.client
import itertools
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

CODES = {"503": "SlowDown", "429": "SlowDown", "400": "InvalidRequest", "403": "AccessDenied"}


def error_body(status: str) -> bytes:
    code = CODES[status]
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()


def lying_listing(kind: str, page: bytes) -> bytes:
    """A ListObjectsV2 page that says more follows under a token giving this page again
    ("list-loop"), or whose first key lies outside the prefix ("list-foreign")."""
    if kind == "list-foreign":
        return re.sub(rb"<Key>[^<]*</Key>", b"<Key>x</Key>", page, count=1)
    page = page.replace(b"<IsTruncated>false</IsTruncated>", b"<IsTruncated>true</IsTruncated>")
    page = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"", page)
    token = b"<NextContinuationToken>hamal-loop</NextContinuationToken>"
    return page.replace(b"</ListBucketResult>", token + b"</ListBucketResult>")


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        every: int = 4,
        faults: tuple[str, ...] = ("503", "reset"),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``every = 0`` injects nothing; ``tls = (certificate, key)`` serves HTTPS."""
        up = urlparse(upstream)
        counter = itertools.count(1)
        self.faults: collections.Counter[str] = collections.Counter()
        self.payloads: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.requests = 0
        self.first_page = b""
        self.flipped: set[str] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def relay(self) -> None:
                try:
                    self.forward(next(counter))
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up on this one

            def forward(self, n: int) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests += 1
                parts = urlparse(self.path).path.split("/")
                proxy.calls[(self.command, parts[3] if len(parts) > 4 else "")] += 1
                if self.command == "PUT" and body:
                    signed = self.headers.get("x-amz-content-sha256", "")
                    proxy.payloads[
                        "unsigned"
                        if signed == "UNSIGNED-PAYLOAD"
                        else "sha256"
                        if signed == hashlib.sha256(body).hexdigest()
                        else "wrong"
                    ] += 1
                kind = faults[(n // every - 1) % len(faults)] if every and n % every == 0 else None
                listing = self.command == "GET" and "list-type=2" in self.path
                if kind == "drop-put" and self.command == "PUT" and "/chunks/" in self.path:
                    proxy.faults[kind] += 1  # acknowledged, never stored
                    self.send_response(200)
                    self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind == "list-loop" and listing and "continuation-token=hamal-loop" in self.path:
                    proxy.faults[kind] += 1
                    return self.answer(200, proxy.first_page)
                if kind is not None and kind not in ("cut", "flip", "list-loop", "list-foreign", "drop-put"):
                    proxy.faults[kind] += 1
                    if kind == "reset":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    answer = error_body(kind)
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                if kind in ("list-loop", "list-foreign") and listing and r.status == 200:
                    proxy.faults[kind] += 1
                    data = lying_listing(kind, data)
                    if kind == "list-loop":
                        proxy.first_page = data
                elif kind == "flip" and self.command == "GET" and r.status == 200 and "/chunks/" in self.path:
                    # A bit flips in transit once per object, not at every read.
                    if self.path not in proxy.flipped:
                        proxy.flipped.add(self.path)
                        proxy.faults["flip"] += 1
                        garbled = bytearray(data)
                        garbled[len(data) // 2] ^= 0x01
                        data = bytes(garbled)
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # A HEAD's answer has no body but tells the object's length, as the server said it.
                length = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if kind == "cut" and self.command == "GET" and r.status == 200 and len(data) > 1:
                    proxy.faults["cut"] += 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif self.command != "HEAD":
                    self.wfile.write(data)

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
