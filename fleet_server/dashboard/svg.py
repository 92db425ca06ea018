"""Charts drawn on the server as SVG: bars, a gate over time, histograms, heat-map colours.

Each function takes plain numbers and returns one ``<svg>`` element as text,
labelled for screen readers (``role="img"``, a ``<title>``). Nothing here
reads the database or the request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# The colours of the dashboard's stylesheet, repeated here because SVG fills are inline.
INK = "#1f2933"
MUTED = "#7b8794"
BAR = "#3e7cb1"
FIELD = "#d9822b"
PASS = "#2f855a"
FAIL = "#c53030"
NO_DATA = "#e4e7eb"


def _num(value: float) -> str:
    """A coordinate with at most one decimal."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _label(value: float) -> str:
    """A figure as a chart shows it: at most three significant digits."""
    if value == 0 or not math.isfinite(value):
        return str(value) if not math.isfinite(value) else "0"
    return f"{value:.3g}"


def bar_chart(title: str, items: Sequence[tuple[str, float]], width: int = 360) -> str:
    """Horizontal bars, one per ``(label, value)``, each labelled with its value."""
    row = 22
    label_w = 130
    height = max(1, len(items)) * row + 4
    top = max((v for _, v in items), default=0.0) or 1.0
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {width} {height}" width="{width}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    if not items:
        parts.append(f'<text x="4" y="16" fill="{MUTED}" font-size="12">none</text>')
    for i, (label, value) in enumerate(items):
        y = i * row + 2
        w = (width - label_w - 50) * (value / top)
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12" '
            f'fill="{INK}">{escape(label[:24])}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{_num(w)}" height="{row - 8}" fill="{BAR}"/>'
            f'<text x="{_num(label_w + w + 4)}" y="{y + 15}" font-size="12" '
            f'fill="{INK}">{escape(_label(value))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class GatePoint:
    """A gate at one tick: its estimate and anytime-valid interval (``None``: not enough
    data), the devices it rests on and its decision."""

    at: str
    estimate: float | None
    low: float | None
    high: float | None
    n: int
    decision: str


def gate_chart(
    gate: str, points: Sequence[GatePoint], margin: float, harm_at: float, width: int = 560
) -> str:
    """A gate over time: each tick's estimate with its interval, against the margin (dashed)
    and the harm bound (dotted). A tick without an estimate is a grey mark at the foot."""
    height = 180
    left, right, top, bottom = 92, 12, 14, 36
    plot_w = width - left - right
    plot_h = height - top - bottom
    values = [margin, harm_at]
    for p in points:
        values += [v for v in (p.estimate, p.low, p.high) if v is not None and math.isfinite(v)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / len(points) if points else plot_w / 2)

    title = f"gate {gate}: estimate and interval at each evaluation against the margin {margin:g}"
    parts = [
        f'<svg class="chart gate" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="{MUTED}"/>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        f'stroke="{MUTED}"/>',
    ]
    labelled: list[float] = []
    for v, dash, name in ((margin, "6 4", "margin"), (harm_at, "2 3", "harm")):
        if name == "harm" and math.isclose(harm_at, margin):
            continue  # a comparison gate: harm beyond the margin, a pass within it
        parts.append(
            f'<line class="{name}" x1="{left}" y1="{_num(y(v))}" x2="{left + plot_w}" '
            f'y2="{_num(y(v))}" stroke="{FAIL if name == "harm" else PASS}" '
            f'stroke-dasharray="{dash}"><title>{name} {escape(_label(v))}</title></line>'
        )
        labelled.append(y(v))
        if len(labelled) == 1 or abs(labelled[0] - labelled[1]) >= 12:
            parts.append(
                f'<text x="{left - 4}" y="{_num(y(v) + 4)}" text-anchor="end" font-size="11" '
                f'fill="{INK}">{name} {escape(_label(v))}</text>'
            )
    # The axis's ends, where no bound's label sits.
    for v in (hi, lo):
        if all(abs(y(v) - at) >= 12 for at in labelled):
            parts.append(
                f'<text x="{left - 4}" y="{_num(y(v) + 4)}" text-anchor="end" font-size="10" '
                f'fill="{MUTED}">{escape(_label(v))}</text>'
            )
    for i, p in enumerate(points):
        cx = _num(x(i))
        if p.estimate is None or not math.isfinite(p.estimate):
            parts.append(
                f'<rect class="no-data" x="{_num(x(i) - 3)}" y="{top + plot_h - 8}" width="6" '
                f'height="6" fill="{NO_DATA}" stroke="{MUTED}"><title>{escape(p.at)}: not enough '
                f"data (n={p.n})</title></rect>"
            )
            continue
        colour = {"pass": PASS, "fail": FAIL}.get(p.decision, BAR)
        if p.low is not None and p.high is not None:
            low = p.low if math.isfinite(p.low) else lo
            high = p.high if math.isfinite(p.high) else hi
            parts.append(
                f'<line class="interval" x1="{cx}" y1="{_num(y(max(low, lo)))}" x2="{cx}" '
                f'y2="{_num(y(min(high, hi)))}" stroke="{colour}" stroke-width="2"/>'
            )
        parts.append(
            f'<circle class="estimate" cx="{cx}" cy="{_num(y(p.estimate))}" r="3.5" '
            f'fill="{colour}"><title>{escape(p.at)}: {escape(_label(p.estimate))} '
            f"({escape(p.decision)}, n={p.n})</title></circle>"
        )
    if points:
        last = points[-1]
        parts.append(
            f'<text x="{left}" y="{height - 8}" font-size="11" fill="{INK}">{len(points)} '
            f"evaluations, {escape(_span(points[0].at, last.at))}; latest n={last.n}, "
            f"{escape(last.decision)}</text>"
        )
    else:
        parts.append(
            f'<text x="{left + 8}" y="{top + plot_h / 2}" font-size="12" fill="{MUTED}">'
            "no evaluation yet</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _span(first: str, last: str) -> str:
    """From ``first`` to ``last`` (``YYYY-MM-DD HH:MM:SS``), the date once if they share it."""
    if first[:10] == last[:10]:
        return f"{first[:10]} {first[11:16]}–{last[11:16]}"
    return f"{first[:16]} – {last[:16]}"


def histogram_chart(
    title: str,
    edges: Sequence[float],
    baseline: Sequence[float],
    field: Sequence[float],
    width: int = 560,
) -> str:
    """Baseline against field over the same bins, each as shares of its own total, side by side
    in each bin (baseline blue, field orange)."""
    height = 170
    left, bottom, top = 10, 28, 10
    plot_h = height - top - bottom
    b_total = sum(baseline) or 1.0
    f_total = sum(field) or 1.0
    bins = max(len(baseline), len(field), 1)
    shares = [
        (
            baseline[i] / b_total if i < len(baseline) else 0.0,
            field[i] / f_total if i < len(field) else 0.0,
        )
        for i in range(bins)
    ]
    top_share = max((max(s) for s in shares), default=0.0) or 1.0
    step = (width - 2 * left) / bins
    parts = [
        f'<svg class="chart histogram" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i, (b, f) in enumerate(shares):
        x0 = left + i * step
        for j, (share, colour, name) in enumerate(((b, BAR, "baseline"), (f, FIELD, "field"))):
            h = plot_h * share / top_share
            parts.append(
                f'<rect class="{name}" x="{_num(x0 + j * step / 2)}" y="{_num(top + plot_h - h)}" '
                f'width="{_num(max(step / 2 - 1, 0.5))}" height="{_num(h)}" fill="{colour}">'
                f"<title>{name} {escape(_label(share * 100))}%</title></rect>"
            )
    if edges:
        parts.append(
            f'<text x="{left}" y="{height - 8}" font-size="11" fill="{INK}">'
            f"{escape(_label(edges[0]))}</text>"
            f'<text x="{width - left}" y="{height - 8}" text-anchor="end" font-size="11" '
            f'fill="{INK}">{escape(_label(edges[-1]))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def heat_colour(statistic: float | None, critical: float | None) -> str:
    """A heat-map cell's colour: green below its critical value shading to red past it;
    the "not enough data" grey when either is missing."""
    if statistic is None or critical is None or critical <= 0 or not math.isfinite(statistic):
        return NO_DATA
    ratio = max(0.0, min(statistic / critical, 2.0)) / 2.0  # 0.5: at the critical value
    green = (0x2F, 0x85, 0x5A)
    amber = (0xF0, 0xB4, 0x29)
    red = (0xC5, 0x30, 0x30)
    a, b, t = (green, amber, ratio * 2) if ratio < 0.5 else (amber, red, ratio * 2 - 1)
    rgb = tuple(round(a[k] + (b[k] - a[k]) * t) for k in range(3))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass(frozen=True)
class AccuracyMark:
    """One period on an accuracy chart: where it ends (``t``, seconds; ``at``, as shown),
    CBPE's estimate and interval, and the labelled accuracy (``None``: not there)."""

    t: float
    at: str
    estimate: float | None
    low: float | None
    high: float | None
    n: int
    labelled: float | None
    labelled_rows: int


def _fig(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def accuracy_chart(
    title: str,
    marks: Sequence[AccuracyMark],
    threshold: float | None,
    reference: float | None,
    width: int = 560,
) -> str:
    """Accuracy over time: CBPE's estimate with its interval (blue) and the labelled accuracy
    (orange squares) on one time axis, against the alert threshold (dashed) and the
    calibration's accuracy (dotted)."""
    height = 190
    left, right, top, bottom = 46, 12, 12, 40
    plot_w = width - left - right
    plot_h = height - top - bottom
    values = [v for v in (threshold, reference) if v is not None and math.isfinite(v)]
    for m in marks:
        values += [
            v for v in (m.estimate, m.low, m.high, m.labelled) if v is not None and math.isfinite(v)
        ]
    lo = max(0.0, min(values, default=0.0) - 0.05)
    hi = min(1.0, max(values, default=1.0) + 0.05)
    if hi - lo < 0.1:
        lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    t0 = min((m.t for m in marks), default=0.0)
    t1 = max((m.t for m in marks), default=0.0)

    def y(v: float) -> float:
        return top + plot_h * (hi - min(max(v, lo), hi)) / (hi - lo)

    def x(t: float) -> float:
        return left + (plot_w * (t - t0) / (t1 - t0) if t1 > t0 else plot_w / 2)

    parts = [
        f'<svg class="chart accuracy" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="{MUTED}"/>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        f'stroke="{MUTED}"/>',
    ]
    for end in (hi, lo):
        parts.append(
            f'<text x="{left - 4}" y="{_num(y(end) + 4)}" text-anchor="end" font-size="10" '
            f'fill="{MUTED}">{escape(_label(end))}</text>'
        )
    for bound, dash, name, colour in (
        (threshold, "6 4", "threshold", FAIL),
        (reference, "2 3", "reference", PASS),
    ):
        if bound is None or not math.isfinite(bound):
            continue
        parts.append(
            f'<line class="{name}" x1="{left}" y1="{_num(y(bound))}" x2="{left + plot_w}" '
            f'y2="{_num(y(bound))}" stroke="{colour}" stroke-dasharray="{dash}">'
            f"<title>{name} {escape(_label(bound))}</title></line>"
        )
    estimated = [(m.t, m.estimate) for m in marks if m.estimate is not None]
    labelled = [(m.t, m.labelled) for m in marks if m.labelled is not None]
    for line, points, colour, dash in (
        ("estimate-line", estimated, BAR, ""),
        ("labelled-line", labelled, FIELD, ' stroke-dasharray="4 3"'),
    ):
        if len(points) > 1:
            path = " ".join(f"{_num(x(t))},{_num(y(v))}" for t, v in points)
            parts.append(
                f'<polyline class="{line}" points="{path}" fill="none" stroke="{colour}" '
                f'stroke-width="1.5"{dash}/>'
            )
    for m in marks:
        cx = _num(x(m.t))
        said = (
            f"{m.at}: estimated {_fig(m.estimate)} [{_fig(m.low)}, {_fig(m.high)}], n={m.n}; "
            f"labelled {_fig(m.labelled)} ({m.labelled_rows} rows)"
        )
        if m.estimate is not None:
            if m.low is not None and m.high is not None:
                parts.append(
                    f'<line class="interval" x1="{cx}" y1="{_num(y(m.low))}" x2="{cx}" '
                    f'y2="{_num(y(m.high))}" stroke="{BAR}" stroke-width="2" opacity="0.6"/>'
                )
            parts.append(
                f'<circle class="estimate" cx="{cx}" cy="{_num(y(m.estimate))}" r="3.5" '
                f'fill="{BAR}"><title>{escape(said)}</title></circle>'
            )
        if m.labelled is not None:
            parts.append(
                f'<rect class="labelled" x="{_num(x(m.t) - 3.5)}" y="{_num(y(m.labelled) - 3.5)}" '
                f'width="7" height="7" fill="{FIELD}"><title>{escape(said)}</title></rect>'
            )
        if m.estimate is None and m.labelled is None:
            parts.append(
                f'<rect class="no-data" x="{_num(x(m.t) - 3)}" y="{top + plot_h - 8}" width="6" '
                f'height="6" fill="{NO_DATA}" stroke="{MUTED}"><title>{escape(said)}</title></rect>'
            )
    if marks:
        parts.append(
            f'<text x="{left}" y="{height - 22}" font-size="11" fill="{INK}">'
            f"{escape(_span(marks[0].at, marks[-1].at))}, {len(marks)} "
            f"period{'s' if len(marks) != 1 else ''}</text>"
            f'<text x="{left}" y="{height - 8}" font-size="11" fill="{INK}">'
            f'<tspan fill="{BAR}">● estimated (CBPE) with interval</tspan>  '
            f'<tspan fill="{FIELD}">■ labelled</tspan></text>'
        )
    else:
        parts.append(
            f'<text x="{left + 8}" y="{top + plot_h / 2}" font-size="12" fill="{MUTED}">'
            "no windows in range</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
