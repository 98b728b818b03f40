"""Tasks: what the service keeps in sync. One schema for standalone task files
(``[period] tasks_dir``, one file per task, JSON or TOML) and for tasks from the control plane.

```toml
version = 1                        # schema version (required)
id = "web01"                       # default: the file name without its extension
enabled = true

[vm]
platform = "kvm"                   # kvm | rbd | vmware | openstack | fusioncompute
uuid = "5f1c..."                   # the platform's id of the VM
name = "web01"

[connection]                       # per platform; credentials only by file reference (*_file)
images = { vda = "/var/lib/images/web01-vda.qcow2" }

[disks]                            # optional: which disks (default all)
exclude = ["vdc"]

[target]
uri = "dir:/backups"               # a chunk store, or a file/NBD URI with {disk} in it
key_file = "/etc/hamal/store.key"  # optional: encryption key of the store
disk_ids = { vda = "web01-vda" }   # optional: names in the store (default <task id>-<disk id>)

[schedule]
interval = 300                     # seconds (default [period] interval)
windows = ["22:00-06:00"]          # optional: cycles start only inside these (local time)

[bandwidth]
limit = "100M"                     # bytes per second (K, M, G suffixes), optional
windows = [{ hours = "08:00-18:00", limit = "10M" }]   # tighter limits at times

[retention]
keep = 7                           # versions kept (1 to 128), pruned after a good cycle
```

A bad file is one error naming the file and the key; the other tasks run on. Tasks from the
control plane (origin ``mass``) use the same schema, except that credentials may be given inline
in ``[connection]``: they are kept only in the state database and masked in every log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from hamal.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

SCHEMA_VERSION = 1
PLATFORMS = ("kvm", "rbd", "vmware", "openstack", "fusioncompute")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A disk's name (from a task or a platform) goes into paths, journal names and store keys:
#: no '/', no leading '.', no control characters.
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
HOURS_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
#: Keys that would hold a secret inline; credentials go in files (``password_file``...).
INLINE_SECRETS = ("password", "secret", "token", "key", "auth_key", "secret_access_key")
MAX_KEEP = 128
TOP_KEYS = {
    *("version", "id", "enabled", "vm", "connection", "disks"),
    *("target", "schedule", "bandwidth", "retention"),
}


class TaskError(ValueError):
    """A task that cannot be used; the message names its file (or origin) and key."""


@dataclass
class Window:
    """A daily time range, local time; it may wrap past midnight (``22:00-06:00``)."""

    start: int  # minutes after midnight
    end: int

    def contains(self, when: dt.datetime) -> bool:
        m = when.hour * 60 + when.minute
        if self.start <= self.end:
            return self.start <= m < self.end
        return m >= self.start or m < self.end


@dataclass
class Task:
    id: str
    platform: str
    vm_uuid: str
    vm_name: str
    connection: dict[str, Any]
    target_uri: str
    origin: str = ""
    enabled: bool = True
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    key_file: str | None = None
    disk_ids: dict[str, str] = field(default_factory=dict)
    interval: int | None = None
    windows: list[Window] = field(default_factory=list)
    bwlimit: int | None = None
    bw_windows: list[tuple[Window, int]] = field(default_factory=list)
    keep: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def is_store(self) -> bool:
        return self.target_uri.startswith(("dir:", "s3://"))

    def store_disk_id(self, disk: str) -> str:
        return self.disk_ids.get(disk, f"{self.id}-{disk}")

    def target_for(self, disk: str) -> str:
        return self.target_uri if self.is_store() else self.target_uri.replace("{disk}", disk)

    def wanted(self, disk: str) -> bool:
        return (self.include is None or disk in self.include) and disk not in self.exclude

    def in_window(self, when: dt.datetime) -> bool:
        return not self.windows or any(w.contains(when) for w in self.windows)

    def bandwidth_at(self, when: dt.datetime) -> int | None:
        """The byte rate limit at ``when``: the first window that holds it, else the default."""
        for window, limit in self.bw_windows:
            if window.contains(when):
                return limit
        return self.bwlimit

    def log_name(self) -> str:
        """``vm-<name>-<uuid>.log``, with characters unsafe in a file name replaced."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.vm_name}-{self.vm_uuid}")
        return f"vm-{safe}.log"


def _window(text: Any, where: str) -> Window:
    m = HOURS_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise TaskError(f'{where}: {text!r} is not a time range like "22:00-06:00"')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    return Window(h1 * 60 + m1, h2 * 60 + m2)


def _rate(value: Any, where: str) -> int:
    try:
        rate = parse_size(str(value))
    except ValueError:
        rate = 0
    if rate < 1024:
        raise TaskError(f'{where}: {value!r} is not a byte rate of at least 1K (such as "100M")')
    return rate


def check_disk_id(disk: Any, where: str) -> str:
    """A disk name that is safe in a path and a store key, or a ``TaskError`` naming it."""
    if not isinstance(disk, str) or not DISK_ID_RE.match(disk):
        raise TaskError(
            f"{where}: {disk!r} is not a safe disk name (1 to 128 letters, digits, '.', '_', ':', '@',"
            " '+' or '-', starting with a letter or digit)"
        )
    return disk


def is_secret_key(key: str) -> bool:
    """A key whose value is a credential: ``password``, ``auth_key``, ``*_secret``,
    ``*_password``, ``*_token``, ``*_key`` (``*_file`` keys hold paths to them, not secrets)."""
    k = key.lower()
    return k in INLINE_SECRETS or any(k.endswith("_" + s) for s in INLINE_SECRETS)


def _check_no_inline_secret(conn: dict[str, Any], where: str) -> None:
    for k, v in conn.items():
        if isinstance(v, dict):
            _check_no_inline_secret(v, f"{where}.{k}")
        elif is_secret_key(k):
            raise TaskError(f"{where}.{k}: credentials are not written in task files; use {k}_file = PATH")


def secret_values(spec: Any) -> list[str]:
    """The inline credentials of a task (control-plane tasks may carry them), to be masked:
    every value under a secret's key, in tables and lists alike."""
    out: list[str] = []
    conn = spec.get("connection") if isinstance(spec, dict) else None

    def walk(v: Any, secret: bool) -> None:
        if isinstance(v, dict):
            for k, inner in v.items():
                walk(inner, secret or is_secret_key(str(k)))
        elif isinstance(v, list):
            for inner in v:
                walk(inner, secret)
        elif secret and isinstance(v, (str, int)) and not isinstance(v, bool):
            out.append(str(v))

    walk(conn, False)
    return out


def parse_task(data: Any, origin: str, default_id: str | None = None) -> Task:
    """Checks one task (a parsed file or a control-plane record) against the schema."""

    def bad(key: str, msg: str) -> TaskError:
        return TaskError(f"{origin}: {key}: {msg}")

    def section(name: str, required: bool = False) -> dict[str, Any]:
        v = data.get(name)
        if v is None and not required:
            return {}
        if not isinstance(v, dict):
            raise bad(name, "missing" if v is None else "must be a table/object")
        return v

    def known(d: dict[str, Any], where: str, keys: set[str]) -> None:
        for k in d:
            if k not in keys:
                raise bad(f"{where}.{k}" if where else k, f"unknown key (known: {', '.join(sorted(keys))})")

    if not isinstance(data, dict):
        raise TaskError(f"{origin}: a task must be a table/object")
    known(data, "", TOP_KEYS)
    if data.get("version") != SCHEMA_VERSION:
        got = data.get("version")
        raise bad("version", f"{got!r} is not a supported schema version (this hamal reads {SCHEMA_VERSION})")
    tid = data.get("id", default_id)
    if not isinstance(tid, str) or not ID_RE.match(tid):
        raise bad("id", f"{tid!r} must be 1 to 64 letters, digits, '.', '_' or '-'")
    vm = section("vm", required=True)
    known(vm, "vm", {"platform", "uuid", "name"})
    platform = vm.get("platform")
    if platform not in PLATFORMS:
        raise bad("vm.platform", f"{platform!r} is not one of {', '.join(PLATFORMS)}")
    for k in ("uuid", "name"):
        if not isinstance(vm.get(k), str) or not vm[k]:
            raise bad(f"vm.{k}", "missing or empty")
    conn = section("connection")
    if origin != "mass":
        _check_no_inline_secret(conn, "connection")
    target = section("target", required=True)
    known(target, "target", {"uri", "key_file", "disk_ids"})
    uri = target.get("uri")
    if not isinstance(uri, str) or not uri:
        raise bad("target.uri", "missing")
    task = Task(
        id=tid,
        platform=platform,
        vm_uuid=vm["uuid"],
        vm_name=vm["name"],
        connection=conn,
        target_uri=uri,
        origin=origin,
        raw=data,
    )
    if not task.is_store() and "{disk}" not in uri:
        raise bad("target.uri", f"{uri!r}: a file or NBD target names each disk with {{disk}}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise bad("enabled", "must be true or false")
    task.enabled = enabled
    if target.get("key_file") is not None:
        if not isinstance(target["key_file"], str) or not os.path.isabs(target["key_file"]):
            raise bad("target.key_file", "must be an absolute path")
        task.key_file = target["key_file"]
    ids = target.get("disk_ids", {})
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise bad("target.disk_ids", "must map disk ids to store disk ids")
    for k, v in ids.items():
        check_disk_id(k, f"{origin}: target.disk_ids")
        check_disk_id(v, f"{origin}: target.disk_ids.{k}")
    task.disk_ids = dict(ids)
    images = conn.get("images")
    if isinstance(images, dict):
        for k in images:
            check_disk_id(k, f"{origin}: connection.images")
    disks = section("disks")
    known(disks, "disks", {"include", "exclude"})
    for k in ("include", "exclude"):
        if k in disks and not (isinstance(disks[k], list) and all(isinstance(x, str) for x in disks[k])):
            raise bad(f"disks.{k}", "must be a list of disk ids")
        for disk in disks.get(k, []):
            check_disk_id(disk, f"{origin}: disks.{k}")
    task.include = disks.get("include")
    task.exclude = disks.get("exclude", [])
    sched = section("schedule")
    known(sched, "schedule", {"interval", "windows"})
    if "interval" in sched:
        iv = sched["interval"]
        if not isinstance(iv, int) or isinstance(iv, bool) or not 1 <= iv <= 7 * 86400:
            raise bad("schedule.interval", f"{iv!r} must be 1 to 604800 seconds")
        task.interval = iv
    task.windows = [_window(w, f"{origin}: schedule.windows") for w in sched.get("windows", [])]
    bw = section("bandwidth")
    known(bw, "bandwidth", {"limit", "windows"})
    if "limit" in bw:
        task.bwlimit = _rate(bw["limit"], f"{origin}: bandwidth.limit")
    for i, w in enumerate(bw.get("windows", [])):
        where = f"{origin}: bandwidth.windows[{i}]"
        if not isinstance(w, dict) or set(w) != {"hours", "limit"}:
            raise TaskError(f'{where}: must be {{hours = "HH:MM-HH:MM", limit = "10M"}}')
        task.bw_windows.append((_window(w["hours"], where), _rate(w["limit"], where)))
    ret = section("retention")
    known(ret, "retention", {"keep"})
    if "keep" in ret:
        keep = ret["keep"]
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
            raise bad("retention.keep", f"{keep!r} must be 1 to {MAX_KEEP}")
        if not task.is_store():
            raise bad("retention.keep", "versions are kept only in a chunk store target")
        task.keep = keep
    return task


def load_file(path: str) -> Task:
    """Reads one task file (``.json`` or ``.toml``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TaskError(f"{path}: cannot read: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_task(data, path, default_id=stem)


def load_dir(folder: str) -> tuple[list[Task], dict[str, str]]:
    """Every task file of ``folder``; returns the good tasks and, by file, why the others failed.
    A missing folder has no tasks. Two files with one task id: both are refused."""
    tasks: list[Task] = []
    errors: dict[str, str] = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return [], {}
    for name in names:
        if not name.endswith((".json", ".toml")):
            continue
        path = os.path.join(folder, name)
        try:
            tasks.append(load_file(path))
        except TaskError as e:
            errors[path] = str(e)
    by_id: dict[str, list[Task]] = {}
    for t in tasks:
        by_id.setdefault(t.id, []).append(t)
    good = []
    for tid, same in by_id.items():
        if len(same) == 1:
            good.append(same[0])
        else:
            files = ", ".join(t.origin for t in same)
            for t in same:
                errors[t.origin] = f"{t.origin}: id: task id {tid!r} is used by several files ({files})"
    return good, errors
