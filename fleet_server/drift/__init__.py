"""Drift and estimated accuracy of the fleet's windows, and the alerts they raise.

``models`` (what drift is computed over and finds), ``lifecycle`` (the alert
rules, no I/O), ``store`` (the database and the release manifests), ``service``
(joins them; the server runs its evaluation as a job), ``metrics`` (the gauges),
``routes`` (the REST operations) and ``views`` (how the API shows alerts).
"""

from fleet_server.drift.metrics import update_gauges
from fleet_server.drift.models import Accuracy, DriftError, Labelled, ModelDrift, Scope
from fleet_server.drift.service import (
    Evaluation,
    drift_of,
    evaluate_alerts,
    evaluate_fleet,
    evaluate_once,
)
from fleet_server.drift.store import ManifestCache

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
    "update_gauges",
]
