"""Hybrid inference: the plan a device serves by, and what it reports about following it.

The fleet server plans, per device, which requests leave the device for the
cloud model (:class:`HybridPlan`) and delivers the plan in the device's
director metadata, signed like an assignment: a director target whose
``custom`` carries :data:`protocol.director_marks.HYBRID_PLAN` (the plan's
JSON) instead of a bundle. The device follows a plan only while it is signed,
meant for it and not expired; otherwise it serves locally only.

Modes:

- ``local``: every request is answered on the device; nothing leaves it.
- ``escalate``: a request whose *calibrated* confidence is below ``tau`` is
  sent to the cloud while the device's quota allows; a share ``audit_rate``
  of the confident ones is also sent, answered locally, to measure agreement.
- ``cloud_first``: every request goes to the cloud while the quota allows;
  the local model answers when it does not or the cloud fails.

Calibrated confidence is the top score after temperature scaling (Guo et
al., 2017) of the model's probability output: ``softmax(log(p) / T)``
(:func:`calibrated_confidence`). The device counts it in
:data:`CONFIDENCE_BINS` equal bins over [0, 1], which is what the planner
picks ``tau`` from.

Each window of a device that served by a plan carries a :class:`HybridSummary`
tagged with the plan's id. Pure data and functions: no I/O.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from protocol.histogram import ExponentialHistogram, merge_histograms

PlanMode = Literal["local", "escalate", "cloud_first"]
PLAN_MODES: Final[tuple[PlanMode, ...]] = ("local", "escalate", "cloud_first")

# Why a cloud call gave no answer the device could use.
CloudErrorKind = Literal["rate_limited", "timeout", "unavailable", "server_error", "bad_answer"]
CLOUD_ERROR_KINDS: Final[tuple[CloudErrorKind, ...]] = (
    "rate_limited",
    "timeout",
    "unavailable",
    "server_error",
    "bad_answer",
)

# Equal-width bins of calibrated confidence over [0, 1].
CONFIDENCE_BINS: Final = 50

_Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
_Name = Annotated[str, Field(min_length=1, max_length=128)]


class HybridPlan(BaseModel):
    """How one device shares its requests with the cloud model, until ``expires_at``.

    ``quota_rate`` (requests a second) and ``quota_burst`` are the token bucket
    the device spends one token from per request it sends to the cloud
    (escalations, cloud-first requests and audits alike); the cloud endpoint
    enforces the same bucket and answers 429 beyond it. ``cloud_model`` is the
    model name at the endpoint (``None``: the device's own model name).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: _Id
    device_id: _Id
    mode: PlanMode = "local"
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    tau: float = Field(default=0.0, ge=0.0, le=1.0)
    quota_rate: float = Field(default=0.0, ge=0.0)
    quota_burst: int = Field(default=0, ge=0)
    audit_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    cloud_model: _Name | None = None
    issued_at: AwareDatetime
    expires_at: AwareDatetime

    @model_validator(mode="after")
    def _is_consistent(self) -> HybridPlan:
        if self.expires_at <= self.issued_at:
            raise ValueError("a plan must expire after it was issued")
        if self.mode != "local" and self.quota_burst < 1:
            raise ValueError(f"a plan in mode {self.mode!r} needs a quota_burst of at least 1")
        return self

    def expired(self, now: datetime) -> bool:
        """Whether the plan no longer holds at ``now`` (an aware datetime)."""
        return now >= self.expires_at

    def canonical_json(self) -> bytes:
        """The plan's bytes as signed into a director target (sorted keys, no spaces)."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()


class HybridSummary(BaseModel):
    """What a device did with the requests of one window under plan ``plan_id``.

    Every request counts once in ``local`` (answered by the device's model
    without asking the cloud: confident, or the mode is ``local``),
    ``escalated`` (sent to the cloud for low confidence, or in ``cloud_first``
    mode) or ``kept_local_quota`` (would have been sent, but the quota or a
    back-off after a 429 said no). Of the ``escalated``, ``cloud_answered`` got
    the cloud's answer and the rest count in ``cloud_errors`` by kind and were
    answered locally. ``audits`` are confident requests also sent to the cloud
    after being answered locally; their failures also count in
    ``cloud_errors``.

    Agreement (same top class) between the local and the cloud answer is
    counted where both exist: ``escalated_compared``/``escalated_agreements``
    and ``audit_compared``/``audit_agreements``; ``audit_confidence_sum`` is
    the sum of the local calibrated confidence over the compared audits, what
    calibration promises their agreement to be. ``confidence`` counts every
    request's calibrated confidence in :data:`CONFIDENCE_BINS` bins.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: _Id
    mode: PlanMode
    local: int = Field(default=0, ge=0)
    escalated: int = Field(default=0, ge=0)
    kept_local_quota: int = Field(default=0, ge=0)
    cloud_answered: int = Field(default=0, ge=0)
    audits: int = Field(default=0, ge=0)
    cloud_errors: dict[CloudErrorKind, int] = Field(default_factory=dict)
    escalated_compared: int = Field(default=0, ge=0)
    escalated_agreements: int = Field(default=0, ge=0)
    audit_compared: int = Field(default=0, ge=0)
    audit_agreements: int = Field(default=0, ge=0)
    audit_confidence_sum: float = Field(default=0.0, ge=0.0)
    local_latency_ms: ExponentialHistogram = Field(default_factory=ExponentialHistogram)
    cloud_latency_ms: ExponentialHistogram = Field(default_factory=ExponentialHistogram)
    confidence: list[int] = Field(default_factory=lambda: [0] * CONFIDENCE_BINS)

    @model_validator(mode="after")
    def _is_consistent(self) -> HybridSummary:
        if len(self.confidence) != CONFIDENCE_BINS or min(self.confidence) < 0:
            raise ValueError(f"confidence needs {CONFIDENCE_BINS} counts >= 0")
        if any(v < 0 for v in self.cloud_errors.values()):
            raise ValueError("cloud error counts must be >= 0")
        if self.cloud_answered > self.escalated:
            raise ValueError(
                f"{self.cloud_answered} cloud answers of only {self.escalated} escalated requests"
            )
        if self.escalated_agreements > self.escalated_compared:
            raise ValueError("more escalated agreements than escalated comparisons")
        if self.audit_agreements > self.audit_compared or self.audit_compared > self.audits:
            raise ValueError("audit agreements <= audit comparisons <= audits must hold")
        if self.audit_confidence_sum > self.audit_compared + 1e-6:
            raise ValueError("audit_confidence_sum cannot exceed audit_compared")
        return self

    @property
    def requests(self) -> int:
        """The requests this summary counts."""
        return self.local + self.escalated + self.kept_local_quota


def calibrated_probabilities(
    probabilities: npt.NDArray[Any], temperature: float
) -> npt.NDArray[np.float64]:
    """``softmax(log(p) / T)`` row by row: temperature scaling of probability outputs.

    ``probabilities`` is ``[rows, classes]`` (or one row); zeros stay zero and a
    row that is not finite comes back as NaN.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logits = np.log(np.clip(p, 0.0, None)) / temperature
        logits -= np.max(logits, axis=1, keepdims=True)
        e = np.exp(logits)
        out: npt.NDArray[np.float64] = e / np.sum(e, axis=1, keepdims=True)
    return out


def calibrated_confidence(
    probabilities: npt.NDArray[Any], temperature: float
) -> npt.NDArray[np.float64]:
    """The top calibrated probability of each row (NaN for a row that is not finite)."""
    out: npt.NDArray[np.float64] = np.max(
        calibrated_probabilities(probabilities, temperature), axis=1
    )
    return out


def confidence_bin(confidence: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """The :data:`CONFIDENCE_BINS` bin of each confidence (1.0 falls in the last bin)."""
    c = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=0.0)
    out: npt.NDArray[np.intp] = np.clip(
        (c * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1
    )
    return out


def merge_hybrid(a: HybridSummary, b: HybridSummary) -> HybridSummary:
    """The sum of two windows' hybrid sections under the same plan.

    Raises ``ValueError`` for sections of different plans or modes: what a
    device did under one plan says nothing about another.
    """
    if (a.plan_id, a.mode) != (b.plan_id, b.mode):
        raise ValueError(
            f"hybrid sections of plan {a.plan_id} ({a.mode}) and {b.plan_id} ({b.mode}) "
            "cannot be merged"
        )
    errors: dict[CloudErrorKind, int] = dict(a.cloud_errors)
    for kind, count in b.cloud_errors.items():
        errors[kind] = errors.get(kind, 0) + count
    return HybridSummary(
        plan_id=a.plan_id,
        mode=a.mode,
        local=a.local + b.local,
        escalated=a.escalated + b.escalated,
        kept_local_quota=a.kept_local_quota + b.kept_local_quota,
        cloud_answered=a.cloud_answered + b.cloud_answered,
        audits=a.audits + b.audits,
        cloud_errors=errors,
        escalated_compared=a.escalated_compared + b.escalated_compared,
        escalated_agreements=a.escalated_agreements + b.escalated_agreements,
        audit_compared=a.audit_compared + b.audit_compared,
        audit_agreements=a.audit_agreements + b.audit_agreements,
        audit_confidence_sum=a.audit_confidence_sum + b.audit_confidence_sum,
        local_latency_ms=merge_histograms(a.local_latency_ms, b.local_latency_ms),
        cloud_latency_ms=merge_histograms(a.cloud_latency_ms, b.cloud_latency_ms),
        confidence=[x + y for x, y in zip(a.confidence, b.confidence, strict=True)],
    )
