"""How the command prints: aligned text tables for people, JSON for programs.

I/O-free: every function returns text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``30d``, ``1w``, ``1h30m``: a timedelta.
    Raises ValueError with the accepted forms."""
    spec = text.strip().lower()
    try:
        return timedelta(seconds=float(spec))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(spec):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(spec) or not spec:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 15m, 2h, 30d, 1w, 1h30m)")
    return timedelta(seconds=total)


def parse_since(text: str) -> datetime | timedelta:
    """A duration ago (``2h``) or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use a duration such as 2h, or ISO 8601 such as "
            "2026-12-01T09:00)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_json(kind: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{kind} is not valid JSON: {exc}") from None


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses as objects, ids as strings,
    times as ISO 8601, durations as seconds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def as_json(value: Any) -> str:
    return json.dumps(plain(value), ensure_ascii=False)


def when(value: datetime | None) -> str:
    """A time for a table: UTC, to the second."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; "(none)" for no rows."""
    if not rows:
        return "(none)"
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def short(value: Any, width: int = 60) -> str:
    """A one-line preview of a JSON value."""
    text = json.dumps(plain(value), ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
