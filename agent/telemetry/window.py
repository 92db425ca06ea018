"""The device's window summaries: every answered request, counted in the current window.

Rules:

1. A window belongs to one model (name and version) and one baseline: its
   features are counted in that baseline's bins. :meth:`WindowRecorder.set_manifest`
   with a different model version or baseline closes the current window first,
   so a summary never mixes model versions; :meth:`WindowRecorder.set_cohort`
   does the same for a rollout cohort and plan.
2. :meth:`WindowRecorder.record` is on the serving path and does no per-value
   Python work: it copies a summarised request's rows into a preallocated
   buffer. Every ``buffer_rows`` rows (and when a window closes) the buffer is
   folded into the window with a few numpy calls over all its rows: derived
   features (:func:`protocol.derivation.derive_features`), NaN and
   out-of-range counts, one sort per feature for baseline bin counts, min and
   max, the values below the baseline's minimum and above its maximum (only
   counted when the fold's range leaves the baseline's), moments merged with
   Chan's formula, the top-score histogram. The
   features and score histogram of the requests summarised equal
   :func:`protocol.summary.summarize` over their rows with the baseline's
   ranges: counts, ``min`` and ``max`` exactly, ``mean`` and ``m2`` to floating-point rounding.
3. Every request is counted, summarised or not: ``requests``, ``served`` per
   stage, ``errors``, and its latency, kept in a list and recorded into the
   window's base-2 exponential histogram (:func:`protocol.histogram.record`)
   when :meth:`~WindowRecorder.poll` hands the window out (or every
   :data:`LATENCY_BUFFER` requests).
4. What summarising may cost is bounded by the policy's ``max_overhead``, a
   share of the inference time (the ``latency_s`` the caller reports). The
   recorder measures itself with ``timer``: once, at start, the fast path that
   only counts a request (``fixed``); then every summarised request, buffer
   folds included, as a moving average per summarised request (``summary``),
   beside the typical inference time (``inference``, from the median latency
   of the last :data:`LATENCY_SAMPLE` requests). Each request is
   summarised with probability ``p``, the largest with ``fixed + p * summary
   <= max_overhead * inference``: 1 while summarising is cheap next to the
   model (a model of milliseconds: the window is exact), a few per cent for a
   model of microseconds, never below :data:`MIN_SAMPLE_RATE`. ``p`` starts
   at 1 for every new model and is updated after every fold and window close.
   The last fold of a window counts when requests filled the window; a window
   closed by time pays it once per ``max_seconds`` however quiet the device,
   and a quiet device is not held to a small sample for it. Which requests
   are summarised is drawn at random (a geometric gap to the next one, from
   ``seed``), independently of their values: the features and the score
   histogram are an unbiased sample of the window's requests, and
   ``unsummarised_requests`` says how many were left out. A request left out
   is not looked at beyond its stage and latency. ``max_overhead=None``
   summarises every request.
5. A window opens with its first request (``start``) and closes when it holds
   ``max_requests`` requests (at once, inside ``record``) or, on
   :meth:`~WindowRecorder.poll`, when ``max_seconds`` have passed since it opened.
   A window without requests is never closed or uploaded: it has nothing to
   say, and the heartbeat already tells the server the device is alive.
6. The top-score histogram counts only the answers of the window's own model
   (stages ``active`` and ``previous`` serving that version); answers of another
   version, the cloud or the safe default are counted in ``served`` only. A
   counted answer whose scores are NaN or Inf is an error, and its rows stay out
   of the histogram.
7. Closed windows wait in a queue until :meth:`~WindowRecorder.poll` hands them
   out, each with a fresh id (uuid4). The queue is bounded
   (:data:`MAX_CLOSED_WINDOWS`); if nobody collects them the oldest go and are
   counted (:attr:`~WindowRecorder.dropped_windows`).

The recorder is used from one thread (the event loop); it keeps no lock.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocol.derivation import InputDerivation, derive_features, derived_names
from protocol.histogram import DEFAULT_MAX_BUCKETS, ExponentialHistogram, record
from protocol.inference import STAGE_NAMES, StageName
from protocol.manifest import Manifest, TensorSpec
from protocol.summary import SCORE_BIN_COUNT, FeatureSummary, ScoreHistogram
from protocol.window import WindowSummary

logger = logging.getLogger(__name__)

# Closed windows kept for poll(); at one window a minute that is an hour of
# windows nobody collected, and the outbox is the place for a longer backlog.
MAX_CLOSED_WINDOWS: Final = 64
# Latencies are recorded per window, not per fold (recording the concatenation
# and merging give the same buckets); this many are held between recordings.
LATENCY_BUFFER: Final = 4096
# The least share of requests summarised when even counting them exceeds the
# budget: a window of 1,000 requests still holds about one.
MIN_SAMPLE_RATE: Final = 1e-3
# Weight of the newest measurement in the moving averages of the costs.
COST_WEIGHT: Final = 0.25
# The latencies of the last this many requests give the typical inference time.
LATENCY_SAMPLE: Final = 64
_MODEL_STAGES: Final = frozenset({"active", "previous"})
_INF: Final = math.inf
_TIMED_CALLS: Final = 256  # fast-path calls timed at start-up, three times over; the best counts
_NO_TENSORS: Final[Mapping[str, npt.ArrayLike]] = {}

Tensors = Mapping[str, npt.ArrayLike]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class WindowRecordError(ValueError):
    """A request the recorder cannot summarise: inputs or outputs that break the manifest."""


class WindowPolicy(BaseModel):
    """When windows close, how many rows are buffered between folds, what summarising may cost.

    ``max_buffer_bytes`` caps the input buffer for large inputs (images): the
    buffer then holds fewer than ``buffer_rows`` rows, at least one.
    ``max_overhead`` bounds what the recorder adds to each inference, as a
    share of the inference time the caller reports (0.2: at most 20 %), by
    summarising a random sample of the requests; ``None`` summarises every
    request exactly, whatever it costs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_requests: int = Field(default=1000, ge=1)
    max_seconds: float = Field(default=60.0, gt=0)
    buffer_rows: int = Field(default=256, ge=1)
    max_buffer_bytes: int = Field(default=4 << 20, ge=1)
    max_overhead: float | None = Field(default=0.2, gt=0, allow_inf_nan=False)


@dataclass(frozen=True)
class _Layout:
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
    def of(cls, manifest: Manifest) -> _Layout:
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


def _batch_size(inputs: Tensors, name: str | None) -> int:
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
class _Running:
    """The additive state of the open window."""

    layout: _Layout
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
        )


class _Buffer:
    """Rows, counted scores and latencies waiting to be folded into the window."""

    def __init__(self, layout: _Layout, policy: WindowPolicy) -> None:
        self.layout = layout
        row_bytes = sum(
            dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            for _, dtype, shape in layout.inputs
        )
        self.capacity = max(
            1, min(policy.buffer_rows, policy.max_buffer_bytes // max(row_bytes, 1))
        )
        self.inputs = tuple(
            (name, shape, np.empty((self.capacity, *shape), dtype=dtype))
            for name, dtype, shape in layout.inputs
        )
        self.rows = 0
        self.score_width = len(layout.classes)
        self.scores = np.empty((self.capacity, self.score_width), dtype=layout.score_dtype)
        self.score_rows = 0
        self.score_starts: list[int] = []


class _Budget:
    """The share of requests to summarise so that the recorder adds at most ``limit`` to inference.

    Every request costs the recorder ``fixed`` seconds (counting it, keeping its
    latency); a summarised one costs ``summary`` seconds more (checks, the copy
    into the buffer, its share of the folds). With inference taking
    ``inference`` seconds a request, summarising a share ``p`` of the requests
    adds ``fixed + p * summary``: the rate is the largest ``p`` within
    ``limit * inference``, at most 1 and at least :data:`MIN_SAMPLE_RATE`.
    ``summary`` is a moving average (weight :data:`COST_WEIGHT`) of the time
    per summarised request between updates; ``inference`` one of the median
    latency of the last :data:`LATENCY_SAMPLE` requests at each update (the
    typical inference, not the one preempted now and then).
    """

    def __init__(self, limit: float, fixed: float) -> None:
        self.limit = limit
        self.fixed = fixed
        self.latency = 0.0  # seconds a request's share of recording the latency histogram costs
        self.summary: float | None = None
        self.inference: float | None = None
        self._spent = 0.0
        self._summarised = 0

    def summarised(self, spent: float) -> None:
        """Account a summarised request that took ``spent`` seconds to summarise."""
        self._spent += spent
        self._summarised += 1

    def folded(self, spent: float) -> None:
        """Account a fold outside ``record`` (a window closing)."""
        self._spent += spent

    def rate(self, inference: float | None) -> float:
        """Update the estimates with what was accounted since the last call; the rate they allow.

        ``inference`` is the typical inference time now (``None``: no new latency).
        """
        if inference is not None:
            if self.inference is None:
                self.inference = inference
            else:
                self.inference += COST_WEIGHT * (inference - self.inference)
        if n := self._summarised:
            summary = self._spent / n
            if self.summary is None:
                self.summary = summary
            else:
                self.summary += COST_WEIGHT * (summary - self.summary)
            self._spent = 0.0
            self._summarised = 0
        if self.summary is None or self.inference is None:
            return 1.0
        room = self.limit * self.inference - self.fixed - self.latency
        if self.summary <= room:
            return 1.0
        return max(room / self.summary, MIN_SAMPLE_RATE)


class WindowRecorder:
    """Folds answered requests into the current window; hands out closed windows.

    ``manifest`` is the active model's (``None`` before any model is installed:
    requests are then not recorded). ``clock`` gives seconds since the epoch;
    it stamps ``start`` and ``end`` and times windows out. ``timer`` measures
    what summarising costs (a monotonic clock in seconds) and ``seed`` seeds
    the choice of the requests summarised while the policy's ``max_overhead``
    leaves some out. See the module docstring for the rules.
    """

    def __init__(
        self,
        manifest: Manifest | None,
        device_id: str,
        policy: WindowPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        seed: int | None = None,
    ) -> None:
        self.device_id = device_id
        self.policy = policy or WindowPolicy()
        self._max_requests = self.policy.max_requests
        self._clock = clock
        self._timer = timer
        self._random = random.Random(seed)
        self._manifest: Manifest | None = None
        self._layout: _Layout | None = None
        self._buffer: _Buffer | None = None
        self._window: _Running | None = None
        self._cohort_id: str | None = None
        self._plan_id: str | None = None
        self._closed: deque[tuple[_Running, float]] = deque()
        self.dropped_windows = 0
        """Closed windows lost because nobody polled for them (cumulative)."""
        # The fast path's state. It may take the next ``_countdown`` requests
        # without looking at them (``_armed`` when set); _settle() moves what it
        # took into the window.
        self._countdown = 0
        self._armed = 0
        self._served: dict[StageName, int] = dict.fromkeys(STAGE_NAMES, 0)
        self._errors = 0
        self._latencies: list[float] = []
        # Sampling: the next ``_gap`` requests are not summarised, the one after is.
        self._rate = 1.0
        self._gap = 0
        self._folds = 0
        self._fixed_cost = 0.0
        self._budget: _Budget | None = None
        if self.policy.max_overhead is not None:
            self._fixed_cost = self._time_fast_path()
        self.set_manifest(manifest)

    # -- configuration -------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        """The manifest the current window summarises for."""
        return self._manifest

    @property
    def sample_rate(self) -> float:
        """The probability that the next request is summarised (1.0: every request is)."""
        return self._rate

    def set_manifest(self, manifest: Manifest | None) -> None:
        """Summarise for ``manifest`` from now on.

        A different model name, version or baseline closes the current window
        first. Raises :class:`WindowRecordError` for a manifest whose
        derivations do not match its baseline.
        """
        layout = _Layout.of(manifest) if manifest is not None else None
        self._manifest = manifest
        if self._layout is not None and layout is not None and layout.key == self._layout.key:
            return
        self.close_window()
        self._layout = layout
        self._buffer = _Buffer(layout, self.policy) if layout is not None else None
        self._window = self._new_window()
        # What summarising costs next to a new model is not known yet: all, until measured.
        max_overhead = self.policy.max_overhead
        self._budget = _Budget(max_overhead, self._fixed_cost) if max_overhead else None
        self._rate, self._gap = 1.0, 0

    def set_cohort(self, cohort_id: str | None, plan_id: str | None = None) -> None:
        """Label windows from now on with a rollout cohort and plan; a change closes the window."""
        if (cohort_id, plan_id) == (self._cohort_id, self._plan_id):
            return
        self.close_window()
        self._cohort_id, self._plan_id = cohort_id, plan_id
        self._window = self._new_window()

    # -- the serving path ----------------------------------------------------

    def record(
        self,
        inputs: Tensors,
        outputs: Tensors,
        stage: StageName,
        latency_s: float,
        *,
        model_version: str | None = None,
        error: bool = False,
    ) -> None:
        """Count one answered request in the current window, and summarise it if it is chosen.

        ``inputs`` are the validated model inputs and ``outputs`` the answer's,
        each ``[batch, ...]``; ``stage`` and ``model_version`` say who answered
        (``None``: the window's own model); ``error`` marks an answer the caller
        counts as failed. Raises :class:`WindowRecordError`, leaving the window
        as it was, for a request that does not fit the manifest (a request left
        out of the summaries is not looked at, so it is refused only for its
        stage or latency).
        """
        if self._countdown and 0.0 <= latency_s < _INF:
            # The fast path, for a request left out of the summaries: a handful
            # of attribute operations; _settle() adds them to the window later.
            try:
                self._served[stage] += 1
            except KeyError:
                raise WindowRecordError(_unknown_stage(stage)) from None
            self._countdown -= 1
            self._latencies.append(latency_s)
            if error:
                self._errors += 1
            return
        # The full path. What it costs a summarised request is timed, from here.
        budget, folds = self._budget, self._folds
        start = self._timer() if budget is not None else 0.0
        # Checks first, so that a request refused changes nothing.
        window, buffer = self._window, self._buffer
        if window is None or buffer is None:
            raise WindowRecordError("no model is installed: there is no window to record into")
        if not 0.0 <= latency_s < _INF:
            raise WindowRecordError(f"latency must be a finite number >= 0, got {latency_s!r}")
        served = window.served
        if stage not in served:
            raise WindowRecordError(_unknown_stage(stage))
        if self._armed:
            self._settle(window)
        summarised = not self._gap
        if summarised:
            self._summarise(window, buffer, inputs, outputs, stage, model_version, error)
        else:
            self._gap -= 1
            window.unsummarised += 1
        if window.start is None:
            window.start = self._clock()
        served[stage] += 1
        window.requests += 1
        if error:
            window.errors += 1
        latencies = self._latencies
        latencies.append(latency_s)
        if len(latencies) >= LATENCY_BUFFER:
            self._fold_latencies(window)
        if summarised and budget is not None:
            budget.summarised(self._timer() - start)
            if self._folds != folds:
                self._update_rate(budget)
            self._gap = self._draw_gap()
        if window.requests >= self._max_requests:
            self._close_window(None, full=True)
        elif self._gap:
            self._arm(window)

    def _summarise(
        self,
        window: _Running,
        buffer: _Buffer,
        inputs: Tensors,
        outputs: Tensors,
        stage: StageName,
        model_version: str | None,
        error: bool,
    ) -> None:
        """Put a request's rows and scores into the buffer (or fold them, if it is larger).

        Checks first, so a request that does not fit the manifest changes nothing.
        """
        layout = buffer.layout
        slots = buffer.inputs
        first_input = inputs.get(slots[0][0]) if slots else None
        if isinstance(first_input, np.ndarray) and first_input.ndim:
            rows = first_input.shape[0]
        else:
            rows = _batch_size(inputs, slots[0][0] if slots else None)
        start = buffer.rows
        end = start + rows
        if end > buffer.capacity and start:
            self._fold()
            start, end = 0, rows
        direct = rows > buffer.capacity
        # Rows are copied past the buffer's cursor while they are checked; the
        # cursor moves only once every check passed.
        named: dict[str, npt.NDArray[Any]] | None = {} if direct else None
        for name, shape, target in slots:
            value = inputs.get(name)
            if value is None:
                raise WindowRecordError(f"input {name!r} is missing")
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.ndim == 0 or array.shape[0] != rows or array.shape[1:] != shape:
                expected = ", ".join(map(str, (rows, *shape)))
                raise WindowRecordError(
                    f"input {name!r} has shape {list(array.shape)}, expected [{expected}]"
                )
            if named is not None:
                named[name] = array
            else:
                target[start:end] = array
        scores = None
        score_name = layout.score_output
        if (
            score_name is not None
            and not error
            and stage in _MODEL_STAGES
            and (model_version is None or model_version == layout.version)
        ):
            value = outputs.get(score_name)
            if value is None:
                raise WindowRecordError(f"output {score_name!r} is missing")
            scores = value if isinstance(value, np.ndarray) else np.asarray(value)
            width = buffer.score_width
            if scores.shape != (rows, width):
                if scores.ndim == 0 or scores.size != rows * width:
                    raise WindowRecordError(
                        f"output {score_name!r} has shape {list(scores.shape)}, "
                        f"expected [{rows}, {width}]"
                    )
                scores = scores.reshape(rows, width)
            if not direct:
                first_score = buffer.score_rows
                buffer.scores[first_score : first_score + rows] = scores

        if named is not None:
            # Larger than the buffer: folded straight from the request's arrays,
            # a buffer's worth of rows at a time to bound the temporaries.
            if layout.features:
                for first in range(0, rows, buffer.capacity):
                    chunk = {k: a[first : first + buffer.capacity] for k, a in named.items()}
                    window.fold_rows(derive_features(layout.derivations, chunk))
            if scores is not None:
                window.fold_scores(scores, [0])
            self._folds += 1
        elif rows:
            buffer.rows = end
            if scores is not None:
                buffer.score_starts.append(first_score)
                buffer.score_rows = first_score + rows

    def record_error(self, latency_s: float | None = None) -> None:
        """Count a request that got no answer (the chain could not serve it) as an error.

        Ignored while no model is installed: such a request belongs to no model version.
        """
        window = self._window
        if window is None:
            return
        self._settle(window)
        if window.start is None:
            window.start = self._clock()
        if latency_s is not None and 0.0 <= latency_s < _INF:
            self._latencies.append(latency_s)
            if len(self._latencies) >= LATENCY_BUFFER:
                self._fold_latencies(window)
        window.requests += 1
        window.errors += 1
        if window.requests >= self._max_requests:
            self._close_window(None, full=True)
        elif self._gap:
            self._arm(window)

    def _settle(self, window: _Running) -> None:
        """Move the requests the fast path took into the window; the fast path stops."""
        if taken := self._armed - self._countdown:
            window.requests += taken
            window.unsummarised += taken
            window.errors += self._errors
            self._gap -= taken
        self._errors = self._armed = self._countdown = 0

    def _arm(self, window: _Running) -> None:
        """Let the fast path take the requests before the next one that needs the full path.

        That is the next request to summarise, the one that fills the latency
        buffer and the one that fills the window; and a window's first request,
        which opens it.
        """
        self._served = window.served
        if window.start is None:
            return
        room = min(
            self._gap,
            LATENCY_BUFFER - 1 - len(self._latencies),
            self._max_requests - 1 - window.requests,
        )
        self._armed = self._countdown = max(room, 0)

    def _update_rate(self, budget: _Budget) -> None:
        recent = sorted(self._latencies[-LATENCY_SAMPLE:])
        self._rate = budget.rate(recent[len(recent) // 2] if recent else None)

    def _draw_gap(self) -> int:
        """Requests to leave out before the next summarised one.

        Geometric, so that every request is summarised with probability
        ``_rate`` independently of the others and of its values, without a
        random draw per request.
        """
        if self._rate >= 1.0:
            return 0
        return int(math.log(1.0 - self._random.random()) / math.log1p(-self._rate))

    def _fold_latencies(self, window: _Running) -> None:
        """Record the :data:`LATENCY_BUFFER` latencies held into a window that has more."""
        latencies, budget = self._latencies, self._budget
        start = self._timer() if budget is not None else 0.0
        window.fold_latencies(np.array(latencies, dtype=np.float64))
        if budget is not None:
            budget.latency = (self._timer() - start) / len(latencies)
        latencies.clear()

    def _time_fast_path(self) -> float:
        """Seconds ``record`` takes for a request it does not summarise, measured here.

        It runs the fast path a few hundred times on stand-in counters: what
        every request costs is the floor under the budget for summarising.
        """
        best = _INF
        for _ in range(3):
            self._served = dict.fromkeys(STAGE_NAMES, 0)
            self._armed = self._countdown = _TIMED_CALLS
            start = self._timer()
            for _ in range(_TIMED_CALLS):
                self.record(_NO_TENSORS, _NO_TENSORS, "active", 0.0)
            best = min(best, (self._timer() - start) / _TIMED_CALLS)
        self._served = dict.fromkeys(STAGE_NAMES, 0)
        self._latencies.clear()
        self._errors = self._armed = self._countdown = 0
        return max(best, 0.0)

    # -- closing -------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Requests in the current window so far."""
        window = self._window
        return window.requests + self._armed - self._countdown if window is not None else 0

    def poll(self, now: float | None = None) -> WindowSummary | None:
        """The oldest closed window not handed out yet, closing the current one if its time is up.

        Call it periodically (every second or so) and until it returns ``None``.
        """
        window = self._window
        if window is not None and window.start is not None:
            now = self._clock() if now is None else now
            if now - window.start >= self.policy.max_seconds:
                self._close_window(now, full=False)
        if not self._closed:
            return None
        closed, end = self._closed.popleft()
        return closed.summary(uuid.uuid4().hex, self.device_id, end)

    def close_window(self, now: float | None = None) -> None:
        """Close the current window now if it holds any request (e.g. before shutdown)."""
        self._close_window(now, full=False)

    def _close_window(self, now: float | None, *, full: bool) -> None:
        """Close the current window; ``full``: it holds ``max_requests`` requests.

        The last fold of a full window is a cost of its requests (they come
        faster than ``max_requests`` a ``max_seconds``): it counts against the
        budget. A window closed by time or for a new model or cohort pays it
        once per window however few its requests, so it does not: a device
        with little traffic is not held to a small sample to save it.
        """
        window = self._window
        if window is None:
            return
        self._settle(window)
        budget, buffer = self._budget, self._buffer
        if budget is not None and full and buffer is not None and buffer.rows + buffer.score_rows:
            start = self._timer()
            self._fold()
            budget.folded(self._timer() - start)
        else:
            self._fold()
        if budget is not None:
            self._update_rate(budget)
            self._gap = self._draw_gap()
        if window.requests == 0:
            window.start = None
            return
        # Recording latencies into the histogram costs about 0.1 ms however few they
        # are: poll() does it when it hands the window out, off the serving path.
        window.latencies, self._latencies = self._latencies, []
        if len(self._closed) == MAX_CLOSED_WINDOWS:
            self._closed.popleft()
            self.dropped_windows += 1
            logger.warning("telemetry: a closed window was dropped; nobody collected it")
        self._closed.append((window, self._clock() if now is None else now))
        self._window = self._new_window()

    def _new_window(self) -> _Running | None:
        if self._layout is None:
            return None
        return _Running(self._layout, self._cohort_id, self._plan_id)

    def _fold(self) -> None:
        """Fold the buffered rows and scores into the current window."""
        window, buffer, layout = self._window, self._buffer, self._layout
        if window is None or buffer is None or layout is None:
            return
        if not (buffer.rows or buffer.score_rows):
            return
        self._folds += 1
        if buffer.rows and layout.features:
            rows = buffer.rows
            named = {name: target[:rows] for name, _, target in buffer.inputs}
            window.fold_rows(derive_features(layout.derivations, named))
        buffer.rows = 0
        if buffer.score_rows:
            window.fold_scores(buffer.scores[: buffer.score_rows], buffer.score_starts)
            buffer.score_rows = 0
            buffer.score_starts = []


def _unknown_stage(stage: object) -> str:
    return f"unknown stage {stage!r}; stages are {list(STAGE_NAMES)}"
