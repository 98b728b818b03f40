"""``hamal mass check``: one line saying what works, or the first thing that does not."""

from __future__ import annotations

from typing import Any

from hamal.control.mass import MassClient
from hamal.errors import ConfigError, MassError

WHAT = {
    "dns": "DNS",
    "tcp": "TCP",
    "tls": "TLS",
    "pin": "TLS pin mismatch",
    "timeout": "timeout",
    "auth": "auth rejected",
    "unknown_proxy": "proxy unknown",
    "route": "route missing",
    "http": "Mass error",
    "protocol": "not Mass",
}


def check(conf: dict[str, Any]) -> tuple[bool, str]:
    try:
        client = MassClient(conf)
    except ConfigError as e:
        return False, f"config: {e}"
    try:
        data = client.ping()
    except MassError as e:
        hint = {
            "auth": f" (auth_key of proxy {client.proxy_id}; see [mass] auth_key)",
            "pin": f" (is {client.http.pin_path} the console's current public key?)",
            "route": " (is the path of [mass] mass_endpoint right?)",
        }.get(e.kind, "")
        return False, f"{WHAT.get(e.kind, e.kind)}: {e}{hint}"
    finally:
        client.close()
    version = data.get("version", "?") if isinstance(data, dict) else "?"
    return True, (
        f"ok: Mass {version} at {client.endpoint} answers proxy {client.proxy_id} ({client.http.trust()})"
    )
