"""The OpenStack APIs the adapter needs: Keystone v3 (a password or an application credential,
the service catalog), Nova (a server and its volume attachments) and Cinder v3 (volumes, their
connection info, snapshots). TLS is verified (``ca_file`` or the system store); every call has
a timeout; an expired token is renewed once. Errors are one line naming the service and call.

Task connection keys (``vm.platform = "openstack"``)::

    auth_url = "https://keystone.example:5000/v3"
    username = "hamal"                        # or application_credential_id = "..."
    password_file = "/etc/hamal/os.pw"        # or application_credential_secret_file = PATH
                                              # (a task from Mass may carry them inline)
    project_name = "admin"                    # user_domain_name / project_domain_name: Default
    region = "RegionOne"                      # interface = "public" (default)
    ca_file = "/etc/hamal/os-ca.pem"          # optional; timeout = 60 (seconds per call)
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from hamal.errors import PlanError, SourceError
from hamal.platforms.base import session_key, task_secret

log = logging.getLogger("hamal.platforms.openstack")


class OpenStackError(SourceError):
    """An OpenStack API refused or failed a call."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


_SESSIONS: dict[str, Cloud] = {}
#: Asking for a snapshot: a server error (5xx) is asked again, after checking that no snapshot
#: of that name was made meanwhile (a transient error costs a retry, not the cycle).
SNAPSHOT_TRIES = 3


def cloud_for(task: Any) -> Cloud:
    """One authenticated session per task and process (a cycle's worker logs in once)."""
    key = session_key(task)
    if key not in _SESSIONS:
        _SESSIONS[key] = Cloud(task)
    return _SESSIONS[key]


class Cloud:
    def __init__(self, task: Any) -> None:
        c = task.connection
        self.task = task
        self.auth_url = str(c.get("auth_url") or "").rstrip("/")
        if not self.auth_url.startswith(("https://", "http://")):
            raise PlanError(f"task {task.id}: connection.auth_url must be Keystone's v3 URL")
        if self.auth_url.startswith("http://"):
            log.warning("Keystone %s is plain HTTP: credentials travel unencrypted", self.auth_url)
        self.region = c.get("region")
        self.interface = c.get("interface", "public")
        self.timeout = float(c.get("timeout", 60))
        self.ctx = ssl.create_default_context(cafile=c.get("ca_file"))
        self.token = ""
        self.catalog: list[dict[str, Any]] = []
        self.locations: dict[str, tuple[str, str]] = {}
        self.login()

    def _auth_body(self) -> dict[str, Any]:
        c, tid = self.task.connection, self.task.id
        if c.get("application_credential_id"):
            secret = task_secret(self.task, "application_credential_secret")
            if not secret:
                raise PlanError(f"task {tid}: connection.application_credential_secret_file is missing")
            cred = {"id": c["application_credential_id"], "secret": secret}
            return {
                "auth": {"identity": {"methods": ["application_credential"], "application_credential": cred}}
            }
        password = task_secret(self.task, "password")
        if not c.get("username") or password is None:
            raise PlanError(
                f"task {tid}: connection.username and password_file (or an application credential)"
            )
        user = {
            "name": c["username"],
            "domain": {"name": c.get("user_domain_name", "Default")},
            "password": password,
        }
        project = {
            "name": c.get("project_name", "admin"),
            "domain": {"name": c.get("project_domain_name", "Default")},
        }
        return {"auth": {"identity": {"methods": ["password"], "password": {"user": user}},
                         "scope": {"project": project}}}  # fmt: skip

    def login(self) -> None:
        try:
            headers, body = self._request(
                "POST", f"{self.auth_url}/auth/tokens", self._auth_body(), auth=False
            )
        except OpenStackError as e:
            if e.status == 401:
                who = self.task.connection.get("username") or self.task.connection.get(
                    "application_credential_id"
                )
                raise OpenStackError(
                    f"Keystone {self.auth_url}: authentication of {who} refused", 401
                ) from None
            raise
        self.token = headers["X-Subject-Token"]
        self.catalog = body["token"].get("catalog", [])

    def endpoint(self, kind: str) -> str:
        for svc in self.catalog:
            if svc["type"] != kind:
                continue
            for ep in svc["endpoints"]:
                if ep["interface"] == self.interface and (
                    self.region is None or ep.get("region_id") == self.region
                ):
                    return str(ep["url"]).rstrip("/")
        where = f"interface {self.interface}" + (f", region {self.region}" if self.region else "")
        raise OpenStackError(f"Keystone {self.auth_url}: no {kind} endpoint in the catalog ({where})")

    def _request(
        self,
        method: str,
        url: str,
        body: Any = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, Any]:
        req = urllib.request.Request(
            url, data=json.dumps(body).encode() if body is not None else None, method=method
        )
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        if auth:
            req.add_header("X-Auth-Token", self.token)
        what = f"{method} {url.split('?')[0]}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ctx) as r:
                raw = r.read()
                return r.headers, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise OpenStackError(f"{what}: HTTP {e.code}: {_message(detail)}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise OpenStackError(f"{what}: {reason}") from None

    def call(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """One API call; an expired token (401) is renewed once."""
        try:
            return self._request(method, url, body, headers=headers)[1]
        except OpenStackError as e:
            if e.status != 401:
                raise
            log.info("the OpenStack token expired: authenticating again")
            self.login()
            return self._request(method, url, body, headers=headers)[1]

    # Nova

    def server(self, sid: str) -> dict[str, Any]:
        return dict(self.call("GET", f"{self.endpoint('compute')}/servers/{sid}")["server"])

    def attachments(self, sid: str) -> list[dict[str, Any]]:
        body = self.call("GET", f"{self.endpoint('compute')}/servers/{sid}/os-volume_attachments")
        return list(body["volumeAttachments"])

    # Cinder

    def cinder(self, method: str, path: str, body: Any = None, micro: str = "3.44") -> Any:
        headers = {"OpenStack-API-Version": f"volume {micro}"}
        return self.call(method, f"{self.endpoint('volumev3')}/{path}", body, headers)

    def volume(self, vid: str) -> dict[str, Any]:
        return dict(self.cinder("GET", f"volumes/{vid}")["volume"])

    def rbd_location(self, vid: str) -> tuple[str, str]:
        """(pool, image) of a Ceph-backed volume, from its connection info (asked once per
        process: a cycle's worker)."""
        if vid in self.locations:
            return self.locations[vid]
        connector = {
            "host": "hamal",
            "ip": "127.0.0.1",
            "platform": "x86_64",
            "os_type": "linux",
            "multipath": False,
        }
        body = self.cinder(
            "POST", f"volumes/{vid}/action", {"os-initialize_connection": {"connector": connector}}
        )
        info = body["connection_info"]
        if info.get("driver_volume_type") != "rbd":
            raise OpenStackError(
                f"volume {vid} is on {info.get('driver_volume_type')!r} storage, not Ceph RBD"
            )
        pool, image = str(info["data"]["name"]).split("/", 1)
        self.locations[vid] = (pool, image)
        return pool, image

    def create_snapshot(self, vid: str, name: str) -> str:
        """Asks for a snapshot (``force``: the volume may be in use); wait for it with
        ``wait_snapshot(id, "available", ...)``, so several are taken at once."""
        snap = {"volume_id": vid, "name": name, "force": True, "description": "hamal sync"}
        for attempt in range(1, SNAPSHOT_TRIES + 1):
            try:
                return str(self.cinder("POST", "snapshots", {"snapshot": snap})["snapshot"]["id"])
            except OpenStackError as e:
                if e.status is None or e.status < 500 or attempt == SNAPSHOT_TRIES:
                    raise
                # A server error may come after the snapshot was made: never make a second one.
                made = [s for s in self.snapshots_of(vid) if s.get("name") == name]
                if made:
                    return str(made[0]["id"])
                log.warning(
                    "volume %s: %s; asking again (attempt %d of %d)", vid, e, attempt + 1, SNAPSHOT_TRIES
                )
                time.sleep(2 * attempt)
        raise AssertionError("unreachable")

    def wait_snapshot(self, sid: str, want: str | None, timeout: float) -> None:
        """Until the snapshot has status ``want`` (``None``: until it is gone)."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                status = self.cinder("GET", f"snapshots/{sid}")["snapshot"]["status"]
            except OpenStackError as e:
                if e.status == 404 and want is None:
                    return
                raise
            if status == want:
                return
            if status == "error" or status == "error_deleting":
                raise OpenStackError(f"Cinder snapshot {sid} went to status {status}")
            if time.monotonic() > deadline:
                raise OpenStackError(f"Cinder snapshot {sid} not {want or 'deleted'} within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def delete_snapshot(self, sid: str, timeout: float | None) -> None:
        """Deletes a snapshot and waits until it is gone (``timeout`` None: does not wait). One
        still being created (a cycle that failed meanwhile) is waited for first: Cinder refuses
        to delete it before."""
        for attempt in (0, 1):
            try:
                self.cinder("DELETE", f"snapshots/{sid}")
                break
            except OpenStackError as e:
                if e.status == 404:
                    return
                if attempt or e.status != 400 or not self._settle(sid, timeout or 600.0):
                    raise
        if timeout is not None:
            self.wait_snapshot(sid, None, timeout)

    def _settle(self, sid: str, timeout: float) -> bool:
        """Waits while the snapshot is ``creating``; True if it was (a delete may now work)."""
        deadline, was_creating = time.monotonic() + timeout, False
        while self.cinder("GET", f"snapshots/{sid}")["snapshot"]["status"] == "creating":
            was_creating = True
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return was_creating

    def snapshots_of(self, vid: str) -> list[dict[str, Any]]:
        return list(self.cinder("GET", f"snapshots?volume_id={vid}")["snapshots"])


def _message(detail: str) -> str:
    try:
        body = json.loads(detail)
        inner = next(iter(body.values())) if isinstance(body, dict) else body
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    except (ValueError, StopIteration):
        pass
    return detail.strip() or "no detail"
