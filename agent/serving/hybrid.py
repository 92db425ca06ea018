"""Following a hybrid plan: which requests leave the device, and what is reported about them.

The pure half of hybrid serving (:mod:`agent.serving.chain` does the calls):

- :class:`TokenBucket`: the plan's quota (``quota_rate`` tokens a second up
  to ``quota_burst``, full when the plan arrives); one token per request
  sent to the cloud, escalation, cloud-first request, fallback or audit alike.
- :class:`PlanState`: the plan in force with its bucket, its expiry on the
  wall clock, and the calibrated confidence of an answer
  (:func:`protocol.hybrid.calibrated_confidence` with the plan's temperature
  over the manifest's ``confidence_output``; a batch's is its lowest row).
- :class:`Route` and :class:`AuditResult`: what happened to one request and
  to one audit, as the window (:meth:`agent.telemetry.WindowRecorder.record`)
  and the metrics count them.

Clocks are injected: monotonic seconds for the bucket and back-off, seconds
since the epoch for expiry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from protocol.hybrid import (
    CONFIDENCE_BINS,
    CloudErrorKind,
    HybridPlan,
    PlanMode,
)
from protocol.manifest import Manifest

RouteName = Literal["local", "escalated", "kept_local_quota"]
ROUTES: Final[tuple[RouteName, ...]] = ("local", "escalated", "kept_local_quota")


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (monotonic seconds)."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        return self._tokens

    def has_token(self, now: float) -> bool:
        return self.tokens(now) >= 1.0

    def take(self, now: float) -> bool:
        """Spend one token if there is one; whether it was spent."""
        if self.tokens(now) < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Route(NamedTuple):
    """How one request was served under plan ``plan_id`` (a tuple: cheap to make per request).

    ``route`` is where the window counts it (see
    :class:`protocol.hybrid.HybridSummary`). ``confidence`` is the local
    answer's calibrated confidence (``None``: no local model answered).
    ``cloud_latency_s`` is set when the cloud answered, ``cloud_error`` when
    a call to it failed; ``agreed`` when both a local and a cloud answer exist.
    """

    plan_id: str
    mode: PlanMode
    route: RouteName
    confidence: float | None = None
    local_latency_s: float | None = None
    cloud_latency_s: float | None = None
    cloud_error: CloudErrorKind | None = None
    agreed: bool | None = None


class AuditResult(NamedTuple):
    """One audit: a confident request also sent to the cloud after its local answer was served."""

    plan_id: str
    mode: PlanMode
    confidence: float
    cloud_latency_s: float | None = None
    cloud_error: CloudErrorKind | None = None
    agreed: bool | None = None


class PlanState:
    """A plan the device follows, with its token bucket (monotonic ``now`` when it arrived)."""

    def __init__(self, plan: HybridPlan, now: float) -> None:
        self.plan = plan
        self.expires_at = plan.expires_at.timestamp()
        self.bucket = TokenBucket(plan.quota_rate, plan.quota_burst, now)

    def in_force(self, wall_now: float) -> bool:
        """Whether the plan still holds at ``wall_now`` (seconds since the epoch)."""
        return wall_now < self.expires_at

    def wants_cloud(self, confidence: float | None) -> bool:
        """Whether the plan sends a request with this local confidence to the cloud.

        A model without a confidence output (``None``) is never escalated: there
        is nothing to compare with ``tau``.
        """
        mode = self.plan.mode
        if mode == "cloud_first":
            return True
        if mode == "escalate":
            return confidence is not None and confidence < self.plan.tau
        return False


def _score_spec(manifest: Manifest) -> tuple[str | None, tuple[float, int] | None]:
    """The confidence output's name, and its quantization when it is an integer tensor."""
    name = manifest.fallback.confidence_output
    for spec in manifest.outputs:
        if spec.name == name:
            quantized = spec.quantization is not None and np.dtype(spec.dtype).kind in "iu"
            return name, spec.quantization if quantized else None
    return None, None


def scores_of(manifest: Manifest, outputs: Mapping[str, npt.NDArray[Any]], rows: int) -> Any:
    """The confidence output as probabilities ``[rows, classes]`` (``None``: the manifest has none).

    A quantized score output is turned back into the probabilities it stands for.
    """
    name, quantization = _score_spec(manifest)
    if name is None or name not in outputs:
        return None
    scores = np.asarray(outputs[name], dtype=np.float64).reshape(rows, -1)
    if quantization is not None:
        scale, zero_point = quantization
        scores = (scores - zero_point) * scale
    return scores


def request_confidence(
    manifest: Manifest, outputs: Mapping[str, npt.NDArray[Any]], rows: int, temperature: float
) -> float | None:
    """The lowest calibrated confidence over the batch (``None``: the manifest names no scores).

    The same number as :func:`protocol.hybrid.calibrated_confidence` (to
    rounding), computed as ``1 / sum_j (p_j / p_max) ** (1 / T)``: the top
    share of ``softmax(log(p) / T)`` without logarithms, in plain floats for
    one row (about a tenth of the numpy call's time on the serving path).
    A row that is not finite or all zero counts as confidence 0.
    """
    if rows == 0:
        return None
    name, quantization = _score_spec(manifest)
    if name is None or name not in outputs:
        return None
    inverse = 1.0 / temperature
    if rows == 1 and quantization is None:
        row: list[float] = np.asarray(outputs[name]).ravel().tolist()
        top = max(row)
        if not (top > 0.0 and math.isfinite(top)):
            return 0.0
        total = 0.0
        for value in row:
            if not math.isfinite(value):
                return 0.0
            if value > 0.0:
                total += (value / top) ** inverse
        return 1.0 / total
    scores = scores_of(manifest, outputs, rows)
    if not np.isfinite(scores).all():
        return 0.0
    top = scores.max(axis=1, keepdims=True)
    if not (top > 0.0).all():
        return 0.0
    total = ((np.clip(scores, 0.0, None) / top) ** inverse).sum(axis=1)
    return float((1.0 / total).min())


def same_top_class(
    manifest: Manifest,
    local: Mapping[str, npt.NDArray[Any]],
    cloud: Mapping[str, npt.NDArray[Any]],
    rows: int,
) -> bool | None:
    """Whether every row has the same top class locally and in the cloud (``None``: no scores)."""
    mine, theirs = scores_of(manifest, local, rows), scores_of(manifest, cloud, rows)
    if mine is None or theirs is None or mine.shape != theirs.shape:
        return None
    return bool(np.array_equal(mine.argmax(axis=1), theirs.argmax(axis=1)))


def confidence_bin(confidence: float) -> int:
    """:func:`protocol.hybrid.confidence_bin` of one value, without numpy."""
    if not math.isfinite(confidence):
        return 0
    return max(0, min(CONFIDENCE_BINS - 1, int(confidence * CONFIDENCE_BINS)))
