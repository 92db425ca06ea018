"""Drift of the windows devices upload, tested against each release's baseline, and its alerts.

A *scope* says whose windows are merged: one device, a cohort (every device
with a tag, a hardware id or a region), or the whole fleet. Within a scope and
a time range the windows are grouped by the model version that served them
(each version counted in its own baseline's bins), merged
(:func:`protocol.window.merge_windows`) and tested feature by feature
(:func:`protocol.drift.detect_drift`) against the baseline in the release's
bundle manifest.

Alert rules, per (scope, model version, feature):

- ``drift`` opens an alert, or — if one is open — updates its evidence and
  ``last_seen_at``; there is never more than one open alert per key (the
  ``open_key`` column is unique, so concurrent replicas cannot both open one);
- ``no_drift`` closes the open alert;
- ``not_enough_data`` changes nothing: too few values is no evidence of recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import AlertRow, Device, Release, WindowRow
from protocol.bundle import BundleFormatError, read_manifest
from protocol.drift import DriftPolicy, FeatureDrift, detect_drift
from protocol.manifest import Manifest
from protocol.window import WindowCodecError, WindowMergeError, decode_window, merge_windows

if TYPE_CHECKING:
    from fleet_server.db import Database
    from fleet_server.metrics import Metrics

log = logging.getLogger(__name__)

ScopeKind = Literal["device", "tag", "hardware_id", "region", "fleet"]
AlertChange = Literal["opened", "updated", "closed"]

# Window ids listed in a result and in an alert's evidence; the count is always exact.
MAX_LISTED_WINDOWS = 1000


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
class ModelDrift:
    """The merged windows of one model version in a scope, and each feature's drift."""

    model_name: str
    model_version: str
    baseline_id: str
    window_ids: list[str]
    windows: int
    start: datetime
    end: datetime
    requests: int
    policy: DriftPolicy
    features: list[FeatureDrift] = field(default_factory=list)
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
) -> list[ModelDrift]:
    """Drift per model version of the windows of ``scope`` that ended in ``(since, until]``."""
    policy = policy or DriftPolicy()
    rows = await load_windows(session, scope, since, until, model_name, model_version)
    groups: dict[tuple[str, str, str], list[WindowRow]] = defaultdict(list)
    for row in rows:
        groups[(row.model_name, row.model_version, row.baseline_id)].append(row)
    results = []
    for (name, version, baseline_id), members in sorted(groups.items()):
        results.append(
            await _group_drift(session, manifests, name, version, baseline_id, members, policy)
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
    )
    try:
        manifest = await manifests.get(session, name, version)
        if manifest.baseline.id != baseline_id:
            raise DriftError(
                f"the windows counted in baseline {baseline_id}, "
                f"but {name}@{version} ships baseline {manifest.baseline.id}"
            )
        aggregate = merge_windows(decode_window(r.payload) for r in rows)
        names = [f.name for f in manifest.features]
        features = detect_drift(manifest.baseline, aggregate, policy, names)
    except (DriftError, WindowCodecError, WindowMergeError, ValueError) as exc:
        return replace(result, problem=str(exc))
    return replace(result, features=features)


# -- alerts ------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evidence(result: ModelDrift, feature: FeatureDrift) -> dict[str, Any]:
    """What an alert shows: the test's numbers, its thresholds and the windows it merged."""
    return {
        "verdict": feature.verdict,
        "n": feature.n,
        "baseline_n": feature.baseline_n,
        "psi": feature.psi,
        "js": feature.js,
        "statistic": feature.statistic,
        "df": feature.df,
        "threshold": _finite(feature.threshold),
        "p_value": feature.p_value,
        "psi_threshold": _finite(feature.psi_threshold),
        "min_n": result.policy.min_n,
        "false_alarm_rate": result.policy.false_alarm_rate,
        "baseline_id": result.baseline_id,
        "windows": result.windows,
        "window_ids": result.window_ids,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
    }


def open_key(scope: Scope, model_name: str, model_version: str, feature: int) -> str:
    """The key no two open alerts share."""
    return f"drift|{scope}|{model_name}@{model_version}|{feature}"


async def evaluate_alerts(
    session: AsyncSession,
    scope: Scope,
    results: Sequence[ModelDrift],
    now: datetime | None = None,
) -> list[tuple[AlertChange, AlertRow]]:
    """Open, update or close the drift alerts of ``scope`` by ``results`` (see the module rules)."""
    now = now or datetime.now(UTC)
    changes: list[tuple[AlertChange, AlertRow]] = []
    for result in results:
        for feature in result.features:
            key = open_key(scope, result.model_name, result.model_version, feature.feature)
            current = (
                await session.scalars(select(AlertRow).where(AlertRow.open_key == key))
            ).first()
            if feature.verdict == "drift":
                if current is None:
                    row = AlertRow(
                        kind="drift",
                        scope=scope.kind,
                        scope_value=scope.value,
                        model_name=result.model_name,
                        model_version=result.model_version,
                        feature=feature.feature,
                        feature_name=feature.name,
                        state="open",
                        open_key=key,
                        opened_at=now,
                        last_seen_at=now,
                        evidence=evidence(result, feature),
                    )
                    # A savepoint: another replica opening the same alert is not an error.
                    try:
                        async with session.begin_nested():
                            session.add(row)
                    except IntegrityError:
                        continue
                    changes.append(("opened", row))
                else:
                    current.last_seen_at = now
                    current.evidence = evidence(result, feature)
                    changes.append(("updated", current))
            elif feature.verdict == "no_drift" and current is not None:
                current.state = "closed"
                current.open_key = None
                current.closed_at = now
                current.evidence = evidence(result, feature)
                changes.append(("closed", current))
    await session.flush()
    return changes


async def evaluate_fleet(
    session: AsyncSession,
    manifests: ManifestCache,
    until: datetime,
    trailing: timedelta,
    policy: DriftPolicy | None = None,
) -> list[tuple[AlertChange, AlertRow]]:
    """Update the alerts of every device and of each model version fleet-wide, over ``trailing``."""
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
    changes = []
    for device_id in sorted(devices):
        scope = Scope("device", device_id)
        results = await drift_of(session, manifests, scope, since, until, policy=policy)
        changes += await evaluate_alerts(session, scope, results, until)
    fleet = Scope("fleet")
    for name, version in sorted(versions):
        results = await drift_of(
            session,
            manifests,
            fleet,
            since,
            until,
            model_name=name,
            model_version=version,
            policy=policy,
        )
        changes += await evaluate_alerts(session, fleet, results, until)
    return changes


async def update_gauges(session: AsyncSession, metrics: Metrics) -> None:
    """Set the alert gauges from the database, so every replica reports the whole fleet."""
    open_total = await session.scalar(
        select(func.count()).select_from(AlertRow).where(AlertRow.state == "open")
    )
    metrics.drift_alerts_open.set(open_total or 0)
    drifting = (
        await session.execute(
            select(AlertRow.model_name, AlertRow.model_version, func.count())
            .where(AlertRow.state == "open", AlertRow.scope == "fleet")
            .group_by(AlertRow.model_name, AlertRow.model_version)
        )
    ).all()
    metrics.drift_features_drifting.clear()
    for name, version, count in drifting:
        metrics.drift_features_drifting.labels(name, version).set(count)


async def run_drift_alerts(
    db: Database,
    metrics: Metrics,
    manifests: ManifestCache,
    stop: asyncio.Event,
    interval_s: float,
    trailing_s: float,
) -> None:
    """Every ``interval_s``, update the alerts over the trailing ``trailing_s``, until ``stop``."""
    while not stop.is_set():
        try:
            async with db.session() as session:
                changes = await evaluate_fleet(
                    session, manifests, datetime.now(UTC), timedelta(seconds=trailing_s)
                )
                await update_gauges(session, metrics)
            for change, row in changes:
                if change != "updated":
                    log.info(
                        "drift alert %s %s: %s:%s %s@%s feature %s",
                        row.id,
                        change,
                        row.scope,
                        row.scope_value,
                        row.model_name,
                        row.model_version,
                        row.feature_name or row.feature,
                    )
        except Exception:
            log.exception("drift alert evaluation failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
