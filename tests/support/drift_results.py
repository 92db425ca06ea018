"""Drift results made by hand, for the alert rules' tests: features with chosen verdicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleet_server.drift.models import Accuracy, ModelDrift
from protocol.drift.model import DriftPolicy, FeatureDrift

T0 = datetime(2031, 1, 1, tzinfo=UTC)


def feature(index: int, **verdicts: str) -> FeatureDrift:
    """Feature ``index`` with the verdicts given (``distribution``, ``missing``, ...)."""
    tests = {"distribution": "no_drift", "missing": "no_drift"} | verdicts
    return FeatureDrift(
        feature=index,
        name=f"f{index}",
        verdict="drift" if "drift" in tests.values() else "no_drift",
        n=1000,
        baseline_n=5000,
        psi=0.3,
        js=0.1,
        statistic=90.0,
        df=19,
        threshold=40.0,
        p_value=1e-9,
        psi_threshold=0.1,
        nan=30,
        **tests,  # type: ignore[arg-type]
    )


def result(*features: FeatureDrift, accuracy: Accuracy | None = None) -> ModelDrift:
    """Model version pump-health@1.0.0 over two windows from ``T0``, with ``features``."""
    return ModelDrift(
        model_name="pump-health",
        model_version="1.0.0",
        baseline_id="b1",
        window_ids=["w1", "w2"],
        windows=2,
        start=T0,
        end=T0 + timedelta(minutes=2),
        requests=1000,
        policy=DriftPolicy(),
        features=list(features),
        accuracy=accuracy,
    )
