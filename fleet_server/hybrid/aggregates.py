"""What each stored window adds to its device's hourly hybrid stats: pure folding.

:func:`fold_hybrid` turns one window into a :class:`HybridDelta` of the row
``(device, plan, hour of the window's end)``; :func:`combine` adds two deltas
of one row, so a batch's deltas and the stored row sum in any order. Every
window counts (its requests and duration give the device's request rate, its
top-score histogram the planner's confidence before any plan); a window with a
hybrid section also counts what the device did under that section's plan, in
that plan's row. A window without one goes to the row of plan ``""``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from fleet_server.rollouts.aggregates import hour_of, latency_cells
from protocol.hybrid import CONFIDENCE_BINS
from protocol.summary import SCORE_BIN_COUNT
from protocol.window import WindowSummary

NO_PLAN = ""
Key = tuple[str, str, datetime]  # device_id, plan_id, hour
# A row's histograms and error counts, stored as JSON; the rest are counts and times.
JSON_COLUMNS: Final = ("scores", "cloud_errors", "local_latency", "cloud_latency", "confidence")


@dataclass(frozen=True)
class HybridDelta:
    """What some windows add to one row of ``device_hybrid_stats``."""

    device_id: str
    plan_id: str
    hour: datetime
    last_end: datetime
    windows: int = 0
    requests: int = 0
    seconds: float = 0.0
    score_classes: int = 0
    scores: tuple[int, ...] = (0,) * SCORE_BIN_COUNT
    local: int = 0
    escalated: int = 0
    kept_local_quota: int = 0
    cloud_answered: int = 0
    audits: int = 0
    cloud_errors: Mapping[str, int] = field(default_factory=dict)
    escalated_compared: int = 0
    escalated_agreements: int = 0
    audit_compared: int = 0
    audit_agreements: int = 0
    audit_confidence_sum: float = 0.0
    local_latency: Mapping[int, int] = field(default_factory=dict)
    cloud_latency: Mapping[int, int] = field(default_factory=dict)
    confidence: tuple[int, ...] = (0,) * CONFIDENCE_BINS

    @property
    def key(self) -> Key:
        return (self.device_id, self.plan_id, self.hour)

    def adds_to(self, column: str) -> bool:
        """Whether adding this delta to a row changes its column ``column`` (one of
        :data:`JSON_COLUMNS`): some bin or count of it is not zero."""
        value = getattr(self, column)
        return any(value.values() if isinstance(value, Mapping) else value)


def fold_hybrid(window: WindowSummary) -> HybridDelta:
    """What ``window`` adds to its device's row of its plan (or of no plan) and hour."""
    scores = (0,) * SCORE_BIN_COUNT
    classes = 0
    if window.scores is not None and window.scores.counts:
        classes = len(window.scores.classes)
        scores = tuple(map(sum, zip(*window.scores.counts, strict=True)))
    delta = HybridDelta(
        device_id=window.device_id,
        plan_id=NO_PLAN,
        hour=hour_of(window.end),
        last_end=datetime.fromtimestamp(window.end, UTC),
        windows=1,
        requests=window.requests,
        seconds=window.end - window.start,
        score_classes=classes,
        scores=scores,
    )
    h = window.hybrid
    if h is None:
        return delta
    return replace(
        delta,
        plan_id=h.plan_id,
        local=h.local,
        escalated=h.escalated,
        kept_local_quota=h.kept_local_quota,
        cloud_answered=h.cloud_answered,
        audits=h.audits,
        cloud_errors={k: v for k, v in h.cloud_errors.items() if v},
        escalated_compared=h.escalated_compared,
        escalated_agreements=h.escalated_agreements,
        audit_compared=h.audit_compared,
        audit_agreements=h.audit_agreements,
        audit_confidence_sum=h.audit_confidence_sum,
        local_latency=latency_cells(h.local_latency_ms),
        cloud_latency=latency_cells(h.cloud_latency_ms),
        confidence=tuple(h.confidence),
    )


K = TypeVar("K", int, str)


def _add(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _add_bins(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Two histograms of one layout added bin by bin (a row has one for every window)."""
    if len(a) != len(b):
        raise ValueError(f"histograms of {len(a)} and {len(b)} bins")
    return tuple(map(operator.add, a, b))


def combine(a: HybridDelta, b: HybridDelta) -> HybridDelta:
    """The sum of two deltas of the same row (the newer ``last_end`` stays)."""
    if a.key != b.key:
        raise ValueError(f"deltas of different rows: {a.key} and {b.key}")
    # Made field by field: dataclasses.replace costs a batch more than the sums.
    return HybridDelta(
        device_id=a.device_id,
        plan_id=a.plan_id,
        hour=a.hour,
        last_end=max(a.last_end, b.last_end),
        windows=a.windows + b.windows,
        requests=a.requests + b.requests,
        seconds=a.seconds + b.seconds,
        score_classes=max(a.score_classes, b.score_classes),
        scores=_add_bins(a.scores, b.scores),
        local=a.local + b.local,
        escalated=a.escalated + b.escalated,
        kept_local_quota=a.kept_local_quota + b.kept_local_quota,
        cloud_answered=a.cloud_answered + b.cloud_answered,
        audits=a.audits + b.audits,
        cloud_errors=_add(a.cloud_errors, b.cloud_errors),
        escalated_compared=a.escalated_compared + b.escalated_compared,
        escalated_agreements=a.escalated_agreements + b.escalated_agreements,
        audit_compared=a.audit_compared + b.audit_compared,
        audit_agreements=a.audit_agreements + b.audit_agreements,
        audit_confidence_sum=a.audit_confidence_sum + b.audit_confidence_sum,
        local_latency=_add(a.local_latency, b.local_latency),
        cloud_latency=_add(a.cloud_latency, b.cloud_latency),
        confidence=_add_bins(a.confidence, b.confidence),
    )


def combine_all(deltas: Iterable[HybridDelta]) -> dict[Key, HybridDelta]:
    """``deltas`` summed per row."""
    out: dict[Key, HybridDelta] = {}
    for d in deltas:
        before = out.get(d.key)
        out[d.key] = d if before is None else combine(before, d)
    return out


_FIELDS: Final = tuple(f.name for f in fields(HybridDelta))


def row_values(d: HybridDelta) -> dict[str, object]:
    """The column values of a row holding ``d``."""
    values: dict[str, object] = {name: getattr(d, name) for name in _FIELDS}
    values["scores"] = list(d.scores)
    values["confidence"] = list(d.confidence)
    values["cloud_errors"] = dict(sorted(d.cloud_errors.items()))
    values["local_latency"] = [[k, v] for k, v in sorted(d.local_latency.items())]
    values["cloud_latency"] = [[k, v] for k, v in sorted(d.cloud_latency.items())]
    return values


def added_values(row: Any, d: HybridDelta, columns: Iterable[str]) -> dict[str, object]:
    """The values of the stored ``row`` (a row of its counts and of the JSON ``columns``)
    with ``d`` added: its counts and times, and its ``columns``, as
    ``row_values(combine(delta_of(row), d))`` has them, without making either delta.

    The JSON columns not named are left out: the caller leaves them as stored,
    for ``d`` adds nothing to them (:meth:`HybridDelta.adds_to`).
    """
    values: dict[str, object] = {
        "last_end": max(row.last_end, d.last_end),
        "windows": row.windows + d.windows,
        "requests": row.requests + d.requests,
        "seconds": row.seconds + d.seconds,
        "score_classes": max(row.score_classes, d.score_classes),
        "local": row.local + d.local,
        "escalated": row.escalated + d.escalated,
        "kept_local_quota": row.kept_local_quota + d.kept_local_quota,
        "cloud_answered": row.cloud_answered + d.cloud_answered,
        "audits": row.audits + d.audits,
        "escalated_compared": row.escalated_compared + d.escalated_compared,
        "escalated_agreements": row.escalated_agreements + d.escalated_agreements,
        "audit_compared": row.audit_compared + d.audit_compared,
        "audit_agreements": row.audit_agreements + d.audit_agreements,
        "audit_confidence_sum": row.audit_confidence_sum + d.audit_confidence_sum,
    }
    for column in columns:
        if column == "scores":
            values[column] = list(_add_bins(tuple(map(int, row.scores)), d.scores))
        elif column == "confidence":
            values[column] = list(_add_bins(tuple(map(int, row.confidence)), d.confidence))
        elif column == "cloud_errors":
            stored = {str(k): int(c) for k, c in row.cloud_errors.items()}
            values[column] = dict(sorted(_add(stored, d.cloud_errors).items()))
        elif column in ("local_latency", "cloud_latency"):
            cells = {int(k): int(c) for k, c in getattr(row, column)}
            summed = _add(cells, getattr(d, column))
            values[column] = [[k, v] for k, v in sorted(summed.items())]
        else:
            raise ValueError(f"{column} is not a JSON column of the hybrid stats")
    return values


def delta_of(row: Any) -> HybridDelta:
    """The delta a stored row holds: a ``DeviceHybridStats`` or a Core row of its columns."""
    return HybridDelta(
        device_id=row.device_id,
        plan_id=row.plan_id,
        hour=row.hour,
        last_end=row.last_end,
        windows=row.windows,
        requests=row.requests,
        seconds=row.seconds,
        score_classes=row.score_classes,
        scores=tuple(map(int, row.scores)),
        local=row.local,
        escalated=row.escalated,
        kept_local_quota=row.kept_local_quota,
        cloud_answered=row.cloud_answered,
        audits=row.audits,
        cloud_errors={str(k): int(c) for k, c in row.cloud_errors.items()},
        escalated_compared=row.escalated_compared,
        escalated_agreements=row.escalated_agreements,
        audit_compared=row.audit_compared,
        audit_agreements=row.audit_agreements,
        audit_confidence_sum=row.audit_confidence_sum,
        local_latency={int(k): int(c) for k, c in row.local_latency},
        cloud_latency={int(k): int(c) for k, c in row.cloud_latency},
        confidence=tuple(map(int, row.confidence)),
    )
