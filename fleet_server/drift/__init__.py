"""Drift and estimated accuracy of the fleet's windows, and the alerts they raise."""

from fleet_server.drift.service import (
    Accuracy,
    DriftError,
    Evaluation,
    Labelled,
    ManifestCache,
    ModelDrift,
    Scope,
    drift_of,
    evaluate_alerts,
    evaluate_fleet,
    evaluate_once,
    run_drift_alerts,
    update_gauges,
)

__all__ = [
    "Accuracy",
    "DriftError",
    "Evaluation",
    "Labelled",
    "ManifestCache",
    "ModelDrift",
    "Scope",
    "drift_of",
    "evaluate_alerts",
    "evaluate_fleet",
    "evaluate_once",
    "run_drift_alerts",
    "update_gauges",
]
