"""What drift is computed over and what it finds: scopes, per-version results, accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from fleet_server.drift.family import feature_policy
from fleet_server.errors import NotFound
from protocol.cbpe import AccuracyEstimate, AccuracyPolicy, AccuracyVerdict
from protocol.drift.model import DriftPolicy, FeatureDrift

ScopeKind = Literal["device", "tag", "hardware_id", "region", "fleet"]

# Window ids listed in a result and in an alert's evidence; the count is always exact.
MAX_LISTED_WINDOWS = 1000


class DriftError(NotFound):
    """Drift cannot be computed for what was asked: something it names is not there."""


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

    @property
    def feature_policy(self) -> DriftPolicy:
        """The policy each feature was tested at
        (:func:`fleet_server.drift.family.feature_policy`); ``policy`` holds the false-alarm
        rate of the whole scope and model version."""
        return feature_policy(self.policy, len(self.features))
