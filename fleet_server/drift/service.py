"""Drift and estimated accuracy of the windows devices upload, and their alerts.

A *scope* says whose windows are merged: one device, a cohort (every device
with a tag, a hardware id or a region), or the whole fleet. Within a scope and
a time range the windows are grouped by the model version that served them
(each version counted in its own baseline's bins), merged
(:func:`protocol.window.merge_windows`) and tested feature by feature
(:func:`protocol.drift.detect.detect_drift`) against the baseline in the release's
bundle manifest. The policy's false-alarm rate is the family's, one scope and
model version, split over its features (:mod:`fleet_server.drift.family`):
an undrifted cohort opens a drift alert at most that often, however many
features its model reads, and a drifted one opens one alert listing them.

Where the release's bundle carries a calibration, the merged top-score
histograms also give the accuracy CBPE estimates without labels
(:func:`protocol.cbpe.estimate_accuracy`), and where labels arrived
(:mod:`fleet_server.labels`) the accuracy measured on the labelled windows
beside the estimate for those same windows.

The alerts follow :mod:`fleet_server.drift.lifecycle`, written through
:mod:`fleet_server.drift.store`. There is never more than one open alert per
scope and cause (the ``open_key`` column is unique, so concurrent replicas
cannot both open one), and an alert is updated and closed only while it is
still open (so only one replica closes it: the one that notifies, see
:mod:`fleet_server.drift.webhook`).

:func:`evaluate_fleet` evaluates every device, every cohort (tag, hardware id,
region) with windows in range, and each model version fleet-wide.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import AlertRow, SilenceRow, WindowRow, as_utc
from fleet_server.devices import store as registry
from fleet_server.drift import store
from fleet_server.drift.family import decide_tails, feature_policy
from fleet_server.drift.lifecycle import AlertChange, decide, notified, suppressed
from fleet_server.drift.metrics import update_gauges
from fleet_server.drift.models import (
    MAX_LISTED_WINDOWS,
    Accuracy,
    DriftError,
    Labelled,
    ModelDrift,
    Scope,
)
from fleet_server.drift.silences import active_silences
from fleet_server.drift.store import ManifestCache
from protocol.api.drift import AlertQuery
from protocol.api.windows import WindowQuery
from protocol.cbpe import AccuracyPolicy, estimate_accuracy
from protocol.drift.detect import detect_drift
from protocol.drift.model import DriftPolicy, FeatureDrift
from protocol.drift.windows import count_beyond_baseline
from protocol.manifest import Manifest
from protocol.summary import ScoreHistogram
from protocol.window import (
    WindowAggregate,
    WindowCodecError,
    WindowMergeError,
    WindowSummary,
    decode_window,
    merge_scores,
    merge_windows,
)

if TYPE_CHECKING:
    from fleet_server.db import Database
    from fleet_server.metrics import Metrics

log = logging.getLogger(__name__)


async def drift_of(
    session: AsyncSession,
    manifests: ManifestCache,
    scope: Scope,
    since: datetime,
    until: datetime,
    *,
    model_name: str | None = None,
    model_version: str | None = None,
    policy: DriftPolicy | None = None,
    accuracy_policy: AccuracyPolicy | None = None,
    decoded: dict[str, WindowSummary] | None = None,
) -> list[ModelDrift]:
    """Drift and accuracy per model version of the windows of ``scope`` in ``(since, until]``.

    ``policy``'s false-alarm rate is per scope and model version, each feature
    tested at its share (:mod:`fleet_server.drift.family`).

    ``decoded`` keeps the windows read from their payloads, by window id, for
    the next call: a pass over many scopes reads each window once.
    """
    policy = policy or DriftPolicy()
    accuracy_policy = accuracy_policy or AccuracyPolicy()
    rows = await store.load_windows(session, scope, since, until, model_name, model_version)
    groups: dict[tuple[str, str, str], list[WindowRow]] = defaultdict(list)
    for row in rows:
        groups[(row.model_name, row.model_version, row.baseline_id)].append(row)
    results = []
    for (name, version, baseline_id), members in sorted(groups.items()):
        results.append(
            await _group_drift(
                session,
                manifests,
                name,
                version,
                baseline_id,
                members,
                policy,
                accuracy_policy,
                decoded if decoded is not None else {},
            )
        )
    return results


async def _group_drift(
    session: AsyncSession,
    manifests: ManifestCache,
    name: str,
    version: str,
    baseline_id: str,
    rows: Sequence[WindowRow],
    policy: DriftPolicy,
    accuracy_policy: AccuracyPolicy,
    decoded: dict[str, WindowSummary],
) -> ModelDrift:
    result = ModelDrift(
        model_name=name,
        model_version=version,
        baseline_id=baseline_id,
        window_ids=[r.window_id for r in rows[:MAX_LISTED_WINDOWS]],
        windows=len(rows),
        start=as_utc(min(r.start for r in rows)),
        end=as_utc(max(r.end for r in rows)),
        requests=sum(r.requests for r in rows),
        policy=policy,
        accuracy_policy=accuracy_policy,
    )
    try:
        manifest = await manifests.get(session, name, version)
        if manifest.baseline.id != baseline_id:
            raise DriftError(
                f"the windows counted in baseline {baseline_id}, "
                f"but {name}@{version} ships baseline {manifest.baseline.id}"
            )
        # Decoding, merging and testing are CPU work: in a thread, so the event
        # loop keeps ingesting and answering while a large scope is computed.
        windows, aggregate, features = await asyncio.to_thread(
            _test_windows, manifest, [(r.window_id, r.payload) for r in rows], policy, decoded
        )
        accuracy = await _accuracy(session, manifest, windows, aggregate.scores, accuracy_policy)
    except (DriftError, WindowCodecError, WindowMergeError, ValueError) as exc:
        return replace(result, problem=str(exc))
    return replace(
        result,
        features=features,
        accuracy=accuracy,
        summarised_requests=aggregate.summarised_requests,
    )


def _test_windows(
    manifest: Manifest,
    payloads: Sequence[tuple[str, bytes]],
    policy: DriftPolicy,
    decoded: dict[str, WindowSummary],
) -> tuple[list[WindowSummary], WindowAggregate, list[FeatureDrift]]:
    """The windows of ``payloads`` (read once, kept in ``decoded``), their sum, and its drift."""
    windows = []
    for window_id, payload in payloads:
        window = decoded.get(window_id)
        if window is None:
            window = decoded[window_id] = decode_window(payload)
        windows.append(window)
    # Windows that left out their counts beyond the baseline's range (nothing was
    # beyond it) get them from their range, so the aggregate keeps everyone's counts.
    aggregate = merge_windows(count_beyond_baseline(manifest.baseline, w) for w in windows)
    names = [f.name for f in manifest.features]
    tested = feature_policy(policy, len(names))
    features = detect_drift(manifest.baseline, aggregate, tested, names)
    return windows, aggregate, decide_tails(features, tested)


async def _accuracy(
    session: AsyncSession,
    manifest: Manifest,
    windows: Sequence[WindowSummary],
    scores: ScoreHistogram | None,
    policy: AccuracyPolicy,
) -> Accuracy | None:
    """CBPE's estimate over ``windows``, and the measured accuracy of those with labels."""
    calibration = manifest.baseline.calibration
    if calibration is None or scores is None:
        return None
    estimate = estimate_accuracy(calibration, scores, policy.confidence)
    threshold = policy.threshold(calibration)
    labels = await store.labels_of(session, [w.window_id for w in windows])
    labelled = None
    if labels:
        # Labels were checked against the window's classes when posted.
        usable = [w for w in windows if w.window_id in labels and w.scores is not None]
        marked = [labels[w.window_id] for w in usable]
        subset = functools.reduce(merge_scores, [w.scores for w in usable]) if usable else None
        labelled = Labelled(
            windows=len(marked),
            rows=sum(m.rows for m in marked),
            correct=sum(m.correct for m in marked),
            estimated=(
                estimate_accuracy(calibration, subset, policy.confidence).accuracy
                if subset is not None
                else None
            ),
        )
    return Accuracy(
        estimate=estimate,
        reference=calibration.reference_accuracy,
        threshold=threshold,
        verdict=policy.verdict(estimate, threshold),
        labelled=labelled,
    )


async def drift_report(
    session: AsyncSession,
    manifests: ManifestCache,
    scope: Scope,
    since: datetime,
    until: datetime,
    model_name: str | None = None,
    model_version: str | None = None,
) -> list[ModelDrift]:
    """:func:`drift_of` for an operator's query; :class:`DriftError` if it names an unknown
    cohort, model or version, a registry error if an unknown device."""
    await check_report_filter(session, scope, model_name, model_version)
    return await drift_of(
        session,
        manifests,
        scope,
        since,
        until,
        model_name=model_name,
        model_version=model_version,
    )


async def check_report_filter(
    session: AsyncSession, scope: Scope, model_name: str | None, model_version: str | None
) -> None:
    """Refuse a query that names an unknown cohort, model or version (:class:`DriftError`)
    or an unknown device (a registry error)."""
    if scope.kind == "device":
        await registry.get_device(session, scope.value)
    unknown = await store.unknown_filter(session, scope, model_name, model_version)
    if unknown is not None:
        raise DriftError(unknown)


async def find_alerts(
    session: AsyncSession, q: AlertQuery
) -> tuple[list[AlertRow], list[SilenceRow]]:
    """The alerts ``q`` asks for, newest first, and the active silences."""
    silences = await active_silences(session)
    return await store.find_alerts(session, q, silences), silences


async def open_alerts(session: AsyncSession) -> list[AlertRow]:
    """Every open alert."""
    return await store.open_alerts(session)


async def device_windows(
    session: AsyncSession, device_id: str, q: WindowQuery, before: tuple[datetime, str] | None
) -> tuple[str, list[Any], bool]:
    """A page of a device's windows (see :func:`store.window_page`): its id, the rows, and
    whether more follow. An unknown device is a registry error."""
    device = await registry.get_device(session, device_id)
    rows = await store.window_page(session, device.id, q, before)
    return device.id, rows[: q.limit], len(rows) > q.limit


async def evaluate_alerts(
    session: AsyncSession,
    scope: Scope,
    results: Sequence[ModelDrift],
    open_alerts: dict[str, AlertRow],
    now: datetime | None = None,
) -> list[tuple[AlertChange, AlertRow]]:
    """Open, update or close the alerts of ``scope`` as :func:`lifecycle.decide` says.

    ``open_alerts`` is every open alert by its ``open_key``
    (:func:`store.load_open_alerts`); it is kept up to date. A change another
    replica made first (it opened the alert, or closed it) is left out.
    """
    now = now or datetime.now(UTC)
    changes: list[tuple[AlertChange, AlertRow]] = []
    evidence = {key: row.evidence or {} for key, row in open_alerts.items()}
    for decision in decide(scope, results, evidence):
        key = decision.key
        if decision.change == "opened":
            row = await store.open_alert(session, scope, decision, now)
            if row is not None:
                open_alerts[key] = row
                changes.append(("opened", row))
            continue
        current = open_alerts.pop(key, None)
        if current is None:
            continue
        values: dict[str, Any] = {"evidence": decision.evidence}
        if decision.change == "closed":
            values |= {"state": "closed", "open_key": None, "closed_at": now}
        else:
            values["last_seen_at"] = now
        if await store.still_open(session, current, key, values):
            if decision.change == "updated":
                open_alerts[key] = current
            changes.append((decision.change, current))
    await session.flush()
    return changes


def describe_features(row: AlertRow, most: int = 5) -> str:
    """The features of a drift alert in one phrase: ``shaft_rpm (distribution, new-range)``."""
    if row.feature is not None:  # stored before alerts were grouped
        return f"{row.feature_name or row.feature} ({row.reason or 'distribution'})"
    parts = [
        f"{f.get('name') or f.get('feature')} ({', '.join(f.get('reasons') or [])})"
        for f in (row.evidence or {}).get("features") or []
    ]
    more = f" and {len(parts) - most} more" if len(parts) > most else ""
    return ", ".join(parts[:most]) + more


@dataclass(frozen=True)
class Evaluation:
    """What one pass over the fleet changed, and its fleet-wide results per model version."""

    changes: list[tuple[AlertChange, AlertRow]]
    fleet: list[ModelDrift]


async def evaluate_fleet(
    session: AsyncSession,
    manifests: ManifestCache,
    until: datetime,
    trailing: timedelta,
    policy: DriftPolicy | None = None,
    accuracy_policy: AccuracyPolicy | None = None,
) -> Evaluation:
    """Update the alerts of every device, cohort and model version fleet-wide, over ``trailing``."""
    since = until - trailing
    devices = await store.devices_with_windows(session, since, until)
    versions = await store.versions_with_windows(session, since, until)
    # One pass reads each window's payload once and the open alerts once.
    decoded: dict[str, WindowSummary] = {}
    open_alerts = await store.load_open_alerts(session)
    policies: dict[str, Any] = {
        "policy": policy,
        "accuracy_policy": accuracy_policy,
        "decoded": decoded,
    }
    changes = []
    scopes = [Scope("device", d) for d in devices]
    scopes += await store.cohorts_with_windows(session, since, until)
    for scope in scopes:
        results = await drift_of(session, manifests, scope, since, until, **policies)
        changes += await evaluate_alerts(session, scope, results, open_alerts, until)
    fleet = Scope("fleet")
    fleet_results: list[ModelDrift] = []
    for name, version in versions:
        results = await drift_of(
            session,
            manifests,
            fleet,
            since,
            until,
            model_name=name,
            model_version=version,
            **policies,
        )
        changes += await evaluate_alerts(session, fleet, results, open_alerts, until)
        fleet_results += results
    return Evaluation(changes, fleet_results)


def _log_change(change: AlertChange, row: AlertRow, quiet: bool) -> None:
    log.info(
        "%s alert %s %s: %s %s@%s%s%s",
        row.kind,
        row.id,
        change,
        f"{row.scope}:{row.scope_value}" if row.scope_value else row.scope,
        row.model_name,
        row.model_version,
        f", features {describe_features(row)}" if row.kind == "drift" else "",
        " (acknowledged or silenced: not notified)" if quiet else "",
    )


async def evaluate_once(
    db: Database,
    metrics: Metrics,
    manifests: ManifestCache,
    trailing_s: float,
    accuracy_policy: AccuracyPolicy | None = None,
    notify: Callable[[AlertChange, AlertRow], None] | None = None,
    until: datetime | None = None,
) -> Evaluation:
    """One pass of the drift alert job: evaluate, commit, log, notify.

    One log line per alert opened or closed; ``notify`` is called, after the
    commit, for each of those that is neither acknowledged nor silenced.
    """
    now = until or datetime.now(UTC)
    async with db.session() as session:
        evaluation = await evaluate_fleet(
            session, manifests, now, timedelta(seconds=trailing_s), accuracy_policy=accuracy_policy
        )
        await update_gauges(session, metrics, evaluation.fleet)
        silences = await active_silences(session, datetime.now(UTC))
        quiet = {id(row): suppressed(row, silences) for _, row in evaluation.changes}
    for change, row in evaluation.changes:
        if change == "updated":
            continue
        _log_change(change, row, quiet[id(row)])
        if notify is not None and notified(change, quiet[id(row)]):
            notify(change, row)
    return evaluation
