"""Drift of the fleet's windows against release baselines, and the alerts it raises."""

from fleet_server.drift.service import (
    DriftError,
    ManifestCache,
    ModelDrift,
    Scope,
    drift_of,
    evaluate_alerts,
    evaluate_fleet,
    run_drift_alerts,
    update_gauges,
)

__all__ = [
    "DriftError",
    "ManifestCache",
    "ModelDrift",
    "Scope",
    "drift_of",
    "evaluate_alerts",
    "evaluate_fleet",
    "run_drift_alerts",
    "update_gauges",
]
