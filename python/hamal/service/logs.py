"""The service's log files, as the operator's manual lists them, under ``[DEFAULT] log_dir``:

- ``hamal-period.log``: the loop (tasks, scheduling, cycles started and ended);
- ``hamal-period-subprocess.log``: worker management and what workers print;
- ``vm-<name>-<uuid>.log``: each cycle of one VM (snapshot, changes, sync summary, commit,
  errors), written by that VM's worker; Rust engine events land there too;
- ``ip_mapping.backup``: the NIC addresses the platform reports per VM (see ``write_ip_mapping``).

Rotation by size (``max_logfile_size_mb``, ``max_logfile_count`` files in all). ``debug = True``
logs at DEBUG, else INFO; ``verbose = True`` adds the engine's per-disk detail. A filter masks
every secret the process knows in every record.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
from typing import Any

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
PERIOD_LOG = "hamal-period.log"
SUBPROCESS_LOG = "hamal-period-subprocess.log"
IP_MAPPING = "ip_mapping.backup"
MASK = "********"


#: Control characters (all but tab) in a message: a peer's text with CR, LF or ESC in it must not
#: forge log lines or terminal sequences.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def escape_controls(text: str) -> str:
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class SecretFilter(logging.Filter):
    """Replaces known secret values in a record's final message, and escapes its control
    characters (a traceback, added by the formatter, keeps its lines)."""

    secrets: set[str] = set()
    #: Secrets too short to mask as bare substrings (they would garble every line): masked
    #: where they stand alone, between non-alphanumerics.
    short_secrets: set[str] = set()
    short: re.Pattern[str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for s in sorted(self.secrets, key=len, reverse=True):
            msg = msg.replace(s, MASK)
        if self.short is not None:
            msg = self.short.sub(MASK, msg)
        record.msg, record.args = escape_controls(msg), None
        return True


def add_secret(value: str) -> None:
    """Masks ``value`` in every log record of this process from now on, whatever its length."""
    if not value:
        return
    if len(value) >= 4:
        SecretFilter.secrets.add(value)
        return
    SecretFilter.short_secrets.add(value)
    alternatives = "|".join(re.escape(v) for v in sorted(SecretFilter.short_secrets, key=len, reverse=True))
    SecretFilter.short = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def _handler(conf: dict[str, Any], path: str) -> logging.Handler:
    d = conf["DEFAULT"]
    h = logging.handlers.RotatingFileHandler(
        path,
        maxBytes=int(d["max_logfile_size_mb"]) << 20,
        backupCount=max(int(d["max_logfile_count"]) - 1, 1),
        encoding="utf-8",
    )
    h.setFormatter(logging.Formatter(FORMAT))
    h.addFilter(SecretFilter())
    return h


def log_dir(conf: dict[str, Any]) -> str:
    return str(conf["DEFAULT"]["log_dir"])


def _levels(conf: dict[str, Any]) -> None:
    d = conf["DEFAULT"]
    logging.getLogger("hamal").setLevel(logging.DEBUG if d["debug"] else logging.INFO)
    # The engine's per-chunk and per-disk chatter only when asked for.
    engine = logging.DEBUG if d["debug"] else logging.INFO if d["verbose"] else logging.WARNING
    logging.getLogger("hamal.hamal_core").setLevel(engine)


def _to_file(conf: dict[str, Any], name: str, file: str) -> logging.Logger:
    """Logger ``name`` writes to ``file`` in the log folder, and only there."""
    folder = log_dir(conf)
    os.makedirs(folder, exist_ok=True)
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.addHandler(_handler(conf, os.path.join(folder, file)))
    logger.propagate = False
    return logger


def setup_service(conf: dict[str, Any]) -> logging.Logger:
    """The loop's logs; returns the logger of ``hamal-period-subprocess.log``."""
    _to_file(conf, "hamal", PERIOD_LOG)
    _levels(conf)
    sub = _to_file(conf, "hamal.subprocess", SUBPROCESS_LOG)
    sub.setLevel(logging.DEBUG)
    return sub


def setup_worker(conf: dict[str, Any], vm_log: str) -> None:
    """A worker logs its VM's cycle to ``vm_log``; its stderr reaches the subprocess log."""
    root = _to_file(conf, "hamal", vm_log)
    warn = logging.StreamHandler()
    warn.setLevel(logging.ERROR)
    warn.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    warn.addFilter(SecretFilter())
    root.addHandler(warn)
    _levels(conf)


def write_ip_mapping(conf: dict[str, Any], vm_uuid: str, name: str, addresses: dict[str, list[str]]) -> None:
    """Updates ``ip_mapping.backup`` (JSON: VM uuid -> name and NIC addresses) after a good
    cycle; written atomically. VMs with no reported address are not listed, so the file is
    empty when no platform reports any."""
    path = os.path.join(log_dir(conf), IP_MAPPING)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.pop(vm_uuid, None)
    if addresses:
        data[vm_uuid] = {"name": name, "addresses": addresses}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        if data:
            json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)
