"""Drift and estimated accuracy of the windows devices upload, and their alerts.

A *scope* says whose windows are merged: one device, a cohort (every device
with a tag, a hardware id or a region), or the whole fleet. Within a scope and
a time range the windows are grouped by the model version that served them
(each version counted in its own baseline's bins), merged
(:func:`protocol.window.merge_windows`) and tested feature by feature
(:func:`protocol.drift.detect_drift`) against the baseline in the release's
bundle manifest.

Where the release's bundle carries a calibration, the merged top-score
histograms also give the accuracy CBPE estimates without labels
(:func:`protocol.cbpe.estimate_accuracy`), and where labels arrived
(:mod:`fleet_server.labels`) the accuracy measured on the labelled windows
beside the estimate for those same windows.

Alert rules: one alert per scope and cause, the cause being a model version's
drift or its accuracy. A feature's tests (:data:`protocol.drift.REASONS`) are
``distribution`` (the bins), ``missing-values`` (the share of NaN),
``out-of-range`` (the share outside the valid range) and ``new-range`` (values
beyond the baseline's min or max); the drift alert lists every (feature, test)
that found drift, with its figures:

- ``drift`` adds a test to the list (or refreshes its figures); the first one
  opens the alert. Accuracy: ``below`` (see :class:`protocol.cbpe.AccuracyPolicy`)
  opens the alert or updates it;
- ``no_drift`` on enough data takes a test off the list; the alert closes when
  none is left. Accuracy: ``within`` closes it;
- ``not_enough_data`` (accuracy: also ``uncertain``) changes nothing: too few
  values is no evidence of recovery.

There is never more than one open alert per scope and cause (the ``open_key``
column is unique, so concurrent replicas cannot both open one), and an alert is
updated and closed only while it is still open (so only one replica closes it:
the one that notifies, see :mod:`fleet_server.drift.webhook`).

:func:`evaluate_fleet` evaluates every device, every cohort (tag, hardware id,
region) with windows in range, and each model version fleet-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from fleet_server.db.models import AlertRow, Device, Release, WindowLabels, WindowRow
from protocol.bundle import BundleFormatError, read_manifest
from protocol.cbpe import AccuracyEstimate, AccuracyPolicy, AccuracyVerdict, estimate_accuracy
from protocol.drift import (
    ALPHA_SHARES,
    DriftPolicy,
    DriftReason,
    FeatureDrift,
    count_beyond_baseline,
    detect_drift,
)
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

ScopeKind = Literal["device", "tag", "hardware_id", "region", "fleet"]
AlertChange = Literal["opened", "updated", "closed"]
CohortKind = Literal["tag", "hardware_id", "region"]

# Window ids listed in a result and in an alert's evidence; the count is always exact.
MAX_LISTED_WINDOWS = 1000
# Window ids per IN (...) when looking up labels.
_ID_CHUNK = 500


class DriftError(Exception):
    """Drift cannot be computed for what was asked; the message says why."""


@dataclass(frozen=True)
class Scope:
    """Whose windows: ``kind`` and its value (device id, tag, hardware id, region; "" for fleet)."""

    kind: ScopeKind
    value: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.value else self.kind


@dataclass(frozen=True)
class Labelled:
    """Accuracy measured on the windows with labels, and CBPE's estimate for the same windows."""

    windows: int
    rows: int
    correct: int
    estimated: float | None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.rows if self.rows else None


@dataclass(frozen=True)
class Accuracy:
    """Estimated accuracy of the merged windows, the threshold, and the measured figure."""

    estimate: AccuracyEstimate
    reference: float
    threshold: float
    verdict: AccuracyVerdict
    labelled: Labelled | None = None


@dataclass(frozen=True)
class ModelDrift:
    """The merged windows of one model version in a scope, each feature's drift, its accuracy."""

    model_name: str
    model_version: str
    baseline_id: str
    window_ids: list[str]
    windows: int
    start: datetime
    end: datetime
    requests: int
    policy: DriftPolicy
    summarised_requests: int | None = None
    accuracy_policy: AccuracyPolicy = field(default_factory=AccuracyPolicy)
    features: list[FeatureDrift] = field(default_factory=list)
    accuracy: Accuracy | None = None
    problem: str | None = None


class ManifestCache:
    """Bundle manifests of released versions, read once per (name, version) from the repository."""

    def __init__(self, repository_dir: Path) -> None:
        self.repository_dir = repository_dir
        self._manifests: dict[tuple[str, str], Manifest] = {}

    async def get(self, session: AsyncSession, name: str, version: str) -> Manifest:
        """The manifest of release ``name@version``; :class:`DriftError` if there is none."""
        key = (name, version)
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        release = (
            await session.scalars(
                select(Release).where(Release.name == name, Release.version == version).limit(1)
            )
        ).first()
        if release is None:
            raise DriftError(f"no release {name}@{version} to take the baseline from")
        dirname, _, basename = release.target_path.rpartition("/")
        path = self.repository_dir / "targets" / dirname / f"{release.sha256}.{basename}"
        try:
            manifest = await asyncio.to_thread(_read_manifest_file, path)
        except (OSError, BundleFormatError) as exc:
            raise DriftError(f"cannot read the manifest of {name}@{version}: {exc}") from None
        self._manifests[key] = manifest
        return manifest


def _read_manifest_file(path: Path) -> Manifest:
    with path.open("rb") as source:
        return read_manifest(source)


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def scope_devices(session: AsyncSession, scope: Scope) -> list[str] | None:
    """The device ids of a cohort scope; ``None`` for a device or the fleet (no filter needed)."""
    if scope.kind in ("device", "fleet"):
        return None
    statement = select(Device.id, Device.tags)
    if scope.kind == "hardware_id":
        statement = statement.where(Device.hardware_id == scope.value)
    elif scope.kind == "region":
        statement = statement.where(Device.region == scope.value)
    rows = (await session.execute(statement)).all()
    # Tags are a JSON list: filtered here so SQLite and PostgreSQL behave alike.
    return [r.id for r in rows if scope.kind != "tag" or scope.value in (r.tags or [])]


async def load_windows(
    session: AsyncSession,
    scope: Scope,
    since: datetime,
    until: datetime,
    model_name: str | None = None,
    model_version: str | None = None,
) -> list[WindowRow]:
    """The windows of ``scope`` that ended in ``(since, until]``, oldest first."""
    statement = select(WindowRow).where(WindowRow.end > _utc(since), WindowRow.end <= _utc(until))
    if scope.kind == "device":
        statement = statement.where(WindowRow.device_id == scope.value)
    else:
        devices = await scope_devices(session, scope)
        if devices is not None:
            if not devices:
                return []
            statement = statement.where(WindowRow.device_id.in_(devices))
    if model_name is not None:
        statement = statement.where(WindowRow.model_name == model_name)
    if model_version is not None:
        statement = statement.where(WindowRow.model_version == model_version)
    statement = statement.order_by(WindowRow.end, WindowRow.window_id)
    return list((await session.scalars(statement)).all())


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

    ``decoded`` keeps the windows read from their payloads, by window id, for
    the next call: a pass over many scopes reads each window once.
    """
    policy = policy or DriftPolicy()
    accuracy_policy = accuracy_policy or AccuracyPolicy()
    rows = await load_windows(session, scope, since, until, model_name, model_version)
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
        start=_utc(min(r.start for r in rows)),
        end=_utc(max(r.end for r in rows)),
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
    return windows, aggregate, detect_drift(manifest.baseline, aggregate, policy, names)


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
    labels = await labels_of(session, [w.window_id for w in windows])
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


async def labels_of(session: AsyncSession, window_ids: Sequence[str]) -> dict[str, WindowLabels]:
    """The labels posted for any of ``window_ids``, by window id."""
    found: dict[str, WindowLabels] = {}
    for i in range(0, len(window_ids), _ID_CHUNK):
        chunk = window_ids[i : i + _ID_CHUNK]
        for row in await session.scalars(
            select(WindowLabels).where(WindowLabels.window_id.in_(chunk))
        ):
            found[row.window_id] = row
    return found


# -- alerts ------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _share(count: int, rows: int) -> float | None:
    return count / rows if rows else None


def evidence_of_test(
    feature: FeatureDrift, reason: DriftReason, policy: DriftPolicy
) -> dict[str, Any]:
    """What one test of a feature shows: its verdict, its numbers and its false-alarm rate."""
    found: dict[str, Any] = {
        "reason": reason,
        "verdict": feature.verdicts[reason],
        "n": feature.n,
        "baseline_n": feature.baseline_n,
    }
    if reason == "distribution":
        found |= {
            "psi": feature.psi,
            "js": feature.js,
            "statistic": feature.statistic,
            "df": feature.df,
            "threshold": _finite(feature.threshold),
            "p_value": feature.p_value,
            "psi_threshold": _finite(feature.psi_threshold),
        }
    elif reason == "missing-values":
        rows, baseline_rows = feature.n + feature.nan, feature.baseline_n + feature.baseline_nan
        found |= {
            "nan": feature.nan,
            "rows": rows,
            "share": _share(feature.nan, rows),
            "baseline_nan": feature.baseline_nan,
            "baseline_rows": baseline_rows,
            "baseline_share": _share(feature.baseline_nan, baseline_rows),
            "p_value": feature.missing_p_value,
        }
    elif reason == "out-of-range":
        found |= {
            "out_of_range": feature.out_of_range,
            "share": _share(feature.out_of_range, feature.n),
            "baseline_out_of_range": feature.baseline_out_of_range,
            "baseline_share": _share(feature.baseline_out_of_range, feature.baseline_n),
            "p_value": feature.out_of_range_p_value,
        }
    else:
        found |= {
            "min": feature.min,
            "max": feature.max,
            "baseline_min": feature.baseline_min,
            "baseline_max": feature.baseline_max,
            "below_baseline": feature.below_baseline,
            "above_baseline": feature.above_baseline,
            "p_value": feature.new_range_p_value,
        }
    return found | {"alpha": policy.false_alarm_rate * ALPHA_SHARES[reason]}


def windows_evidence(result: ModelDrift) -> dict[str, Any]:
    """What every alert of ``result`` shows of the merged windows (the first thousand ids)."""
    return {
        "min_n": result.policy.min_n,
        "false_alarm_rate": result.policy.false_alarm_rate,
        "baseline_id": result.baseline_id,
        "windows": result.windows,
        "window_ids": result.window_ids,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
    }


# A drift alert's tests by (feature, reason), each as its feature entry shows it.
_Tests = dict[tuple[int, str], tuple[str | None, dict[str, Any]]]


def drift_evidence(result: ModelDrift, tests: _Tests, verdict: str) -> dict[str, Any]:
    """A drift alert's evidence: ``verdict``, every feature of ``tests`` and the windows."""
    features: dict[int, dict[str, Any]] = {}
    for (index, reason), (name, figures) in sorted(tests.items()):
        entry = features.setdefault(index, {"feature": index, "name": name, "tests": {}})
        entry["tests"][reason] = figures
    return {
        "verdict": verdict,
        "features": [e | {"reasons": sorted(e["tests"])} for _, e in sorted(features.items())],
    } | windows_evidence(result)


def alert_tests(evidence: dict[str, Any]) -> _Tests:
    """The tests a stored drift alert lists, by (feature, reason)."""
    return {
        (int(f["feature"]), reason): (f.get("name"), figures)
        for f in evidence.get("features") or []
        for reason, figures in (f.get("tests") or {}).items()
    }


def accuracy_evidence(result: ModelDrift, accuracy: Accuracy) -> dict[str, Any]:
    """What an accuracy alert shows: the estimate, its interval, the threshold, the windows."""
    e = accuracy.estimate
    labelled = accuracy.labelled
    return {
        "verdict": accuracy.verdict,
        "estimated": e.accuracy,
        "low": e.low,
        "high": e.high,
        "confidence": e.confidence,
        "n": e.n,
        "unseen_share": e.unseen_share,
        "allowance": e.allowance,
        "allowance_measured": e.allowance_measured,
        "assumption": e.assumption,
        "reference": accuracy.reference,
        "threshold": accuracy.threshold,
        "max_drop": result.accuracy_policy.max_drop,
        "min_n": result.accuracy_policy.min_n,
        "measured": labelled.accuracy if labelled else None,
        "labelled_rows": labelled.rows if labelled else 0,
        "baseline_id": result.baseline_id,
        "windows": result.windows,
        "window_ids": result.window_ids,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
    }


AlertCause = Literal["drift", "accuracy"]


def open_key(scope: Scope, model_name: str, model_version: str, cause: AlertCause) -> str:
    """The key no two open alerts share: one per scope and cause (a model version's drift,
    or its accuracy). Accuracy alerts keep the key they had before drift alerts were grouped."""
    return f"{cause}|{scope}|{model_name}@{model_version}"


_ACTIONS: Final[dict[str, Literal["open", "close"]]] = {
    "drift": "open",
    "below": "open",
    "no_drift": "close",
    "within": "close",
}


def drift_tests(result: ModelDrift, current: _Tests) -> tuple[_Tests, _Tests]:
    """The tests a drift alert lists after ``result``, and those that cleared.

    A test that found drift is (re)listed with its new figures; one that found
    none on enough data is dropped (and returned as cleared, with those
    figures); one without enough data keeps what it had: too few values is no
    evidence either way.
    """
    tests = dict(current)
    cleared: _Tests = {}
    for f in result.features:
        for reason, verdict in f.verdicts.items():
            action = _ACTIONS.get(verdict)
            key = (f.feature, reason)
            if action == "open":
                tests[key] = (f.name, evidence_of_test(f, reason, result.policy))
            elif action == "close" and key in tests:
                del tests[key]
                cleared[key] = (f.name, evidence_of_test(f, reason, result.policy))
    return tests, cleared


async def _open(
    session: AsyncSession,
    scope: Scope,
    result: ModelDrift,
    cause: AlertCause,
    key: str,
    evidence: dict[str, Any],
    now: datetime,
) -> AlertRow | None:
    """A new open alert, or ``None`` when another replica has just opened it."""
    row = AlertRow(
        kind=cause,
        scope=scope.kind,
        scope_value=scope.value,
        model_name=result.model_name,
        model_version=result.model_version,
        state="open",
        open_key=key,
        opened_at=now,
        last_seen_at=now,
        evidence=evidence,
    )
    # A savepoint: another replica opening the same alert is not an error.
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return None
    return row


async def _still_open(
    session: AsyncSession, row: AlertRow, key: str, values: dict[str, Any]
) -> bool:
    """Write ``values`` to ``row`` if it is still open under ``key``; whether it was.

    Conditional, so that when two replicas close the same alert only one of
    them does (and notifies), and a replica never writes over a closed one.
    """
    result = await session.execute(
        update(AlertRow)
        .where(AlertRow.id == row.id, AlertRow.open_key == key)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    for name, value in values.items():
        set_committed_value(row, name, value)
    return True


async def evaluate_alerts(
    session: AsyncSession,
    scope: Scope,
    results: Sequence[ModelDrift],
    open_alerts: dict[str, AlertRow],
    now: datetime | None = None,
) -> list[tuple[AlertChange, AlertRow]]:
    """Open, update or close the alerts of ``scope`` by ``results``.

    One drift alert per model version, open while any test of any feature
    finds drift (see :func:`drift_tests`), and one accuracy alert per model
    version (``below`` opens, ``within`` closes, ``uncertain`` changes
    nothing). ``open_alerts`` is every open alert by its ``open_key``
    (:func:`load_open_alerts`); it is kept up to date.
    """
    now = now or datetime.now(UTC)
    changes: list[tuple[AlertChange, AlertRow]] = []
    for result in results:
        if result.problem is not None:
            continue
        # -- drift: one alert listing every drifting feature
        key = open_key(scope, result.model_name, result.model_version, "drift")
        current = open_alerts.get(key)
        before = alert_tests(current.evidence or {}) if current is not None else {}
        tests, cleared = drift_tests(result, before)
        if current is None:
            if tests:
                row = await _open(
                    session,
                    scope,
                    result,
                    "drift",
                    key,
                    drift_evidence(result, tests, "drift"),
                    now,
                )
                if row is not None:
                    open_alerts[key] = row
                    changes.append(("opened", row))
        elif tests:
            if await _still_open(
                session,
                current,
                key,
                {"last_seen_at": now, "evidence": drift_evidence(result, tests, "drift")},
            ):
                changes.append(("updated", current))
            else:
                del open_alerts[key]
        else:
            del open_alerts[key]
            values = {
                "state": "closed",
                "open_key": None,
                "closed_at": now,
                "evidence": drift_evidence(result, cleared, "no_drift"),
            }
            if await _still_open(session, current, key, values):
                changes.append(("closed", current))
        # -- accuracy: one alert per model version
        accuracy = result.accuracy
        action = _ACTIONS.get(accuracy.verdict) if accuracy is not None else None
        if accuracy is None or action is None:
            continue
        key = open_key(scope, result.model_name, result.model_version, "accuracy")
        current = open_alerts.get(key)
        found = accuracy_evidence(result, accuracy)
        if action == "open" and current is None:
            row = await _open(session, scope, result, "accuracy", key, found, now)
            if row is not None:
                open_alerts[key] = row
                changes.append(("opened", row))
        elif action == "open" and current is not None:
            if await _still_open(session, current, key, {"last_seen_at": now, "evidence": found}):
                changes.append(("updated", current))
            else:
                del open_alerts[key]
        elif current is not None:
            del open_alerts[key]
            values = {"state": "closed", "open_key": None, "closed_at": now, "evidence": found}
            if await _still_open(session, current, key, values):
                changes.append(("closed", current))
    await session.flush()
    return changes


async def load_open_alerts(session: AsyncSession) -> dict[str, AlertRow]:
    """Every open alert, by its ``open_key``."""
    rows = await session.scalars(select(AlertRow).where(AlertRow.open_key.is_not(None)))
    return {row.open_key: row for row in rows if row.open_key is not None}


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


async def cohorts_with_windows(
    session: AsyncSession, since: datetime, until: datetime
) -> list[Scope]:
    """Every tag, hardware id and region of a device that has windows in ``(since, until]``."""
    active = (
        select(WindowRow.device_id)
        .where(WindowRow.end > _utc(since), WindowRow.end <= _utc(until))
        .distinct()
    )
    rows = (
        await session.execute(
            select(Device.tags, Device.hardware_id, Device.region).where(Device.id.in_(active))
        )
    ).all()
    scopes: set[Scope] = set()
    for tags, hardware_id, region in rows:
        scopes.update(Scope("tag", t) for t in tags or [])
        if hardware_id:
            scopes.add(Scope("hardware_id", hardware_id))
        if region:
            scopes.add(Scope("region", region))
    return sorted(scopes, key=lambda sc: (sc.kind, sc.value))


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
    window_range = (WindowRow.end > _utc(since), WindowRow.end <= _utc(until))
    devices = (
        await session.scalars(select(WindowRow.device_id).where(*window_range).distinct())
    ).all()
    versions = (
        await session.execute(
            select(WindowRow.model_name, WindowRow.model_version).where(*window_range).distinct()
        )
    ).all()
    # One pass reads each window's payload once and the open alerts once.
    decoded: dict[str, WindowSummary] = {}
    open_alerts = await load_open_alerts(session)
    policies: dict[str, Any] = {
        "policy": policy,
        "accuracy_policy": accuracy_policy,
        "decoded": decoded,
    }
    changes = []
    scopes = [Scope("device", d) for d in sorted(devices)]
    scopes += await cohorts_with_windows(session, since, until)
    for scope in scopes:
        results = await drift_of(session, manifests, scope, since, until, **policies)
        changes += await evaluate_alerts(session, scope, results, open_alerts, until)
    fleet = Scope("fleet")
    fleet_results: list[ModelDrift] = []
    for name, version in sorted(versions):
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


async def update_gauges(
    session: AsyncSession, metrics: Metrics, fleet: Sequence[ModelDrift] | None = None
) -> None:
    """Set the alert gauges from the database, so every replica reports the whole fleet.

    ``fleet``, the latest fleet-wide results, sets the accuracy gauges.
    """
    open_by_kind = dict(
        (
            await session.execute(
                select(AlertRow.kind, func.count())
                .where(AlertRow.state == "open")
                .group_by(AlertRow.kind)
            )
        ).all()
    )
    metrics.drift_alerts_open.set(open_by_kind.get("drift", 0))
    metrics.accuracy_alerts_open.set(open_by_kind.get("accuracy", 0))
    fleet_alerts = await session.scalars(
        select(AlertRow).where(
            AlertRow.state == "open", AlertRow.scope == "fleet", AlertRow.kind == "drift"
        )
    )
    drifting: dict[tuple[str, str], set[int]] = defaultdict(set)
    for row in fleet_alerts:
        features = drifting[(row.model_name, row.model_version)]
        if row.feature is not None:  # stored before alerts were grouped
            features.add(row.feature)
        features.update(index for index, _ in alert_tests(row.evidence or {}))
    metrics.drift_features_drifting.clear()
    for (name, version), features in drifting.items():
        metrics.drift_features_drifting.labels(name, version).set(len(features))
    if fleet is None:
        return
    metrics.estimated_accuracy.clear()
    metrics.measured_accuracy.clear()
    for result in fleet:
        accuracy = result.accuracy
        if accuracy is None:
            continue
        labels = (result.model_name, result.model_version)
        if accuracy.estimate.accuracy is not None:
            metrics.estimated_accuracy.labels(*labels).set(accuracy.estimate.accuracy)
        if accuracy.labelled is not None and accuracy.labelled.accuracy is not None:
            metrics.measured_accuracy.labels(*labels).set(accuracy.labelled.accuracy)


def _log_change(change: AlertChange, row: AlertRow, suppressed: bool) -> None:
    log.info(
        "%s alert %s %s: %s %s@%s%s%s",
        row.kind,
        row.id,
        change,
        f"{row.scope}:{row.scope_value}" if row.scope_value else row.scope,
        row.model_name,
        row.model_version,
        f", features {describe_features(row)}" if row.kind == "drift" else "",
        " (acknowledged or silenced: not notified)" if suppressed else "",
    )


async def run_drift_alerts(
    db: Database,
    metrics: Metrics,
    manifests: ManifestCache,
    stop: asyncio.Event,
    interval_s: float,
    trailing_s: float,
    accuracy_policy: AccuracyPolicy | None = None,
    notify: Callable[[AlertChange, AlertRow], None] | None = None,
) -> None:
    """Every ``interval_s``, update the alerts over the trailing ``trailing_s``, until ``stop``.

    One log line per alert opened or closed; ``notify`` is called, after the
    commit, for each of those that is neither acknowledged nor silenced.
    """
    while not stop.is_set():
        try:
            await evaluate_once(db, metrics, manifests, trailing_s, accuracy_policy, notify)
        except Exception:
            log.exception("drift alert evaluation failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def evaluate_once(
    db: Database,
    metrics: Metrics,
    manifests: ManifestCache,
    trailing_s: float,
    accuracy_policy: AccuracyPolicy | None = None,
    notify: Callable[[AlertChange, AlertRow], None] | None = None,
    until: datetime | None = None,
) -> Evaluation:
    """One pass of :func:`run_drift_alerts`: evaluate, commit, log, notify."""
    from fleet_server.drift.silences import active_silences, suppressed

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
        if notify is not None and not quiet[id(row)]:
            notify(change, row)
    return evaluation
