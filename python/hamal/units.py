"""Human byte sizes on the command line: ``4M``, ``4MiB``, ``1G``, ``512k`` or plain bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``; binary multiples (``M`` = MiB). Raises ValueError naming the text."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"'{text}' is not a size (examples: 4194304, 4M, 4MiB, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def human(n: float) -> str:
    """``n`` bytes as a short binary-unit string."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
