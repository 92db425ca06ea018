"""What the planner plans from, per device: pure functions over the hourly hybrid stats.

A device's demand (:class:`DeviceInputs`) comes from its windows of the last
hours (:mod:`fleet_server.hybrid.aggregates` rows):

- rate: its requests over the summed duration of its windows (requests a second);
- calibrated confidence: the :data:`protocol.hybrid.CONFIDENCE_BINS` histogram its
  hybrid sections report (``source`` ``"hybrid"``). A device with no hybrid section
  yet has its windows' top-score histograms instead (``"scores"``), mapped through
  the temperature of its active release (:func:`scores_to_confidence`): an
  approximation, since the histogram keeps only the top score; with none of either
  (``"none"``) the histogram is empty and the planner takes confidence as uniform;
- link: the share of its cloud calls (escalations and audits) that failed for
  another reason than a 429 (rate-limited is the cloud's refusal, not the link's),
  and the p95 of its cloud latency (NaN when unknown), judged on the windows of
  its current plan (and the plans it renewed) when it has one: a device planned
  local for a failing link makes no calls under that plan, so its next plan (at
  the latest when the local one nears expiry) tries the link again instead of
  keeping it local for as long as the old failures stay in the lookback;
- weight and opt-out: the device's row.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fleet_server.hybrid.aggregates import HybridDelta
from fleet_server.hybrid.planner import FleetDemand
from fleet_server.rollouts.aggregates import LATENCY_FIRST, LATENCY_SCALE
from protocol.hybrid import CONFIDENCE_BINS
from protocol.summary import SCORE_BIN_COUNT

ConfidenceSource = Literal["hybrid", "scores", "none"]


@dataclass(frozen=True)
class DeviceInputs:
    """One device's demand and link, as the planner gets them and ``plan show`` explains."""

    device_id: str
    rate: float
    weight: float
    opted_out: bool
    temperature: float
    confidence: npt.NDArray[np.float64]  # CONFIDENCE_BINS counts
    source: ConfidenceSource
    link_errors: float
    link_latency_p95_ms: float  # NaN when unknown
    requests: int  # what the rate and confidence were counted over
    seconds: float


def scores_to_confidence(
    scores: Sequence[int], classes: int, temperature: float
) -> npt.NDArray[np.float64]:
    """The calibrated-confidence histogram a top-score histogram stands for, approximately.

    Each :data:`~protocol.summary.SCORE_BIN_COUNT` bin's count moves to the
    :data:`~protocol.hybrid.CONFIDENCE_BINS` bin of its centre ``s`` after temperature
    scaling, taking the rest of the probability, ``1 - s``, as spread evenly over the
    other ``classes - 1`` classes: ``s^(1/T) / (s^(1/T) + (K-1) ((1-s)/(K-1))^(1/T))``.
    Exact for two classes; with more, a top score whose rest is concentrated on one
    class calibrates lower than this says.
    """
    counts = np.asarray(scores, dtype=np.float64)
    out = np.zeros(CONFIDENCE_BINS, dtype=np.float64)
    if counts.sum() <= 0:
        return out
    k = max(int(classes), 2)
    s = (np.arange(SCORE_BIN_COUNT) + 0.5) / SCORE_BIN_COUNT
    s = np.clip(s, 1.0 / k, 1.0)  # a top score is never below 1/K
    top = s ** (1.0 / temperature)
    rest = (k - 1) * ((1.0 - s) / (k - 1)) ** (1.0 / temperature)
    calibrated = top / (top + rest)
    bins = np.clip((calibrated * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1)
    np.add.at(out, bins, counts)
    return out


def latency_p95_ms(cells: Mapping[int, int]) -> float:
    """The upper bound of the fixed-layout latency cell holding the 95th percentile (NaN: none)."""
    total = sum(cells.values())
    if total <= 0:
        return math.nan
    seen = 0
    for cell in sorted(cells):
        seen += cells[cell]
        if seen >= 0.95 * total:
            return float(2.0 ** ((cell + LATENCY_FIRST + 1) / 2**LATENCY_SCALE))
    return math.nan  # pragma: no cover - the loop always reaches the total


def _sum_cells(rows: Sequence[HybridDelta]) -> dict[int, int]:
    cells: dict[int, int] = {}
    for r in rows:
        for k, v in r.cloud_latency.items():
            cells[k] = cells.get(k, 0) + v
    return cells


def device_inputs(
    device_id: str,
    *,
    weight: float,
    opted_out: bool,
    temperature: float,
    recent: Sequence[HybridDelta],
    link_plans: Collection[str] | None = None,
) -> DeviceInputs:
    """``device_id``'s demand from its ``recent`` rows (every plan, and no plan).

    ``link_plans``: the ids of its current plan and those it renewed, whose rows
    alone the link is judged on (``None``: it has no plan; every recent row).
    """
    requests = sum(r.requests for r in recent)
    seconds = sum(r.seconds for r in recent)
    rate = requests / seconds if seconds > 0 else 0.0
    hybrid = np.sum([r.confidence for r in recent], axis=0) if recent else np.zeros(0)
    source: ConfidenceSource
    if len(hybrid) and hybrid.sum() > 0:
        confidence = np.asarray(hybrid, dtype=np.float64)
        source = "hybrid"
    else:
        scores = np.sum([r.scores for r in recent], axis=0) if recent else np.zeros(0)
        classes = max((r.score_classes for r in recent), default=0)
        if len(scores) and scores.sum() > 0:
            confidence = scores_to_confidence(scores.tolist(), classes, temperature)
            source = "scores"
        else:
            confidence = np.zeros(CONFIDENCE_BINS, dtype=np.float64)
            source = "none"
    linked = recent if link_plans is None else [r for r in recent if r.plan_id in link_plans]
    calls = sum(r.escalated + r.audits for r in linked)
    failed = sum(v for r in linked for k, v in r.cloud_errors.items() if k != "rate_limited")
    return DeviceInputs(
        device_id=device_id,
        rate=rate,
        weight=weight,
        opted_out=opted_out,
        temperature=temperature,
        confidence=confidence,
        source=source,
        link_errors=min(failed / calls, 1.0) if calls else 0.0,
        link_latency_p95_ms=latency_p95_ms(_sum_cells(linked)),
        requests=requests,
        seconds=seconds,
    )


def fleet_demand(devices: Sequence[DeviceInputs]) -> FleetDemand:
    """The planner's arrays, one entry per device in the order given."""
    n = len(devices)
    confidence: npt.NDArray[Any] = (
        np.stack([d.confidence for d in devices])
        if n
        else np.zeros((0, CONFIDENCE_BINS), dtype=np.float64)
    )
    return FleetDemand(
        device_ids=[d.device_id for d in devices],
        rate=np.array([d.rate for d in devices], dtype=np.float64),
        weight=np.array([d.weight for d in devices], dtype=np.float64),
        confidence=confidence,
        opted_out=np.array([d.opted_out for d in devices], dtype=np.bool_),
        link_errors=np.array([d.link_errors for d in devices], dtype=np.float64),
        link_latency_ms=np.array([d.link_latency_p95_ms for d in devices], dtype=np.float64),
    )
