"""What a gate said at one controller tick: the record the controller decides on and shows.

Shared by the gates (which produce it) and the controller (which reads only
``gate``, ``severity``, ``decision`` and ``missing``); everything else is
evidence for ``rollout status`` and the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# fail: harm beyond the gate's bound is shown; pass: non-inferiority within its
# margin is shown; inconclusive: neither yet (never counted as a pass).
Decision = Literal["fail", "pass", "inconclusive"]
Severity = Literal["stop", "warn"]


@dataclass(frozen=True)
class GateEvaluation:
    """One gate's anytime-valid verdict on the evidence at one tick."""

    gate: str  # install_failures, fallback_rate, latency_p95, accuracy_estimated, ...
    severity: Severity
    decision: Decision
    n_devices: int  # treatment devices with evidence (installs for the install gate)
    n_control: int  # control devices with evidence (0 for the install gate)
    n_requests: int
    estimate: float | None  # the effect (a rate, a log ratio, a difference), None without data
    low: float | None  # its anytime-valid confidence sequence at this tick
    high: float | None
    harm_at: float  # the bound whose crossing is harm
    margin: float  # the bound within which the new version is non-inferior
    log_e_harm: float  # log e-value against "no harm"; fail when >= log(1/alpha)
    log_e_ni: float  # log e-value against "worse than the margin"; pass when >= log(1/beta)
    alpha: float  # this gate's share of the false-stop budget
    beta: float  # this gate's share of the false-pass budget
    missing: str | None = None  # what an inconclusive gate lacks: devices, requests, labels
