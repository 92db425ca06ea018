"""Accuracy over time: CBPE's estimate and the labelled accuracy of a scope, period by period.

The windows of a scope that ended in ``(since, until]`` are grouped by model
version and cut into periods of ``step`` ending at ``until``; each period's
top-score histograms are merged and estimated (:func:`protocol.cbpe.estimate_accuracy`),
and the labels posted for its windows (:mod:`fleet_server.labels`) give the
measured accuracy beside CBPE's estimate for those same windows. Whatever is
stored is read: a period without windows is left out, one without scores or
labels shows none, a window whose summary cannot be read is counted and
skipped, a release without calibration is said so, and no figure is NaN.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import WindowRow, as_utc
from fleet_server.drift import store
from fleet_server.drift.models import DriftError, Scope
from fleet_server.drift.store import ManifestCache
from protocol.api.accuracy import AccuracyPoint, AccuracySeries
from protocol.cbpe import AccuracyPolicy, Calibration, estimate_accuracy
from protocol.summary import ScoreHistogram
from protocol.window import WindowSummary, decode_window, merge_scores


@dataclass(frozen=True)
class Periods:
    """How ``(since, until]`` is cut: periods of ``step`` ending at ``until``."""

    since: datetime
    until: datetime
    step: timedelta

    def index(self, end: datetime) -> int:
        """The period (0: the last) of a window that ended at ``end``."""
        return max(0, math.floor((self.until - end) / self.step))

    def bounds(self, index: int) -> tuple[datetime, datetime]:
        end = self.until - index * self.step
        return (end - self.step if end - self.since > self.step else self.since), end


def periods_for(
    since: datetime,
    until: datetime,
    step_s: float | None,
    buckets: int,
    first_end: datetime | None,
) -> Periods:
    """The periods of a query: ``step_s`` given, or the span from the first window's end
    (else ``since``) to ``until`` cut into ``buckets`` periods of whole seconds. A period
    holds the windows that ended after its start, up to and at its end, so the step is a
    second more than ``span / buckets`` rounded down: the first window, which ended exactly
    ``span`` before ``until``, falls in the first of the ``buckets``, not in one more."""
    if step_s is None:
        span = (until - (first_end or since)).total_seconds()
        step_s = float(math.floor(span / buckets) + 1) if span > 0 else 1.0
    return Periods(since, until, timedelta(seconds=step_s))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


async def accuracy_history(
    session: AsyncSession,
    manifests: ManifestCache,
    scope: Scope,
    since: datetime,
    until: datetime,
    *,
    step_s: float | None = None,
    buckets: int = 24,
    model_name: str | None = None,
    model_version: str | None = None,
    policy: AccuracyPolicy | None = None,
    decoded: dict[str, WindowSummary] | None = None,
) -> tuple[Periods, list[AccuracySeries]]:
    """The periods used and a series per model version of ``scope``'s windows in range.

    ``decoded`` keeps the windows read, by id, for the next call (see
    :func:`fleet_server.drift.service.drift_of`).
    """
    policy = policy or AccuracyPolicy()
    decoded = decoded if decoded is not None else {}
    rows = await store.load_windows(session, scope, since, until, model_name, model_version)
    periods = periods_for(since, until, step_s, buckets, as_utc(rows[0].end) if rows else None)
    groups: dict[tuple[str, str], list[WindowRow]] = defaultdict(list)
    for row in rows:
        groups[(row.model_name, row.model_version)].append(row)
    series = []
    for (name, version), members in sorted(groups.items()):
        series.append(
            await _series(session, manifests, name, version, members, periods, policy, decoded)
        )
    return periods, series


async def _series(
    session: AsyncSession,
    manifests: ManifestCache,
    name: str,
    version: str,
    rows: Sequence[WindowRow],
    periods: Periods,
    policy: AccuracyPolicy,
    decoded: dict[str, WindowSummary],
) -> AccuracySeries:
    problem = None
    calibration: Calibration | None = None
    try:
        manifest = await manifests.get(session, name, version)
        calibration = manifest.baseline.calibration
        if calibration is None:
            problem = f"{name}@{version} ships no calibration: accuracy cannot be estimated"
    except DriftError as exc:
        problem = str(exc)
    windows = await asyncio.to_thread(_read, [(r.window_id, r.payload) for r in rows], decoded)
    labels = await store.labels_of(session, [w.window_id for w in windows.values()])
    by_period: dict[int, list[tuple[WindowRow, WindowSummary]]] = defaultdict(list)
    for row in rows:
        window = windows.get(row.window_id)
        if window is not None:
            by_period[periods.index(as_utc(row.end))].append((row, window))
    points = []
    for index in sorted(by_period, reverse=True):  # oldest first
        members = by_period[index]
        start, end = periods.bounds(index)
        scores = [w.scores for _, w in members if w.scores is not None]
        estimate = _estimate(calibration, scores, policy)
        marked = [(w, labels[w.window_id]) for _, w in members if w.window_id in labels]
        labelled_rows = sum(m.rows for _, m in marked)
        labelled_scores = [w.scores for w, _ in marked if w.scores is not None]
        labelled_estimate = _estimate(calibration, labelled_scores, policy)
        points.append(
            AccuracyPoint(
                start=start,
                end=end,
                windows=len(members),
                n=estimate[3],
                estimated=estimate[0],
                low=estimate[1],
                high=estimate[2],
                labelled_windows=len(marked),
                labelled_rows=labelled_rows,
                labelled=(
                    _finite(sum(m.correct for _, m in marked) / labelled_rows)
                    if labelled_rows
                    else None
                ),
                labelled_estimated=labelled_estimate[0] if marked else None,
            )
        )
    return AccuracySeries(
        model=name,
        version=version,
        reference=_finite(calibration.reference_accuracy) if calibration else None,
        threshold=_finite(policy.threshold(calibration)) if calibration else None,
        confidence=policy.confidence if calibration else None,
        points=points,
        unreadable=len(rows) - len(windows),
        problem=problem,
    )


def _read(
    payloads: Sequence[tuple[str, bytes]], decoded: dict[str, WindowSummary]
) -> dict[str, WindowSummary]:
    """The windows of ``payloads`` that can be read, by id (kept in ``decoded``)."""
    found = {}
    for window_id, payload in payloads:
        window = decoded.get(window_id)
        if window is None:
            try:
                window = decoded[window_id] = decode_window(payload)
            except ValueError:  # a codec or model error: counted as unreadable
                continue
        found[window_id] = window
    return found


def _estimate(
    calibration: Calibration | None, scores: Sequence[ScoreHistogram], policy: AccuracyPolicy
) -> tuple[float | None, float | None, float | None, int]:
    """CBPE's estimate, interval and predictions over ``scores``; nothing without them."""
    if calibration is None or not scores:
        return None, None, None, 0
    try:
        merged: ScoreHistogram | None = scores[0]
        for more in scores[1:]:
            merged = merge_scores(merged, more)
        if merged is None:
            return None, None, None, 0
        e = estimate_accuracy(calibration, merged, policy.confidence)
    except ValueError:  # histograms of other classes than the calibration's: none to show
        return None, None, None, 0
    return _finite(e.accuracy), _finite(e.low), _finite(e.high), e.n
