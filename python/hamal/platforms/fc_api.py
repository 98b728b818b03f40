"""FusionCompute's VRM REST API, as far as the adapter needs it: login, tasks, the VM and its
volumes, CBT backup snapshots, ``getcbt`` bitmaps and backup resources (the CNA data channel).
Names that are not publicly confirmed come from ``fc_names`` (one place to correct them).

TLS is verified: by ``ca_file`` (and the host name), or by ``cert_sha256``, the SHA-256
fingerprint of the VRM's certificate, checked before the password is sent. Every call has a
timeout; an expired token is renewed once. Errors are one line naming the call.

Task connection keys (``vm.platform = "fusioncompute"``)::

    vrm_url = "https://vrm.example:7443"
    username = "hamal"              # user_type = 2 (interface user; default 0)
    password_file = "/etc/hamal/fc.pw"
    ca_file = "/etc/hamal/vrm-ca.pem"       # or cert_sha256 = "AB:CD:..."
    api_version = "8.0"             # timeout = 60 (seconds per call)
    password_encoding = "plain"     # or "sha256" (the key sent is the password's SHA-256)
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import http.client
import json
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from hamal.errors import PlanError, SourceError
from hamal.platforms import fc_names as N
from hamal.platforms.base import session_key, task_secret

log = logging.getLogger("hamal.platforms.fusioncompute")


class FcError(SourceError):
    """The VRM refused or failed a call."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def normalize_fingerprint(text: str) -> str:
    hexpart = text.replace(":", "").strip().upper()
    if len(hexpart) != 64 or any(c not in "0123456789ABCDEF" for c in hexpart):
        raise PlanError(f"cert_sha256 {text!r} is not a SHA-256 fingerprint (32 hex bytes)")
    return ":".join(hexpart[i : i + 2] for i in range(0, 64, 2))


def urn_to_uri(urn: str) -> str:
    """``urn:sites:1:volumes:7`` -> ``/service/sites/1/volumes/7`` (FusionCompute's rule)."""
    parts = urn.split(":")
    if len(parts) < 4 or parts[0] != "urn":
        raise FcError(f"{urn!r} is not a FusionCompute URN")
    return "/service/" + "/".join(parts[1:])


_SESSIONS: dict[str, Vrm] = {}


def vrm_for(task: Any) -> Vrm:
    """One VRM session per task and process: a cycle's orphan check, discovery and snapshot
    share one login (the cycle's commit logs out; a later cycle logs in again), and the VM is
    looked up once by uuid, then by its URI. Sessions still open are logged out at exit."""
    key = session_key(task)
    vrm = _SESSIONS.get(key)
    if vrm is None:
        vrm = _SESSIONS[key] = Vrm(task)
    elif vrm.token is None:
        vrm.login()
    return vrm


@atexit.register
def _logout_all() -> None:
    for vrm in _SESSIONS.values():
        vrm.logout()


class Vrm:
    def __init__(self, task: Any) -> None:
        c = task.connection
        self.task = task
        url = urlsplit(str(c.get("vrm_url") or ""))
        if url.scheme != "https" or not url.hostname:
            raise PlanError(f"task {task.id}: connection.vrm_url must be https://HOST[:7443]")
        self.host, self.port = url.hostname, url.port or 7443
        self.where = f"VRM {self.host}:{self.port}"
        self.user = str(c.get("username") or "")
        if not self.user:
            raise PlanError(f"task {task.id}: connection.username is missing")
        self.timeout = float(c.get("timeout", 60))
        self.version = str(c.get("api_version", "8.0"))
        self.pinned = normalize_fingerprint(str(c["cert_sha256"])) if c.get("cert_sha256") else None
        if c.get("ca_file"):
            self.ctx = ssl.create_default_context(cafile=str(c["ca_file"]))
        elif self.pinned:
            self.ctx = ssl.create_default_context()
            self.ctx.check_hostname, self.ctx.verify_mode = False, ssl.CERT_NONE
        else:
            raise PlanError(f"task {task.id}: connection.ca_file or cert_sha256 is needed to verify the VRM")
        self.token: str | None = None
        self.conn: http.client.HTTPSConnection | None = None
        self.vm_uris: dict[str, str] = {}  # uuid -> URI, from the first search
        self.login()

    # Transport

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            raise FcError(f"{self.where}: certificate not trusted with ca_file: {e.verify_message}") from None
        except (OSError, ssl.SSLError) as e:
            raise FcError(f"{self.where}: cannot connect: {e}") from None
        if self.pinned:
            der = conn.sock.getpeercert(binary_form=True) or b""  # type: ignore[union-attr]
            got = normalize_fingerprint(hashlib.sha256(der).hexdigest())
            if got != self.pinned:
                conn.close()
                raise FcError(f"{self.where}: the certificate's SHA-256 {got} is not connection.cert_sha256")
        return conn

    def _send(self, method: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        h = {"Accept": N.ACCEPT.format(version=self.version), "Content-Type": "application/json"}
        h |= headers
        for attempt in (0, 1):  # a kept-alive connection the VRM closed is made again once
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, path, body=data, headers=h)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.conn.close()
                self.conn = None
                if attempt:
                    raise FcError(f"{self.where}: {method} {path}: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                self.conn.close()
                self.conn = None
                kind = f"no answer within {self.timeout:g} s" if isinstance(e, socket.timeout) else str(e)
                raise FcError(f"{self.where}: {method} {path}: {kind}") from None
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"errorDes": raw[:200].decode(errors="replace")}
        return resp.status, doc, resp.headers

    def call(self, method: str, path: str, body: Any = None, what: str = "") -> Any:
        """One API call; an expired token is renewed once. Returns the JSON answer."""
        for attempt in (0, 1):
            status, doc, _ = self._send(method, path, body, {N.TOKEN_HEADER: self.token or ""})
            if status < 300:
                return doc
            code = str(doc.get("errorCode", "")) if isinstance(doc, dict) else ""
            if attempt == 0 and (status == 401 or code in N.TOKEN_EXPIRED_CODES):
                log.info("%s: session expired; logging in again", self.where)
                self.login()
                continue
            msg = doc.get("errorDes") or doc.get("errorCode") or doc if isinstance(doc, dict) else doc
            raise FcError(f"{self.where}: {what or method + ' ' + path}: HTTP {status}: {msg}", status, code)
        raise AssertionError("unreachable")

    def login(self) -> None:
        password = task_secret(self.task, "password")
        if password is None:
            raise PlanError(
                f"task {self.task.id}: connection.password_file must name the file holding the password"
            )
        encoding = self.task.connection.get("password_encoding", "plain")
        if encoding not in ("plain", "sha256"):
            raise PlanError(f"task {self.task.id}: connection.password_encoding must be plain or sha256")
        key = password if encoding == "plain" else hashlib.sha256(password.encode()).hexdigest()
        alg = N.ENCRYPT_PLAIN if encoding == "plain" else N.ENCRYPT_SHA256
        headers = {
            N.USER_HEADER: self.user,
            N.KEY_HEADER: key,
            N.USER_TYPE_HEADER: str(self.task.connection.get("user_type", 0)),
        } | {h: alg for h in N.ENCRYPT_HEADERS}
        status, doc, resp_headers = self._send("POST", N.LOGIN_PATH, None, headers)
        if status >= 300:
            why = doc.get("errorDes") or doc.get("errorCode") if isinstance(doc, dict) else doc
            raise FcError(f"{self.where}: login as {self.user} refused: HTTP {status}: {why}", status)
        token = resp_headers.get(N.TOKEN_HEADER)
        if not token:
            raise FcError(f"{self.where}: login answered without an {N.TOKEN_HEADER} header")
        self.token = token

    def logout(self) -> None:
        if self.token:
            try:
                self._send("DELETE", N.LOGIN_PATH, None, {N.TOKEN_HEADER: self.token})
            except FcError as e:
                log.debug("%s: logout: %s", self.where, e)
            self.token = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # Tasks

    def wait(self, started: Any, what: str, timeout: float) -> dict[str, Any]:
        """Polls the task a call started until it succeeds; fails on failure or after
        ``timeout`` seconds (the task is left to the VRM)."""
        uri = started.get(N.TASK_URI) if isinstance(started, dict) else None
        if not uri:
            return started if isinstance(started, dict) else {}
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            t = self.call("GET", uri, what=f"{what}: task status")
            status = t.get(N.TASK_STATUS)
            if status == N.TASK_SUCCESS:
                return started
            if status in N.TASK_FAILED:
                raise FcError(
                    f"{self.where}: {what}: task {status}: {t.get(N.TASK_REASON) or 'no reason given'}"
                )
            if time.monotonic() > deadline:
                raise FcError(
                    f"{self.where}: {what}: task not done within {timeout:g} s ({t.get(N.TASK_PROGRESS)}%)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    # Inventory

    def find_vm(self, vm_id: str) -> dict[str, Any]:
        """The VM by URN (``urn:sites:...:vms:...``) or by its uuid, searched site by site."""
        if vm_id.startswith("urn:"):
            return dict(self.call("GET", urn_to_uri(vm_id), what=f"VM {vm_id}"))
        known = self.vm_uris.get(vm_id)
        if known:
            try:
                vm = dict(self.call("GET", known, what=f"VM {vm_id}"))
                if vm.get(N.VM_UUID) == vm_id:
                    return vm
            except FcError as e:
                log.debug("%s: VM %s no longer at %s (%s); searching", self.where, vm_id, known, e)
            del self.vm_uris[vm_id]
        for site in self.call("GET", N.SITES_PATH, what="sites").get(N.SITES_LIST, []):
            offset = 0
            while True:
                page = self.call("GET", f"{site['uri']}/vms?limit=100&offset={offset}", what="VM list")
                vms = page.get(N.VMS_LIST, [])
                for vm in vms:
                    if vm.get(N.VM_UUID) == vm_id:
                        self.vm_uris[vm_id] = vm[N.VM_URI]
                        return dict(self.call("GET", vm[N.VM_URI], what=f"VM {vm_id}"))
                if len(vms) < 100:
                    break
                offset += 100
        raise FcError(f"{self.where}: no VM with uuid {vm_id}")

    # Snapshots

    def snapshots(self, vm_uri: str) -> list[dict[str, Any]]:
        """Every snapshot of the VM (the tree flattened)."""
        root, child = N.SNAPSHOT_TREE
        out: list[dict[str, Any]] = []

        def walk(nodes: list[dict[str, Any]]) -> None:
            for n in nodes or []:
                out.append(n)
                walk(n.get(child) or [])

        walk(self.call("GET", vm_uri + N.SNAPSHOTS, what="snapshot list").get(root) or [])
        return out

    def create_snapshot(self, vm_uri: str, name: str, timeout: float) -> dict[str, Any]:
        body = {
            N.SNAPSHOT_NAME: name,
            "description": "hamal sync (removed after the next cycle)",
            N.SNAPSHOT_TYPE: N.SNAPSHOT_TYPE_CBT,
            "needMemoryShot": False,
            "isConsistent": bool(self.task.connection.get("quiesce", False)),
        }
        started = self.call("POST", vm_uri + N.SNAPSHOTS, body, what=f"creating snapshot {name}")
        try:
            self.wait(started, f"snapshot {name}", timeout)
        except FcError:
            try:  # a failed or hung snapshot is not left behind
                self.delete_snapshot(started[N.SNAPSHOT_URI], f"snapshot {name} (its task failed)", timeout)
            except FcError as e:
                log.warning("%s: snapshot %s: %s (the next cycle removes it)", self.where, name, e)
            raise
        return dict(self.call("GET", started[N.SNAPSHOT_URI], what=f"snapshot {name}"))

    def delete_snapshot(self, snap_uri: str, what: str, timeout: float) -> None:
        try:
            started = self.call("DELETE", snap_uri, what=f"deleting {what}")
        except FcError as e:
            if e.status == 404:
                return
            raise
        self.wait(started, f"deleting {what}", timeout)

    # Changed blocks and data

    def changed_bitmap(
        self, volume_uri: str, vs: dict[str, Any], since: str, size: int
    ) -> tuple[list[tuple[int, int]], int]:
        """The volume's changed extents since chgID ``since`` (``CHG_ID_FULL``: its allocated
        extents), paged until the volume's end; each page's set bits are checked against
        ``bit1Num``. Returns (extents, block size)."""
        from hamal import _native

        out: list[tuple[int, int]] = []
        start, block = 0, 0
        while block == 0 or start * block < size:
            body = {
                "type": N.SNAPSHOT_TYPE_CBT,
                N.VS_SNAP_UUID: vs[N.VS_SNAP_UUID],
                N.VS_CBT_TIME: vs[N.VS_CBT_TIME],
                N.VS_CHG_ID: since,
                "startBlock": start,
                "blockNum": N.CBT_PAGE_BLOCKS,
            }
            page = self.call(
                "POST", volume_uri + N.GETCBT, body, what=f"changed blocks of {volume_uri} at block {start}"
            )
            try:
                block = int(page[N.CBT_SECTOR_OF_BLOCK]) * N.SECTOR
                bits, ones = int(page[N.CBT_BIT_NUM]), int(page[N.CBT_BIT1_NUM])
                bitmap = base64.b64decode(page[N.CBT_BITMAP], validate=True)
            except (KeyError, TypeError, ValueError) as e:
                raise FcError(
                    f"{self.where}: getcbt of {volume_uri} at block {start}: malformed answer ({e})"
                ) from None
            if block <= 0 or bits <= 0 or len(bitmap) * 8 < bits:
                raise FcError(
                    f"{self.where}: getcbt of {volume_uri} at block {start}: {bits} bits in "
                    f"{len(bitmap)} bytes, blocks of {block} bytes"
                )
            extents, counted = _native.fc_bitmap_extents(bitmap, bits, block, start, size)
            if counted != ones:
                raise FcError(
                    f"{self.where}: getcbt of {volume_uri} at block {start}: {counted} bits set, "
                    f"bit1Num says {ones}"
                )
            if out and extents and out[-1][0] + out[-1][1] == extents[0][0]:
                first = extents.pop(0)
                out[-1] = (out[-1][0], out[-1][1] + first[1])
            out += extents
            start += bits
        return out, block

    def backup_resource(
        self, volume_uri: str, body: dict[str, Any], timeout: float
    ) -> tuple[str, dict[str, Any]]:
        """Prepares the CNA data channel of a volume; returns (its URI, what it says)."""
        base = volume_uri + N.BACKUP_RESOURCES
        started = self.call("POST", base, body, what=f"preparing the data channel of {volume_uri}")
        self.wait(started, f"data channel of {volume_uri}", timeout)
        uri = f"{base}/{started[N.RESOURCE_ID]}"
        return uri, dict(self.call("GET", uri, what=f"data channel of {volume_uri}"))

    def delete_resource(self, uri: str) -> None:
        try:
            self.call("DELETE", uri, what="releasing the data channel")
        except FcError as e:
            if e.status != 404:
                raise

    def local_address(self) -> str:
        """This host's address towards the VRM (the ``ip`` a backup resource is prepared for)."""
        if self.conn is None or self.conn.sock is None:
            self.conn = self._connect()
        return str(self.conn.sock.getsockname()[0])  # type: ignore[union-attr]
