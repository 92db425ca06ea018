"""Folding summarised rows into the open window: the numpy half of :mod:`agent.telemetry.window`.

The recorder copies a summarised request's rows into a preallocated
:class:`RowBuffer`; every ``buffer_rows`` rows (and when a window closes) the
buffer is folded into the :class:`RunningWindow` with a few numpy calls over
all its rows: derived features (:func:`protocol.derivation.derive_features`),
NaN and out-of-range counts, one sort per feature for baseline bin counts, min
and max, the values below the baseline's minimum and above its maximum (only
counted when the fold's range leaves the baseline's), moments merged with
Chan's formula, the top-score histogram. The features and score histogram of
the requests summarised equal :func:`protocol.summary.summarize` over their
rows with the baseline's ranges: counts, ``min`` and ``max`` exactly, ``mean``
and ``m2`` to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.derivation import InputDerivation, derived_names
from protocol.histogram import DEFAULT_MAX_BUCKETS, ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, CloudErrorKind, HybridSummary, PlanMode
from protocol.inference import STAGE_NAMES, StageName
from protocol.manifest import Manifest, TensorSpec
from protocol.summary import SCORE_BIN_COUNT, FeatureSummary, ScoreHistogram
from protocol.window import ShadowSummary, WindowSummary

Tensors = Mapping[str, npt.ArrayLike]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class WindowRecordError(ValueError):
    """A request the recorder cannot summarise: inputs or outputs that break the manifest."""


@dataclass(frozen=True)
class WindowLayout:
    """What a manifest says about summarising: inputs, features, bins, ranges, scores."""

    name: str
    version: str
    baseline_id: str
    inputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]
    derivations: tuple[InputDerivation, ...]
    features: int
    edges: tuple[F64, ...]
    bin_offsets: I64  # where each feature's counts start in the flat counts array
    total_bins: int
    low: F64
    high: F64
    check_range: bool
    baseline_low: F64  # the baseline's min per feature (-inf: it has none)
    baseline_high: F64
    score_output: str | None
    score_dtype: np.dtype[Any]
    score_quantization: tuple[float, int] | None  # (scale, zero point)
    classes: tuple[str, ...]
    padded_edges: F64  # [features, most edges], +inf past a feature's last edge
    bin_mask: npt.NDArray[np.bool_]  # [features, most edges + 1]: the bins a feature has

    @property
    def key(self) -> tuple[str, str, str]:
        return self.name, self.version, self.baseline_id

    def bin_counts(self, ordered: F64, finite: I64 | int) -> I64:
        """Counts per baseline bin, flat in feature order, from each feature's sorted values.

        ``ordered`` is ``[features, rows]``, each row sorted with non-finite
        values replaced by NaN (which sorts last); ``finite`` counts the finite
        ones. ``searchsorted(..., side="left")`` of an edge counts the values
        below it, so bin ``i`` holds ``below(e_i) - below(e_{i-1})``: the same
        left-closed bins as :func:`protocol.summary.bin_counts`, exactly. On
        sorted data the searches cost one call per feature, not per value.
        """
        edges = self.padded_edges
        below = np.zeros((edges.shape[0], edges.shape[1] + 2), dtype=np.int64)
        below[:, 1:-1] = [
            values.searchsorted(e, side="left") for values, e in zip(ordered, edges, strict=True)
        ]
        below[:, -1] = finite
        per_bin: I64 = np.diff(below, axis=1)[self.bin_mask]
        return per_bin

    @classmethod
    def of(cls, manifest: Manifest) -> WindowLayout:
        specs = {t.name: t for t in manifest.inputs}
        derived = sum(
            len(derived_names(d.input, d.method, specs[d.input].example_shape))
            for d in manifest.derivations
        )
        features = len(manifest.baseline.features)
        if derived != features:
            raise WindowRecordError(
                f"model {manifest.name} {manifest.version}: its derivations give {derived} "
                f"features but its baseline has {features}"
            )
        edges = tuple(np.asarray(b.edges, dtype=np.float64) for b in manifest.baseline.features)
        sizes = np.array([e.size + 1 for e in edges], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        low = np.array(
            [-math.inf if f.valid_min is None else f.valid_min for f in manifest.features]
        )
        high = np.array(
            [math.inf if f.valid_max is None else f.valid_max for f in manifest.features]
        )
        summaries = [b.summary for b in manifest.baseline.features]
        baseline_low = np.array([-math.inf if f.min is None else f.min for f in summaries])
        baseline_high = np.array([math.inf if f.max is None else f.max for f in summaries])
        score_output, classes = _score_output(manifest)
        score_spec = next((t for t in manifest.outputs if t.name == score_output), None)
        score_dtype = np.dtype(score_spec.dtype if score_spec is not None else "float64")
        # A quantized score output is summarised as the probabilities it stands for.
        quantization = None
        if score_spec is not None and score_dtype.kind in "iu":
            quantization = score_spec.quantization
        widest = max((e.size for e in edges), default=0)
        return cls(
            name=manifest.name,
            version=manifest.version,
            baseline_id=manifest.baseline.id,
            # Only the inputs some derivation reads are buffered.
            inputs=tuple(
                (t.name, np.dtype(t.dtype), tuple(t.example_shape))
                for t in manifest.inputs
                if any(d.input == t.name for d in manifest.derivations)
            ),
            derivations=tuple(manifest.derivations),
            features=features,
            edges=edges,
            padded_edges=np.array(
                [[*e, *([math.inf] * (widest - e.size))] for e in edges], dtype=np.float64
            ).reshape(len(edges), widest),
            bin_mask=np.arange(widest + 1)[np.newaxis, :] <= sizes[:, np.newaxis] - 1,
            bin_offsets=offsets,
            total_bins=int(sizes.sum()),
            low=low,
            high=high,
            check_range=bool(np.isfinite(low).any() or np.isfinite(high).any()),
            baseline_low=baseline_low.reshape(features),
            baseline_high=baseline_high.reshape(features),
            score_output=score_output,
            score_dtype=score_dtype,
            score_quantization=quantization,
            classes=classes,
        )


def batch_size(inputs: Tensors, name: str | None) -> int:
    """The rows of a request: the first dimension of input ``name`` (or of any input)."""
    value = inputs.get(name) if name is not None else next(iter(inputs.values()), None)
    if value is None:
        raise WindowRecordError(f"input {name!r} is missing" if name else "the request is empty")
    shape = value.shape if isinstance(value, np.ndarray) else np.shape(value)
    if not shape:
        what = f"input {name!r}" if name is not None else "the request"
        raise WindowRecordError(f"{what} has no batch dimension (shape {list(shape)})")
    return int(shape[0])


def _score_output(manifest: Manifest) -> tuple[str | None, tuple[str, ...]]:
    """The probability output whose top score is summarised, and its class names."""
    name = manifest.fallback.confidence_output
    if name is None:
        return None, ()
    spec: TensorSpec = next(t for t in manifest.outputs if t.name == name)
    width = int(np.prod(spec.example_shape)) if spec.example_shape else 1
    classes = manifest.classes
    if classes is None or len(classes) != width:
        classes = [str(i) for i in range(width)]
    return name, tuple(classes)


@dataclass
class ShadowTally:
    """What a shadow model did on the window's requests (a :class:`ShadowSummary`)."""

    bundle_id: str
    model_version: str
    requests: int = 0
    agreements: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds

    def summary(self) -> ShadowSummary:
        latency = ExponentialHistogram()
        if self.latencies:
            ms = np.array(self.latencies, dtype=np.float64) * 1000.0
            latency = record(latency, ms, DEFAULT_MAX_BUCKETS)
        return ShadowSummary(
            bundle_id=self.bundle_id,
            model_version=self.model_version,
            requests=self.requests,
            agreements=self.agreements,
            errors=self.errors,
            latency_ms=latency,
        )


def _histogram(seconds: list[float]) -> ExponentialHistogram:
    if not seconds:
        return ExponentialHistogram()
    ms = np.array(seconds, dtype=np.float64) * 1000.0
    return record(ExponentialHistogram(), ms, DEFAULT_MAX_BUCKETS)


@dataclass
class HybridTally:
    """What the device did under a hybrid plan in the window (a :class:`HybridSummary`)."""

    plan_id: str
    mode: PlanMode
    local: int = 0
    escalated: int = 0
    kept_local_quota: int = 0
    cloud_answered: int = 0
    audits: int = 0
    cloud_errors: dict[CloudErrorKind, int] = field(default_factory=dict)
    escalated_compared: int = 0
    escalated_agreements: int = 0
    audit_compared: int = 0
    audit_agreements: int = 0
    audit_confidence_sum: float = 0.0
    local_latencies: list[float] = field(default_factory=list)  # seconds
    cloud_latencies: list[float] = field(default_factory=list)
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)

    def error(self, kind: CloudErrorKind | None) -> None:
        if kind is not None:
            self.cloud_errors[kind] = self.cloud_errors.get(kind, 0) + 1

    def summary(self) -> HybridSummary:
        return HybridSummary(
            plan_id=self.plan_id,
            mode=self.mode,
            local=self.local,
            escalated=self.escalated,
            kept_local_quota=self.kept_local_quota,
            cloud_answered=self.cloud_answered,
            audits=self.audits,
            cloud_errors={k: v for k, v in self.cloud_errors.items() if v},
            escalated_compared=self.escalated_compared,
            escalated_agreements=self.escalated_agreements,
            audit_compared=self.audit_compared,
            audit_agreements=self.audit_agreements,
            audit_confidence_sum=min(self.audit_confidence_sum, float(self.audit_compared)),
            local_latency_ms=_histogram(self.local_latencies),
            cloud_latency_ms=_histogram(self.cloud_latencies),
            confidence=list(self.confidence),
        )


@dataclass
class RunningWindow:
    """The additive state of the open window."""

    layout: WindowLayout
    cohort_id: str | None
    plan_id: str | None
    start: float | None = None
    requests: int = 0
    errors: int = 0
    unsummarised: int = 0
    served: dict[StageName, int] = field(default_factory=lambda: dict.fromkeys(STAGE_NAMES, 0))
    n: I64 = field(init=False)
    nan: I64 = field(init=False)
    out_of_range: I64 = field(init=False)
    below: I64 = field(init=False)  # values below the baseline's min
    above: I64 = field(init=False)
    mean: F64 = field(init=False)
    m2: F64 = field(init=False)
    low: F64 = field(init=False)
    high: F64 = field(init=False)
    counts: I64 = field(init=False)
    scores: I64 = field(init=False)
    latency: ExponentialHistogram = field(default_factory=ExponentialHistogram)
    # Latencies not in ``latency`` yet: a closed window records them when it is handed out.
    latencies: list[float] = field(default_factory=list)
    # What a shadow model did beside the active one, when one ran in this window.
    shadow: ShadowTally | None = None
    # What the device did under a hybrid plan, while it followed one.
    hybrid: HybridTally | None = None

    def __post_init__(self) -> None:
        k = self.layout.features
        self.n = np.zeros(k, dtype=np.int64)
        self.nan = np.zeros(k, dtype=np.int64)
        self.out_of_range = np.zeros(k, dtype=np.int64)
        self.below = np.zeros(k, dtype=np.int64)
        self.above = np.zeros(k, dtype=np.int64)
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)
        self.low = np.full(k, math.inf)
        self.high = np.full(k, -math.inf)
        self.counts = np.zeros(self.layout.total_bins, dtype=np.int64)
        self.scores = np.zeros(len(self.layout.classes) * SCORE_BIN_COUNT, dtype=np.int64)

    def fold_rows(self, values: F64) -> None:
        """Add the derived features of some rows, ``[rows, features]``."""
        layout = self.layout
        rows = values.shape[0]
        if rows == 0:
            return
        finite = np.isfinite(values)
        count: I64 | int
        # Each feature's values sorted (a row per feature): bins, min and max from one sort.
        if finite.all():  # the usual case, in fewer calls
            count = rows
            ordered = values.T.copy()
            ordered.sort(axis=1)
            low, high = ordered[:, 0], ordered[:, -1]
            mean = np.add.reduce(values, axis=0) / rows
            deviation = values - mean
            clean = values
        else:
            seen: I64 = finite.sum(axis=0)
            count = seen
            self.nan += rows - seen
            clean = np.where(finite, values, 0.0)
            mean = clean.sum(axis=0) / np.maximum(seen, 1)
            deviation = np.where(finite, clean - mean, 0.0)
            ordered = np.where(finite, values, math.nan).T.copy()
            ordered.sort(axis=1)
            last = ordered[np.arange(layout.features), np.maximum(seen - 1, 0)]
            low = np.where(seen > 0, ordered[:, 0], math.inf)
            high = np.where(seen > 0, last, -math.inf)
        self.counts += layout.bin_counts(ordered, count)
        # Only count out-of-range values when this fold's range leaves the valid one.
        if layout.check_range and ((low < layout.low) | (high > layout.high)).any():
            outside = (clean < layout.low) | (clean > layout.high)
            if clean is not values:
                outside &= finite
            self.out_of_range += np.count_nonzero(outside, axis=0)
        # Likewise the values beyond the baseline's range: none in the usual fold, and
        # only the features that have some are looked at (``ordered`` holds NaN for
        # non-finite values, which compare false).
        if (low < layout.baseline_low).any():
            (cols,) = np.nonzero(low < layout.baseline_low)
            self.below[cols] += (ordered[cols] < layout.baseline_low[cols, None]).sum(axis=1)
        if (high > layout.baseline_high).any():
            (cols,) = np.nonzero(high > layout.baseline_high)
            self.above[cols] += (ordered[cols] > layout.baseline_high[cols, None]).sum(axis=1)
        m2 = np.einsum("ij,ij->j", deviation, deviation)
        # Chan et al.: merge (n_a, mean_a, m2_a) with (n_b, mean_b, m2_b). With
        # n_a = 0 this gives mean_b and m2_b exactly; with n_b = 0 nothing changes.
        n_a = self.n
        n = n_a + count
        share = count / np.maximum(n, 1)
        delta = mean - self.mean
        self.mean += delta * share
        self.m2 += m2 + delta * delta * (n_a * share)
        self.n = n
        np.minimum(self.low, low, out=self.low)
        np.maximum(self.high, high, out=self.high)

    def fold_scores(self, scores: npt.NDArray[Any], starts: Sequence[int]) -> None:
        """Add ``[rows, classes]`` top scores; ``starts`` are each request's first row."""
        if scores.shape[0] == 0:
            return
        probs = scores.astype(np.float64, copy=False)
        if self.layout.score_quantization is not None:
            scale, zero_point = self.layout.score_quantization
            probs = (probs - zero_point) * scale
        if not np.isfinite(probs).all():
            finite = np.isfinite(probs).all(axis=1)
            bad_rows = (~finite).astype(np.int64)
            self.errors += int(np.count_nonzero(np.add.reduceat(bad_rows, np.asarray(starts))))
            probs = probs[finite]
        # As protocol.summary.score_histogram: bin k of SCORE_BIN_COUNT over [0, 1].
        predicted = probs.argmax(axis=1)
        k = (np.maximum.reduce(probs, axis=1) * SCORE_BIN_COUNT).astype(np.int64)
        np.clip(k, 0, SCORE_BIN_COUNT - 1, out=k)
        k += predicted * SCORE_BIN_COUNT
        self.scores += np.bincount(k, minlength=self.scores.size)

    def fold_latencies(self, seconds: F64) -> None:
        if seconds.size:
            self.latency = record(self.latency, seconds * 1000.0, DEFAULT_MAX_BUCKETS)

    def summary(self, window_id: str, device_id: str, end: float) -> WindowSummary:
        layout = self.layout
        self.fold_latencies(np.array(self.latencies, dtype=np.float64))
        self.latencies = []
        start = self.start if self.start is not None else end
        features = []
        for j in range(layout.features):
            n = int(self.n[j])
            lo = layout.bin_offsets[j]
            features.append(
                FeatureSummary(
                    n=n,
                    nan=int(self.nan[j]),
                    out_of_range=int(self.out_of_range[j]),
                    mean=float(self.mean[j]) if n else 0.0,
                    m2=max(float(self.m2[j]), 0.0) if n else 0.0,
                    min=float(self.low[j]) if n else None,
                    max=float(self.high[j]) if n else None,
                    counts=self.counts[lo : lo + layout.edges[j].size + 1].tolist(),
                    below_baseline=int(self.below[j]),
                    above_baseline=int(self.above[j]),
                )
            )
        scores = None
        if layout.score_output is not None:
            scores = ScoreHistogram(
                classes=list(layout.classes),
                counts=self.scores.reshape(len(layout.classes), SCORE_BIN_COUNT).tolist(),
            )
        return WindowSummary(
            window_id=window_id,
            device_id=device_id,
            model_name=layout.name,
            model_version=layout.version,
            baseline_id=layout.baseline_id,
            cohort_id=self.cohort_id,
            plan_id=self.plan_id,
            start=start,
            end=max(end, start),  # a wall clock stepped back must not give end < start
            requests=self.requests,
            errors=self.errors,
            unsummarised_requests=self.unsummarised,
            served={s: c for s, c in self.served.items() if c},
            features=features,
            scores=scores,
            latency_ms=self.latency,
            shadow=self.shadow.summary() if self.shadow is not None else None,
            hybrid=self.hybrid.summary() if self.hybrid is not None else None,
        )


class RowBuffer:
    """Rows, counted scores and latencies waiting to be folded into the window."""

    def __init__(self, layout: WindowLayout, max_rows: int, max_bytes: int) -> None:
        self.layout = layout
        row_bytes = sum(
            dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            for _, dtype, shape in layout.inputs
        )
        self.capacity = max(1, min(max_rows, max_bytes // max(row_bytes, 1)))
        self.inputs = tuple(
            (name, shape, np.empty((self.capacity, *shape), dtype=dtype))
            for name, dtype, shape in layout.inputs
        )
        self.rows = 0
        self.score_width = len(layout.classes)
        self.scores = np.empty((self.capacity, self.score_width), dtype=layout.score_dtype)
        self.score_rows = 0
        self.score_starts: list[int] = []
