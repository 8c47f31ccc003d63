"""The throughput chart: runs completed and failed per minute, as inline SVG.

A pure function of the series, drawn on the server, so the page needs no
script to show it. Every text in it is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from .._inspect import MinuteCount

WIDTH = 600
HEIGHT = 120
_AXIS = 14  # room under the bars for the time labels


def throughput_svg(series: Sequence[MinuteCount], *, title: str = "") -> str:
    """One stacked bar per minute (completed below, failed on top), scaled to
    the busiest minute. An empty series, or one with no finishes, draws an
    empty chart saying so."""
    label = escape(title or "runs finished per minute", quote=True)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'aria-label="{label}">',
        f"<title>{label}</title>",
    ]
    peak = max((m.completed + m.failed for m in series), default=0)
    plot = HEIGHT - _AXIS
    if peak == 0:
        parts.append(
            f'<text x="{WIDTH // 2}" y="{plot // 2}" text-anchor="middle" class="empty">'
            "no runs finished</text>"
        )
    else:
        slot = WIDTH / len(series)
        bar = max(slot - 1, 1)
        for index, minute in enumerate(series):
            x = index * slot
            completed = plot * minute.completed / peak
            failed = plot * minute.failed / peak
            when = escape(minute.minute.strftime("%H:%M"))
            tip = f"{when} UTC: {minute.completed} completed, {minute.failed} failed"
            parts.append(f"<g><title>{tip}</title>")
            if minute.completed:
                parts.append(_rect("completed", x, plot - completed, bar, completed))
            if minute.failed:
                parts.append(_rect("failed", x, plot - completed - failed, bar, failed))
            parts.append("</g>")
        parts.append(
            f'<text x="{WIDTH}" y="{plot // 2}" text-anchor="end" class="peak">'
            f"peak {peak}/min</text>"
        )
    if series:
        first = escape(series[0].minute.strftime("%H:%M"))
        last = escape(series[-1].minute.strftime("%H:%M"))
        parts.append(f'<text x="0" y="{HEIGHT - 2}" class="axis">{first} UTC</text>')
        parts.append(
            f'<text x="{WIDTH}" y="{HEIGHT - 2}" text-anchor="end" class="axis">{last} UTC</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _rect(kind: str, x: float, y: float, width: float, height: float) -> str:
    return (
        f'<rect class="{kind}" x="{x:.2f}" y="{y:.2f}" width="{width:.2f}" height="{height:.2f}"/>'
    )
