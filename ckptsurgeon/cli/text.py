"""Text helpers the CLI needs on every run; no rich here, so `--json` never imports it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def safe(text: Any) -> str:
    """Show control characters escaped (a crafted key could carry terminal escape sequences)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def to_json(data: Mapping[str, Any], *, pretty: bool = False) -> str:
    """One JSON document; indented for a person at a terminal, compact (C encoder) otherwise."""
    if pretty:
        return json.dumps(data, indent=2, ensure_ascii=False)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
