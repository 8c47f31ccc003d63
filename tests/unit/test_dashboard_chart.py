"""The dashboard's throughput chart: a pure function from minutes to SVG."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

import pytest

pytest.importorskip("starlette")  # the dashboard extra

from absurd_sqla import MinuteCount
from absurd_sqla.dashboard.chart import HEIGHT, throughput_svg

START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def minutes(*counts: tuple[int, int]) -> list[MinuteCount]:
    return [MinuteCount(START + timedelta(minutes=i), c, f) for i, (c, f) in enumerate(counts)]


def bars(svg: str, kind: str) -> list[float]:
    root = ElementTree.fromstring(svg)
    return [float(r.get("height", "0")) for r in root.iter(f"{SVG}rect") if r.get("class") == kind]


def test_bars_are_proportional_to_the_busiest_minute() -> None:
    svg = throughput_svg(minutes((10, 0), (5, 5), (0, 2), (0, 0)))
    completed, failed = bars(svg, "completed"), bars(svg, "failed")
    assert len(completed) == 2 and len(failed) == 2
    full = completed[0]
    assert full == pytest.approx(HEIGHT - 14)  # the peak fills the plot
    assert completed[1] == pytest.approx(full / 2) and failed[0] == pytest.approx(full / 2)
    assert failed[1] == pytest.approx(full / 5)
    assert "peak 10/min" in svg and "12:00 UTC" in svg and "12:03 UTC" in svg


def test_a_failed_bar_sits_on_top_of_its_completed_bar() -> None:
    root = ElementTree.fromstring(throughput_svg(minutes((3, 1))))
    rects = {r.get("class"): r for r in root.iter(f"{SVG}rect")}
    completed, failed = rects["completed"], rects["failed"]
    top_of_completed = float(completed.get("y", "0"))
    assert float(failed.get("y", "0")) + float(failed.get("height", "0")) == pytest.approx(
        top_of_completed
    )


@pytest.mark.parametrize("series", [[], minutes((0, 0), (0, 0))])
def test_no_finishes_draw_an_empty_chart(series: list[MinuteCount]) -> None:
    svg = throughput_svg(series)
    ElementTree.fromstring(svg)  # well-formed
    assert "<rect" not in svg and "no runs finished" in svg


def test_the_title_is_escaped() -> None:
    svg = throughput_svg(minutes((1, 0)), title='<script>"x"</script>')
    assert "<script>" not in svg and "&lt;script&gt;&quot;x&quot;" in svg
    root = ElementTree.fromstring(svg)
    assert root.get("aria-label") == '<script>"x"</script>'
    assert re.search(r"<title>&lt;script&gt;", svg)
