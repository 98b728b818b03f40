"""An HTTP proxy on 127.0.0.1 that forwards to an S3 server but fails some requests on purpose:
every ``every``-th request gets a 503 SlowDown or has its connection dropped without an answer.
The Host header is passed through unchanged, so SigV4 signatures stay valid."""

from __future__ import annotations

import http.client
import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"


class FaultyProxy:
    def __init__(self, upstream: str, every: int = 4) -> None:
        up = urlparse(upstream)
        counter = itertools.count(1)
        self.faults = {"503": 0, "reset": 0}
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
                if n % every == 0:
                    if (n // every) % 2:
                        proxy.faults["503"] += 1
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOW_DOWN)))
                        self.end_headers()
                        self.wfile.write(SLOW_DOWN)
                    else:
                        proxy.faults["reset"] += 1
                        self.close_connection = True
                        self.connection.shutdown(2)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
