"""Alerts, silences and windows as the API shows them (and the webhook sends them)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleet_server.db.models import AlertRow, SilenceRow
from fleet_server.drift.silences import is_active, matches, silenced_by
from protocol.api import AlertAcknowledgement, AlertFeature, AlertView, SilenceView


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
        tests: dict[str, dict[str, Any]] = f.get("tests") or {}
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
        opened_at=a.opened_at,
        last_seen_at=a.last_seen_at,
        closed_at=a.closed_at,
        acknowledged=(
            AlertAcknowledgement(
                at=a.acknowledged_at,
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
        created_at=s.created_at,
        starts_at=s.starts_at,
        ends_at=s.ends_at,
        expired_by=s.expired_by,
        active=is_active(s, now),
        matching=sum(1 for a in open_alerts if matches(s, a)),
    )
