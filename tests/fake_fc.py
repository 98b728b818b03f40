"""A fake FusionCompute for the tests, written from the facts in the README ("FusionCompute: what
is unverified") and the names in ``hamal.platforms.fc_names``: a VRM (HTTPS REST on 127.0.0.1)
and a CNA backup data channel (TCP and TLS, the framing of ``rust/hamal-core/src/fc/wire.rs``),
serving VM volumes from local raw files.

Volumes change through ``write`` (which CBT records per block of 64 KiB). A CBT backup snapshot
copies each volume's file as it is, numbers the volume's changes (chgID + 1) and keeps the set
of blocks changed since the previous number; ``getcbt`` answers the union since a chgID, in
pages of at most ``page_bits`` bits. Every call is recorded; faults are switched on by name.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PASSWORD = "fc-Secret-1"
SECTOR_OF_BLOCK = 128  # 64 KiB blocks
BLOCK = SECTOR_OF_BLOCK * 512
SITE = "/service/sites/S1"
HEADER = struct.Struct(">IHHIIQII")
MAGIC, VERSION = int.from_bytes(b"FCBD", "big"), 1
HELLO, WELCOME, READ, DATA, ERROR = 1, 2, 3, 4, 5
BUSY = 10300412


@dataclass
class Volume:
    vid: str
    path: Path
    size: int
    seq: int
    independent: bool = False
    cbt_time: str = "2026-01-01 00:00:00"
    chg: int = 0
    dirty: set[int] = field(default_factory=set)
    written: set[int] = field(default_factory=set)
    #: chgID -> blocks changed between the snapshot numbered chgID - 1 and it.
    history: dict[int, set[int]] = field(default_factory=dict)

    @property
    def urn(self) -> str:
        return f"urn:sites:S1:volumes:{self.vid}"

    @property
    def uri(self) -> str:
        return f"{SITE}/volumes/{self.vid}"


@dataclass
class Snapshot:
    sid: str
    name: str
    vm: str
    type: str
    #: volume id -> (snapUuid, chgID, CBT create time, frozen file, allocated blocks)
    vols: dict[str, tuple[str, int, str, Path, set[int]]]

    @property
    def uri(self) -> str:
        return f"{SITE}/vms/{self.vm}/snapshots/{self.sid}"

    @property
    def urn(self) -> str:
        return f"urn:sites:S1:vms:{self.vm}:snapshots:{self.sid}"


class FakeFc:
    def __init__(self, root: Path, cert: tuple[Path, Path], ca: Path, cna_limit: int = 8) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.vms: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, dict[str, Any]] = {}
        self.tokens: set[str] = set()
        self.calls: list[tuple[str, str, Any]] = []
        self.faults: dict[str, Any] = {}
        self.page_bits = 1 << 20
        self.cna_limit = cna_limit
        self.cna_open = 0
        self.cna_peak = 0
        self.cna_refused = 0
        self.bytes_served = 0
        self.reads: list[tuple[int, int]] = []
        #: Benchmarks: plain TCP payloads with sendfile and cached CRCs.
        self.zero_copy = False
        self.crcs: dict[tuple[Path, int, int], int] = {}
        self.cert, self.ca = cert, ca
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.vrm = self._vrm_server()
        self.cna_lan = self._cna_server(tls=False)
        self.cna_ssl = self._cna_server(tls=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.vrm.server_address[1]}"

    def stop(self) -> None:
        for s in (self.vrm, self.cna_lan, self.cna_ssl):
            s.shutdown()
            s.server_close()

    # The inventory, as tests set it up and change it

    def add_vm(self, vid: str, name: str, disks: list[tuple[int, int, bool]], ips: list[str] = ()) -> str:
        """A VM with disks ``(sequence number, size, independent)``; returns its uuid."""
        vm_uuid = str(uuid.uuid4())
        vols = []
        for seq, size, independent in disks:
            v = Volume(f"v{len(self.volumes) + 1}", self.root / f"{vid}-{seq}.raw", size, seq, independent)
            v.path.write_bytes(b"")
            with open(v.path, "r+b") as f:
                f.truncate(size)
            self.volumes[v.vid] = v
            vols.append(v.vid)
        self.vms[vid] = {"uuid": vm_uuid, "name": name, "volumes": vols, "ips": list(ips)}
        return vm_uuid

    def volume(self, vid: str, seq: int) -> Volume:
        (v,) = [self.volumes[x] for x in self.vms[vid]["volumes"] if self.volumes[x].seq == seq]
        return v

    def write(self, v: Volume, offset: int, data: bytes) -> None:
        with self.lock, open(v.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
            blocks = set(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))
            v.dirty |= blocks
            v.written |= blocks

    def grow(self, v: Volume, size: int) -> None:
        with self.lock:
            with open(v.path, "r+b") as f:
                f.truncate(size)
            v.size = size
            self.reset_cbt(v)  # an expansion loses CBT

    def reset_cbt(self, v: Volume) -> None:
        """What HA, a revert or a host reboot does: CBT starts again."""
        with self.lock:
            v.cbt_time = time.strftime("%Y-%m-%d %H:%M:%S") + f".{len(v.history)}"
            v.chg, v.history, v.dirty = 0, {}, set()

    def take_snapshot(self, vid: str, name: str, type_: str = "CBTbackup") -> Snapshot:
        with self.lock:
            sid = str(len(self.snapshots) + 1 + len(self.calls))
            vols = {}
            for x in self.vms[vid]["volumes"]:
                v = self.volumes[x]
                frozen = self.root / f"snap-{sid}-{x}.raw"
                shutil.copyfile(v.path, frozen)
                if type_ == "CBTbackup":
                    v.chg += 1
                    v.history[v.chg] = v.dirty
                    v.dirty = set()
                vols[x] = (f"snapuuid-{sid}-{x}", v.chg, v.cbt_time, frozen, set(v.written))
            s = Snapshot(sid, name, vid, type_, vols)
            self.snapshots[sid] = s
            return s

    def snapshot_names(self, vid: str) -> list[str]:
        return sorted(s.name for s in self.snapshots.values() if s.vm == vid)

    def calls_to(self, fragment: str) -> list[tuple[str, str, Any]]:
        return [c for c in self.calls if fragment in c[1]]

    # The VRM

    def _vrm_server(self) -> ThreadingHTTPServer:
        fc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                status, doc, headers = fc.handle(self.command, self.path, dict(self.headers), body)
                raw = json.dumps(doc).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = _serve

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.socket = self.ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _task(self, then: Any = None, fault: str | None = None) -> dict[str, str]:
        tid = str(len(self.tasks) + 1)
        self.tasks[tid] = {"then": then, "done_at": time.monotonic() + 0.05, "fault": fault}
        return {"taskUrn": f"urn:sites:S1:tasks:{tid}", "taskUri": f"{SITE}/tasks/{tid}"}

    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, Any]:
        with self.lock:
            self.calls.append((method, path, body))
            if "version=" not in headers.get("Accept", ""):
                return 400, {"errorCode": "10000022", "errorDes": "API version missing"}, None
            if path == "/service/session" and method == "POST":
                return self._login(headers)
            if headers.get("X-Auth-Token") not in self.tokens:
                return 401, {"errorCode": "10000040", "errorDes": "token expired"}, None
            try:
                return self._route(method, path.split("?")[0], body)
            except KeyError as e:
                return 404, {"errorCode": "10000404", "errorDes": f"not found: {e}"}, None

    def _login(self, h: dict[str, str]) -> tuple[int, Any, Any]:
        alg = h.get("X-ENCRYPT-ALGORITHM")
        ok = h.get("X-Auth-User") == "hamal" and h.get("X-Auth-Key") == PASSWORD and alg == "1"
        if not ok or self.faults.get("login"):
            return 401, {"errorCode": "10000010", "errorDes": "user name or password wrong"}, None
        token = uuid.uuid4().hex
        self.tokens.add(token)
        return 200, {}, {"X-Auth-Token": token}

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any, Any]:
        parts = path.strip("/").split("/")  # service sites S1 ...
        rest = parts[3:]
        if path == "/service/session" and method == "DELETE":
            return 200, {}, None
        if path == "/service/sites":
            return 200, {"sites": [{"uri": SITE, "urn": "urn:sites:S1"}]}, None
        if rest == ["vms"]:
            vms = [
                {
                    "uuid": v["uuid"],
                    "name": v["name"],
                    "uri": f"{SITE}/vms/{k}",
                    "urn": f"urn:sites:S1:vms:{k}",
                }
                for k, v in self.vms.items()
            ]
            return 200, {"vms": vms}, None
        if rest[:1] == ["tasks"]:
            return self._task_status(rest[1])
        if rest[:1] == ["vms"]:
            return self._vm_route(method, rest[1], rest[2:], body)
        if rest[:1] == ["volumes"]:
            return self._volume_route(method, self.volumes[rest[1]], rest[2:], body)
        return 404, {"errorCode": "10000404", "errorDes": path}, None

    def _task_status(self, tid: str) -> tuple[int, Any, Any]:
        t = self.tasks[tid]
        if t["fault"] == "timeout" or time.monotonic() < t["done_at"]:
            return 200, {"status": "running", "progress": 50}, None
        if t["fault"] == "fail":
            return 200, {"status": "failed", "reasonDes": "snapshot failed on the storage"}, None
        if t["then"] is not None:
            t["then"]()
            t["then"] = None
        return 200, {"status": "success", "progress": 100}, None

    def _vm_doc(self, vid: str) -> dict[str, Any]:
        vm = self.vms[vid]
        disks = [
            {
                "volumeUrn": self.volumes[x].urn,
                "quantityGB": self.volumes[x].size / (1 << 30),
                "sequenceNum": self.volumes[x].seq,
                "isIndependent": self.volumes[x].independent,
            }
            for x in vm["volumes"]
        ]
        nics = [
            {
                "mac": "28:6e:d4:88:c6:01",
                "ip": vm["ips"][0] if vm["ips"] else "0.0.0.0",
                "ips6": vm["ips"][1:],
            }
        ]
        return {
            "uuid": vm["uuid"],
            "name": vm["name"],
            "uri": f"{SITE}/vms/{vid}",
            "urn": f"urn:sites:S1:vms:{vid}",
            "vmConfig": {"disks": disks, "nics": nics},
        }

    def _snap_doc(self, s: Snapshot) -> dict[str, Any]:
        vols = [
            {"volumeUrn": self.volumes[x].urn, "snapUuid": u, "chgID": str(c), "volCBTCreateTime": t}
            for x, (u, c, t, _, _) in s.vols.items()
        ]
        return {"name": s.name, "type": s.type, "uri": s.uri, "urn": s.urn, "volsnapshots": vols}

    def _vm_route(self, method: str, vid: str, rest: list[str], body: Any) -> tuple[int, Any, Any]:
        if not rest:
            return 200, self._vm_doc(vid), None
        if rest == ["snapshots"] and method == "GET":
            roots = [
                {"name": s.name, "uri": s.uri, "urn": s.urn, "type": s.type, "childSnapshots": []}
                for s in self.snapshots.values()
                if s.vm == vid
            ]
            return 200, {"rootSnapshots": roots}, None
        if rest == ["snapshots"] and method == "POST":
            fault = self.faults.get("snapshot_task")
            s = self.take_snapshot(vid, body["name"], body["type"])
            return 200, {"uri": s.uri, "urn": s.urn, **self._task(fault=fault)}, None
        s = self.snapshots[rest[1]]
        if method == "GET":
            return 200, self._snap_doc(s), None
        if method == "DELETE":
            if self.faults.get("delete"):
                return 400, {"errorCode": "10300200", "errorDes": "snapshot is busy"}, None
            return 200, self._task(then=lambda: self._drop_snapshot(s.sid)), None
        return 405, {}, None

    def _drop_snapshot(self, sid: str) -> None:
        s = self.snapshots.pop(sid, None)
        for _, _, _, frozen, _ in s.vols.values() if s else []:
            frozen.unlink(missing_ok=True)

    def _find_snap(self, snap_uuid: str) -> tuple[Snapshot, tuple[str, int, str, Path, set[int]]]:
        for s in self.snapshots.values():
            for vol in s.vols.values():
                if vol[0] == snap_uuid:
                    return s, vol
        raise KeyError(snap_uuid)

    def _volume_route(self, method: str, v: Volume, rest: list[str], body: Any) -> tuple[int, Any, Any]:
        if rest == ["getcbt"]:
            return self._getcbt(v, body)
        if rest == ["backupresources"] and method == "POST":
            _, vol = self._find_snap(self._snap_uuid_of(body["snapUrn1"], v))
            rid = uuid.uuid4().hex[:12]
            tls = body["transMode"] == "lanssl"
            port = (self.cna_ssl if tls else self.cna_lan).server_address[1]
            self.resources[rid] = {
                "resourceUrl": f"res-{rid}",
                "hostIP": "127.0.0.1",
                "hostPort": port,
                "token": uuid.uuid4().hex,
                "caCert": self.ca.read_text() if tls else "",
                "file": vol[3],
                "tls": tls,
                "body": body,
            }
            return 200, {"id": rid, **self._task()}, None
        r = self.resources[rest[1]]
        if method == "GET":
            return 200, {k: r[k] for k in ("resourceUrl", "hostIP", "hostPort", "token", "caCert")}, None
        del self.resources[rest[1]]
        return 200, {}, None

    def _snap_uuid_of(self, snap_urn: str, v: Volume) -> str:
        (s,) = [s for s in self.snapshots.values() if s.urn == snap_urn]
        return s.vols[v.vid][0]

    def _getcbt(self, v: Volume, b: dict[str, Any]) -> tuple[int, Any, Any]:
        fault = self.faults.get("getcbt")  # True: every query fails; "since": incrementals only
        if fault is True or (fault == "since" and str(b["chgID"]) not in ("", "0")):
            return 500, {"errorCode": "10300100", "errorDes": "CBT query failed"}, None
        _, (snap_uuid, chg, cbt_time, _, allocated) = self._find_snap(b["snapUuid"])
        if b["volCBTCreateTime"] != cbt_time:
            return 400, {"errorCode": "10300101", "errorDes": "volCBTCreateTime does not match"}, None
        since = str(b["chgID"])
        if since in ("", "0"):
            blocks = allocated
        else:
            if not since.isdigit() or int(since) not in v.history or int(since) >= chg:
                return 400, {"errorCode": "10300102", "errorDes": f"no CBT data since chgID {since}"}, None
            blocks = set().union(*(v.history[k] for k in range(int(since) + 1, chg + 1)))
        total = (v.size + BLOCK - 1) // BLOCK
        start = int(b["startBlock"])
        bits = max(0, min(int(b["blockNum"]), self.page_bits, total - start))
        bitmap = bytearray((bits + 7) // 8)
        ones = 0
        for blk in blocks:
            if start <= blk < start + bits:
                bitmap[(blk - start) // 8] |= 1 << ((blk - start) % 8)
                ones += 1
        doc = {
            "sectorOfBlock": SECTOR_OF_BLOCK,
            "bitNum": bits,
            "bit1Num": ones,
            "bitMap": base64.b64encode(bytes(bitmap)).decode(),
        }
        return 200, doc, None

    # The CNA data channel

    def _cna_server(self, tls: bool) -> socketserver.ThreadingTCPServer:
        fc = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                if tls:
                    try:
                        sock = fc.ctx.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                with fc.lock:
                    over = fc.cna_open >= fc.cna_limit
                    if over:
                        fc.cna_refused += 1
                    else:
                        fc.cna_open += 1
                        fc.cna_peak = max(fc.cna_peak, fc.cna_open)
                try:
                    fc.serve_channel(sock, over)
                except (OSError, ConnectionError, ssl.SSLError):
                    pass
                finally:
                    if not over:
                        with fc.lock:
                            fc.cna_open -= 1
                    sock.close()

        socketserver.ThreadingTCPServer.daemon_threads = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    @staticmethod
    def _recv(sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed")
            buf += part
        return bytes(buf)

    def _frame(self, kind: int, seq: int, offset: int = 0, payload: bytes = b"", status: int = 0) -> bytes:
        head = HEADER.pack(MAGIC, VERSION, kind, seq, status, offset, len(payload), zlib.crc32(payload))
        return head + payload

    def serve_channel(self, sock: socket.socket, over_limit: bool) -> None:
        magic, _, kind, seq, _, _, length, crc = HEADER.unpack(self._recv(sock, HEADER.size))
        hello = self._recv(sock, length)
        if over_limit:
            sock.sendall(self._frame(ERROR, seq, payload=b"too many connections", status=BUSY))
            return
        rid_url, _, token = hello.decode().partition("\n")
        res = [r for r in self.resources.values() if r["resourceUrl"] == rid_url and r["token"] == token]
        if magic != MAGIC or kind != HELLO or zlib.crc32(hello) != crc or not res:
            sock.sendall(self._frame(ERROR, seq, payload=b"token or resource not valid", status=10300401))
            return
        sock.sendall(self._frame(WELCOME, seq))
        with open(res[0]["file"], "rb") as f:
            while True:
                _, _, kind, seq, _, offset, length, _ = HEADER.unpack(self._recv(sock, HEADER.size))
                key = (res[0]["file"], offset, length)
                crc = self.crcs.get(key) if self.zero_copy else None
                data = b"" if crc is not None else os.pread(f.fileno(), length, offset)
                if crc is None and len(data) < length:
                    msg = f"read past the end at {offset}".encode()
                    sock.sendall(self._frame(ERROR, seq, offset, msg, status=10300420))
                    continue
                cut = self.faults.get("cut_reads", 0)
                if cut:
                    self.faults["cut_reads"] = cut - 1
                    sock.sendall(self._frame(DATA, seq, offset, data)[: HEADER.size + length // 2])
                    return
                if self.faults.get("corrupt"):
                    self.faults["corrupt"] -= 1
                    head = HEADER.pack(MAGIC, VERSION, DATA, seq, 0, offset, length, zlib.crc32(data))
                    sock.sendall(head + bytes(length))
                    continue
                with self.lock:
                    self.reads.append((offset, length))
                    self.bytes_served += length
                if not self.zero_copy or isinstance(sock, ssl.SSLSocket):
                    sock.sendall(self._frame(DATA, seq, offset, data))
                    continue
                # Benchmarks, plain TCP: the payload from the page cache with sendfile, its CRC
                # from a cache, so that the server side costs little of the machine's 2 cores.
                crc = self.crcs.setdefault(key, zlib.crc32(data)) if crc is None else crc
                sock.sendall(HEADER.pack(MAGIC, VERSION, DATA, seq, 0, offset, length, crc))
                sent = 0
                while sent < length:
                    sent += os.sendfile(sock.fileno(), f.fileno(), offset + sent, length - sent)
