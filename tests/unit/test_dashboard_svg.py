"""The dashboard's SVG charts: well-formed, labelled, and drawing the numbers they are given."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from fleet_server.dashboard.svg import (
    NO_DATA,
    AccuracyMark,
    GatePoint,
    accuracy_chart,
    bar_chart,
    gate_chart,
    heat_colour,
    histogram_chart,
)

NS = {"s": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.get("role") == "img" and root.get("aria-label")
    assert root.find("s:title", NS) is not None
    return root


def test_bars_are_as_long_as_their_values_and_labelled() -> None:
    root = parse(bar_chart("devices by state", [("online", 10), ("failed", 5), ("none", 0)]))
    widths = [float(r.get("width", "")) for r in root.findall("s:rect", NS)]
    assert widths[0] == 2 * widths[1] and widths[2] == 0
    texts = [t.text for t in root.findall("s:text", NS)]
    assert texts == ["online", "10", "failed", "5", "none", "0"]


def test_labels_are_escaped() -> None:
    root = parse(bar_chart("<b>", [("<script>", 1)]))
    assert root.findall("s:text", NS)[0].text == "<script>"


def test_an_empty_bar_chart_says_none() -> None:
    root = parse(bar_chart("nothing", []))
    assert [t.text for t in root.findall("s:text", NS)] == ["none"]


def _point(estimate: float | None, low: float | None, high: float | None, n: int = 3) -> GatePoint:
    return GatePoint("2026-12-07 10:00:00", estimate, low, high, n, "inconclusive")


def test_a_gate_chart_draws_each_estimate_inside_its_interval_and_the_margin() -> None:
    points = [_point(0.1, 0.0, 0.2), _point(0.05, 0.03, 0.07), _point(None, None, None, 0)]
    root = parse(gate_chart("fallback_rate", points, margin=0.1, harm_at=0.3))
    estimates = root.findall("s:circle", NS)
    intervals = [line for line in root.findall("s:line", NS) if line.get("class") == "interval"]
    assert len(estimates) == 2 and len(intervals) == 2
    (margin,) = [line for line in root.findall("s:line", NS) if line.get("class") == "margin"]
    (harm,) = [line for line in root.findall("s:line", NS) if line.get("class") == "harm"]
    # SVG's y grows downwards: a larger value is higher up.
    assert float(harm.get("y1", "")) < float(margin.get("y1", ""))
    for circle, interval in zip(estimates, intervals, strict=True):
        y = float(circle.get("cy", ""))
        top, bottom = sorted((float(interval.get("y1", "")), float(interval.get("y2", ""))))
        assert top <= y <= bottom
    # The first estimate equals the margin: drawn on its line.
    assert abs(float(estimates[0].get("cy", "")) - float(margin.get("y1", ""))) < 0.11
    (no_data,) = [r for r in root.findall("s:rect", NS) if r.get("class") == "no-data"]
    assert "not enough data" in (no_data.find("s:title", NS).text or "")  # type: ignore[union-attr]


def test_a_comparison_gate_draws_one_line_for_harm_and_margin() -> None:
    root = parse(gate_chart("latency_p95", [_point(0.01, -0.02, 0.04)], 0.0953, 0.0953))
    classes = [line.get("class") for line in root.findall("s:line", NS)]
    assert classes.count("margin") == 1 and "harm" not in classes


def test_a_gate_chart_without_evaluations_says_so() -> None:
    root = parse(gate_chart("class_mix", [], margin=0.1, harm_at=0.2))
    assert any("no evaluation yet" in (t.text or "") for t in root.findall("s:text", NS))


def test_an_interval_without_bounds_is_clipped_to_the_chart() -> None:
    root = parse(gate_chart("g", [_point(0.0, float("-inf"), float("inf"))], 0.1, 0.2))
    (interval,) = [x for x in root.findall("s:line", NS) if x.get("class") == "interval"]
    ys = [float(interval.get("y1", "")), float(interval.get("y2", ""))]
    assert all(0 <= y <= 180 for y in ys)


def test_histograms_compare_shares_not_counts() -> None:
    root = parse(histogram_chart("f", [0, 1, 2], [10, 30], [100, 300]))
    base = [
        float(r.get("height", ""))
        for r in root.findall("s:rect", NS)
        if r.get("class") == "baseline"
    ]
    field = [
        float(r.get("height", "")) for r in root.findall("s:rect", NS) if r.get("class") == "field"
    ]
    assert base == field and base[1] == 3 * base[0]


def test_heat_colour_shades_from_green_to_red_and_greys_missing_data() -> None:
    assert heat_colour(None, 10.0) == NO_DATA
    assert heat_colour(5.0, None) == NO_DATA
    assert heat_colour(float("nan"), 10.0) == NO_DATA
    assert heat_colour(0.0, 10.0) == "#2f855a"
    assert heat_colour(10.0, 10.0) == "#f0b429"
    assert heat_colour(20.0, 10.0) == heat_colour(99.0, 10.0) == "#c53030"
    below, past = heat_colour(5.0, 10.0), heat_colour(15.0, 10.0)
    assert below not in (NO_DATA, past)


def _mark(t: float, estimate: float | None, labelled: float | None = None) -> AccuracyMark:
    low, high = (estimate - 0.05, estimate + 0.05) if estimate is not None else (None, None)
    at = f"2031-01-01 12:{int(t) // 60:02d}:00"
    return AccuracyMark(t, at, estimate, low, high, 200, labelled, 100 if labelled else 0)


def test_accuracy_over_time_draws_estimates_labels_and_periods_on_one_time_axis() -> None:
    marks = [_mark(0, 0.9, 0.88), _mark(60, 0.8), _mark(120, None, 0.7), _mark(600, None)]
    svg = accuracy_chart("fleet accuracy", marks, threshold=0.85, reference=0.9)
    root = parse(svg)
    assert "nan" not in svg.lower()
    circles = root.findall("s:circle", NS)
    assert len(circles) == 2  # the periods with an estimate
    squares = [r for r in root.findall("s:rect", NS) if r.get("class") == "labelled"]
    assert len(squares) == 2
    # Time, not order, places a period: 60 s after the first is a tenth of the way to 600 s.
    xs = [float(c.get("cx", "")) for c in circles]
    empty = next(r for r in root.findall("s:rect", NS) if r.get("class") == "no-data")
    last_x = float(empty.get("x", "")) + 3
    assert abs((xs[1] - xs[0]) / (last_x - xs[0]) - 0.1) < 0.01
    # Higher accuracy sits higher; each mark says its figures to a screen reader.
    assert float(circles[0].get("cy", "")) < float(circles[1].get("cy", ""))
    title = circles[0].find("s:title", NS)
    assert title is not None and title.text is not None
    assert "estimated 0.900 [0.850, 0.950], n=200; labelled 0.880 (100 rows)" in title.text
    classes = {line.get("class") for line in root.findall("s:line", NS)}
    assert {"threshold", "reference", "interval"} <= classes


def test_an_accuracy_chart_without_periods_or_bounds_says_so() -> None:
    root = parse(accuracy_chart("nothing yet", [], threshold=None, reference=None))
    assert any("no windows" in (t.text or "") for t in root.findall("s:text", NS))
    one = parse(accuracy_chart("one", [_mark(0, 0.5)], threshold=None, reference=None))
    assert len(one.findall("s:circle", NS)) == 1
