"""A vSphere API session for the VMware adapter (pyvmomi): login with the server pinned by its
SHA-1 thumbprint (the one VDDK checks too) or verified by a CA file, every call bounded by a
timeout, properties read through the PropertyCollector (one round trip, and no accessor calls
on unset properties), tasks polled to a deadline, one re-login when the session expired.

Task connection keys (``vm.platform = "vmware"``)::

    host = "vc.example"                      # vCenter or ESXi
    port = 443                               # optional
    user = "administrator@vsphere.local"
    password_file = "/etc/hamal/vc.pw"       # (a task from Mass may carry ``password`` inline)
    thumbprint = "AA:BB:...:FF"              # SHA-1 of the server's certificate, or:
    ca_file = "/etc/hamal/vc-ca.pem"         # CA bundle; the thumbprint VDDK needs is then read
    timeout = 60                             # optional: seconds per API call
    snapshot_timeout = 600                   # optional: seconds per snapshot task
    quiesce = false                          # optional: quiesced snapshots (VMware Tools)
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from typing import Any

from hamal.errors import PlanError, SourceError
from hamal.platforms.base import task_secret

log = logging.getLogger("hamal.platforms.vsphere")


#: The API version hamal speaks (vSphere 6.7 and later answer it).
API_VERSION = "vim.version.version12"


class VsphereError(SourceError):
    """The vSphere API refused or failed a call (one line naming the server and the call)."""


def normalize_thumbprint(text: str) -> str:
    hexdigits = text.replace(":", "").strip().upper()
    if len(hexdigits) != 40 or any(c not in "0123456789ABCDEF" for c in hexdigits):
        raise PlanError(f"connection.thumbprint {text!r} is not a SHA-1 thumbprint (20 hex bytes)")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 40, 2))


class Session:
    def __init__(self, task: Any) -> None:
        c = task.connection
        self.task = task
        self.host = c.get("host")
        if not isinstance(self.host, str) or not self.host:
            raise PlanError(f"task {task.id}: connection.host (vCenter or ESXi) is missing")
        self.port = int(c.get("port", 443))
        self.user = c.get("user")
        if not isinstance(self.user, str) or not self.user:
            raise PlanError(f"task {task.id}: connection.user is missing")
        self.timeout = float(c.get("timeout", 60))
        self.snapshot_timeout = float(c.get("snapshot_timeout", 600))
        self.ca_file = c.get("ca_file")
        if c.get("thumbprint"):
            self.thumbprint = normalize_thumbprint(str(c["thumbprint"]))
        elif self.ca_file:
            self.thumbprint = self._thumbprint_by_ca()
        else:
            raise PlanError(
                f"task {task.id}: connection.thumbprint or connection.ca_file is needed (TLS is verified)"
            )
        self.where = f"vSphere {self.host}:{self.port}"
        self.si: Any = None
        self.login()

    def _context(self) -> ssl.SSLContext:
        # With a thumbprint: pyvmomi checks it on every connection whose certificate the system
        # CAs do not vouch for (a self-signed vCenter); one they vouch for is trusted as is.
        return ssl.create_default_context(cafile=self.ca_file)

    def _thumbprint_by_ca(self) -> str:
        """The SHA-1 thumbprint of the server's certificate, from a CA-verified handshake."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw:
                with ctx.wrap_socket(raw, server_hostname=self.host) as tls:
                    der = tls.getpeercert(binary_form=True) or b""
        except (OSError, ssl.SSLError) as e:
            raise VsphereError(
                f"vSphere {self.host}:{self.port}: TLS with ca_file {self.ca_file}: {e}"
            ) from None
        return normalize_thumbprint(hashlib.sha1(der).hexdigest())

    def login(self) -> None:
        from pyVim.connect import Connect
        from pyVmomi import vim

        password = task_secret(self.task, "password")
        if password is None:
            raise PlanError(
                f"task {self.task.id}: connection.password_file must name the file holding the password"
            )
        try:
            # Connect, not SmartConnect: SmartConnect's version probe ignores the thumbprint.
            self.si = Connect(
                host=self.host,
                port=self.port,
                user=self.user,
                pwd=password,
                version=API_VERSION,
                thumbprint=None if self.ca_file else self.thumbprint,
                sslContext=self._context(),
                httpConnectionTimeout=self.timeout,
            )
        except vim.fault.InvalidLogin:
            raise VsphereError(
                f"{self.where}: login as {self.user} refused: wrong user name or password"
            ) from None
        except ssl.SSLError as e:
            raise VsphereError(f"{self.where}: TLS: {e}") from None
        except OSError as e:
            raise VsphereError(f"{self.where}: cannot connect: {e}") from None
        except Exception as e:  # pyvmomi reports a thumbprint mismatch with its own classes
            if "humbprint" in str(e):
                raise VsphereError(
                    f"{self.where}: the server's certificate does not match connection.thumbprint "
                    f"{self.thumbprint}"
                ) from None
            raise VsphereError(f"{self.where}: login failed: {e}") from None
        self.content = self.si.RetrieveContent()

    def cookie(self) -> str:
        """The session cookie's value, for VDDK (no second password handling)."""
        raw = str(self.si._stub.cookie)
        return raw.split(";", 1)[0].split("=", 1)[1].strip('"')

    def logout(self) -> None:
        if self.si is not None:
            try:
                self.si.content.sessionManager.Logout()
            except Exception as e:  # the session may be gone already
                log.debug("logout: %s", e)
            self.si = None

    def bind(self, obj: Any) -> Any:
        """The managed object ``obj`` on the current session (a renewed one has a new stub)."""
        return type(obj)(obj._moId, self.si._stub)

    def call(self, what: str, obj: Any, method: str, *args: Any, **kw: Any) -> Any:
        """``obj.method(*args)`` on the current session; a session that expired is renewed once
        and the call made again. Faults become one line."""
        from pyVmomi import vim, vmodl

        for attempt in (1, 2):
            try:
                return getattr(self.bind(obj), method)(*args, **kw)
            except vim.fault.NotAuthenticated:
                if attempt == 2:
                    raise VsphereError(f"{self.where}: {what}: not authenticated after a new login") from None
                log.info("%s: the session expired; logging in again", self.where)
                self.login()
            except vmodl.MethodFault as e:
                raise VsphereError(f"{self.where}: {what}: {e.msg or type(e).__name__}") from e
            except (OSError, ssl.SSLError) as e:
                raise VsphereError(f"{self.where}: {what}: {e}") from None
        raise AssertionError("unreachable")

    def props(self, obj: Any, *paths: str) -> dict[str, Any]:
        """The named properties of one managed object (unset ones are absent). A property the
        server could not read is an error, and an expired session (some servers say so per
        property) is renewed once."""
        from pyVmomi import vim, vmodl

        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj)],
            propSet=[pc.PropertySpec(type=type(obj), pathSet=list(paths))],
        )
        what = f"reading {', '.join(paths)}"
        for attempt in (1, 2):
            found = self.call(what, self.content.propertyCollector, "RetrieveContents", [spec])
            missing = found[0].missingSet if found else []
            if not missing:
                return {p.name: p.val for p in found[0].propSet} if found else {}
            fault = missing[0].fault
            if isinstance(fault, vim.fault.NotAuthenticated) and attempt == 1:
                log.info("%s: the session expired; logging in again", self.where)
                self.login()
                continue
            raise VsphereError(
                f"{self.where}: {what}: {missing[0].path}: {fault.msg or type(fault).__name__}"
            )
        raise AssertionError("unreachable")

    def wait(self, task: Any, what: str, timeout: float) -> Any:
        """Polls a task to its end (not WaitForTask: some servers report entities pyvmomi
        rejects); returns its result, raises its error or a timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            info = self.props(task, "info.state", "info.error", "info.result")
            state = info.get("info.state")
            if state == "success":
                return info.get("info.result")
            if state == "error":
                err = info.get("info.error")
                raise VsphereError(f"{self.where}: {what} failed: {getattr(err, 'msg', None) or err}")
            if time.monotonic() > deadline:
                raise VsphereError(f"{self.where}: {what} did not finish within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def find_vm(self, uuid: str) -> Any:
        """The VM by instance UUID, else BIOS UUID, else managed object id (``vm-123``)."""
        from pyVmomi import vim

        for instance in (True, False):
            vm = self.call(
                "finding the VM", self.content.searchIndex, "FindByUuid", None, uuid, True, instance
            )
            if vm is not None:
                return vm
        if uuid.startswith("vm-"):
            vm = vim.VirtualMachine(uuid, self.si._stub)
            try:
                self.props(vm, "name")
                return vm
            except VsphereError:
                pass
        raise VsphereError(f"{self.where}: no VM with instance or BIOS UUID (or id) {uuid}")
