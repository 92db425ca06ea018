"""The drift feature's Prometheus gauges: open alerts, drifting features, accuracy."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.drift import store
from fleet_server.drift.lifecycle import alert_tests
from fleet_server.drift.models import ModelDrift

if TYPE_CHECKING:
    from fleet_server.metrics import Metrics


async def update_gauges(
    session: AsyncSession, metrics: Metrics, fleet: Sequence[ModelDrift] | None = None
) -> None:
    """Set the alert gauges from the database, so every replica reports the whole fleet.

    ``fleet``, the latest fleet-wide results, sets the accuracy gauges.
    """
    open_by_kind = await store.open_alert_counts(session)
    metrics.drift_alerts_open.set(open_by_kind.get("drift", 0))
    metrics.accuracy_alerts_open.set(open_by_kind.get("accuracy", 0))
    drifting: dict[tuple[str, str], set[int]] = defaultdict(set)
    for row in await store.open_alerts(session, scope="fleet", kind="drift"):
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
