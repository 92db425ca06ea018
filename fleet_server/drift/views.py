"""Drift, alerts and silences as the API shows them (and the webhook sends them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleet_server.db.models import AlertRow, SilenceRow, as_utc
from fleet_server.drift.lifecycle import is_active, matches, silenced_by
from fleet_server.drift.models import Accuracy, ModelDrift
from fleet_server.stored_json import finite_or_none
from protocol.api.drift import (
    AccuracyView,
    AlertAcknowledgement,
    AlertFeature,
    AlertView,
    FeatureDriftView,
    LabelledAccuracy,
    ModelDriftView,
    SilenceView,
)
from protocol.drift.model import FeatureDrift


def alert_features(a: AlertRow) -> list[AlertFeature]:
    """A drift alert's features; an alert stored per feature and test shows its one."""
    if a.kind != "drift":
        return []
    evidence = a.evidence or {}
    if a.feature is not None:
        reason = a.reason or "distribution"
        return [
            AlertFeature(
                feature=a.feature,
                name=a.feature_name,
                reasons=[reason],  # type: ignore[list-item]  # written only from DriftReason
                tests={reason: evidence},
            )
        ]
    features = []
    for f in evidence.get("features") or []:
        tests: dict[Any, dict[str, Any]] = f.get("tests") or {}  # keys written from DriftReason
        features.append(
            AlertFeature(
                feature=f["feature"], name=f.get("name"), reasons=sorted(tests), tests=tests
            )
        )
    return features


def alert_view(a: AlertRow, silences: Sequence[SilenceRow] = ()) -> AlertView:
    """``a`` as the API shows it; ``silences``, the active ones, say what silences it."""
    return AlertView(
        id=a.id,
        kind=a.kind,  # type: ignore[arg-type]  # written only as "drift" or "accuracy"
        scope=a.scope,  # type: ignore[arg-type]  # written only from ScopeKind
        scope_value=a.scope_value,
        model=a.model_name,
        version=a.model_version,
        features=alert_features(a),
        feature=a.feature,
        feature_name=a.feature_name,
        reason=a.reason,  # type: ignore[arg-type]  # written only from DriftReason
        state=a.state,  # type: ignore[arg-type]  # "open" or "closed"
        opened_at=as_utc(a.opened_at),
        last_seen_at=as_utc(a.last_seen_at),
        closed_at=as_utc(a.closed_at) if a.closed_at is not None else None,
        acknowledged=(
            AlertAcknowledgement(
                at=as_utc(a.acknowledged_at),
                by=a.acknowledged_by or "",
                comment=a.acknowledge_comment,
            )
            if a.acknowledged_at is not None
            else None
        ),
        silenced_by=silenced_by(a, silences) if a.state == "open" else [],
        evidence=a.evidence or {},
    )


def silence_view(s: SilenceRow, open_alerts: Sequence[AlertRow], now: datetime) -> SilenceView:
    """``s`` as the API shows it, with how many of ``open_alerts`` it matches."""
    return SilenceView(
        id=s.id,
        kind=s.kind,  # type: ignore[arg-type]  # written only from AlertKind
        scope=s.scope,  # type: ignore[arg-type]  # written only from ScopeKind
        scope_value=s.scope_value,
        model=s.model_name,
        version=s.model_version,
        alert_id=s.alert_id,
        reason=s.reason,
        created_by=s.created_by,
        created_at=as_utc(s.created_at),
        starts_at=as_utc(s.starts_at),
        ends_at=as_utc(s.ends_at),
        expired_by=s.expired_by,
        active=is_active(s, now),
        matching=sum(1 for a in open_alerts if matches(s, a)),
    )


def model_drift_view(m: ModelDrift) -> ModelDriftView:
    """``m`` as the API shows it."""
    return ModelDriftView(
        model=m.model_name,
        version=m.model_version,
        baseline_id=m.baseline_id,
        windows=m.windows,
        window_ids=m.window_ids,
        start=m.start,
        end=m.end,
        requests=m.requests,
        summarised_requests=m.summarised_requests,
        min_n=m.policy.min_n,
        false_alarm_rate=m.feature_policy.false_alarm_rate,
        problem=m.problem,
        features=[feature_drift_view(f) for f in m.features],
        accuracy=accuracy_view(m.accuracy) if m.accuracy is not None else None,
    )


def feature_drift_view(f: FeatureDrift) -> FeatureDriftView:
    """``f`` as the API shows it: the same fields, an infinite threshold as null."""
    shown = {name: getattr(f, name) for name in FeatureDriftView.model_fields}
    shown["threshold"] = finite_or_none(f.threshold)
    shown["psi_threshold"] = finite_or_none(f.psi_threshold)
    return FeatureDriftView(**shown)


def accuracy_view(a: Accuracy) -> AccuracyView:
    """``a`` as the API shows it."""
    e = a.estimate
    labelled = a.labelled
    return AccuracyView(
        estimated=e.accuracy,
        low=e.low,
        high=e.high,
        confidence=e.confidence,
        n=e.n,
        unseen_share=e.unseen_share,
        allowance=e.allowance,
        allowance_measured=e.allowance_measured,
        assumption=e.assumption,
        reference=a.reference,
        threshold=a.threshold,
        labelled=(
            LabelledAccuracy(
                windows=labelled.windows,
                rows=labelled.rows,
                accuracy=labelled.accuracy,
                estimated=labelled.estimated,
            )
            if labelled is not None
            else None
        ),
    )
