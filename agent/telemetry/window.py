"""The device's window summaries: every answered request, folded into the current window.

Rules:

1. A window belongs to one model (name and version) and one baseline: its
   features are counted in that baseline's bins. :meth:`WindowRecorder.set_manifest`
   with a different model version or baseline closes the current window first,
   so a summary never mixes model versions; :meth:`WindowRecorder.set_cohort`
   does the same for a rollout cohort and plan.
2. :meth:`WindowRecorder.record` is on the serving path and does no per-value
   Python work: it copies the request's rows into a preallocated buffer. Every
   ``buffer_rows`` rows (and when a window closes) the buffer is folded into the
   window with a few numpy calls over all its rows: derived features
   (:func:`protocol.derivation.derive_features`), NaN and out-of-range counts,
   one sort per feature for baseline bin counts, min and max, moments merged
   with Chan's formula, the top-score histogram. Latencies are kept per request
   and recorded into the window's base-2 exponential histogram
   (:func:`protocol.histogram.record`) when the window closes (or every
   :data:`LATENCY_BUFFER` requests). The result equals :func:`protocol.summary.summarize` over the
   same rows: counts, ``min`` and ``max`` exactly, ``mean`` and ``m2`` to
   floating-point rounding.
3. A window opens with its first request (``start``) and closes when it holds
   ``max_requests`` requests (at once, inside ``record``) or, on
   :meth:`~WindowRecorder.poll`, when ``max_seconds`` have passed since it opened.
   A window without requests is never closed or uploaded: it has nothing to
   say, and the heartbeat already tells the server the device is alive.
4. The top-score histogram counts only the answers of the window's own model
   (stages ``active`` and ``previous`` serving that version); answers of another
   version, the cloud or the safe default are counted in ``served`` only. A
   counted answer whose scores are NaN or Inf is an error, and its rows stay out
   of the histogram.
5. Closed windows wait in a queue until :meth:`~WindowRecorder.poll` hands them
   out, each with a fresh id (uuid4). The queue is bounded
   (:data:`MAX_CLOSED_WINDOWS`); if nobody collects them the oldest go and are
   counted (:attr:`~WindowRecorder.dropped_windows`).

The recorder is used from one thread (the event loop); it keeps no lock.
"""

from __future__ import annotations

import logging
import math
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
_MODEL_STAGES: Final = frozenset({"active", "previous"})

Tensors = Mapping[str, npt.ArrayLike]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class WindowRecordError(ValueError):
    """A request the recorder cannot summarise: inputs or outputs that break the manifest."""


class WindowPolicy(BaseModel):
    """When windows close and how many rows are buffered between folds.

    ``max_buffer_bytes`` caps the input buffer for large inputs (images): the
    buffer then holds fewer than ``buffer_rows`` rows, at least one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_requests: int = Field(default=1000, ge=1)
    max_seconds: float = Field(default=60.0, gt=0)
    buffer_rows: int = Field(default=256, ge=1)
    max_buffer_bytes: int = Field(default=4 << 20, ge=1)


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
    served: dict[StageName, int] = field(default_factory=lambda: dict.fromkeys(STAGE_NAMES, 0))
    n: I64 = field(init=False)
    nan: I64 = field(init=False)
    out_of_range: I64 = field(init=False)
    mean: F64 = field(init=False)
    m2: F64 = field(init=False)
    low: F64 = field(init=False)
    high: F64 = field(init=False)
    counts: I64 = field(init=False)
    scores: I64 = field(init=False)
    latency: ExponentialHistogram = field(default_factory=ExponentialHistogram)

    def __post_init__(self) -> None:
        k = self.layout.features
        self.n = np.zeros(k, dtype=np.int64)
        self.nan = np.zeros(k, dtype=np.int64)
        self.out_of_range = np.zeros(k, dtype=np.int64)
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
        self.latencies = np.empty(min(policy.max_requests, LATENCY_BUFFER), dtype=np.float64)
        self.latency_count = 0


class WindowRecorder:
    """Folds every answered request into the current window; hands out closed windows.

    ``manifest`` is the active model's (``None`` before any model is installed:
    requests are then not recorded). ``clock`` gives seconds since the epoch;
    it stamps ``start`` and ``end`` and times windows out. See the module
    docstring for the rules.
    """

    def __init__(
        self,
        manifest: Manifest | None,
        device_id: str,
        policy: WindowPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.policy = policy or WindowPolicy()
        self._max_requests = self.policy.max_requests
        self._clock = clock
        self._manifest: Manifest | None = None
        self._layout: _Layout | None = None
        self._buffer: _Buffer | None = None
        self._window: _Running | None = None
        self._cohort_id: str | None = None
        self._plan_id: str | None = None
        self._closed: deque[tuple[_Running, float]] = deque()
        self.dropped_windows = 0
        """Closed windows lost because nobody polled for them (cumulative)."""
        self.set_manifest(manifest)

    # -- configuration -------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        """The manifest the current window summarises for."""
        return self._manifest

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
        """Fold one answered request into the current window.

        ``inputs`` are the validated model inputs and ``outputs`` the answer's,
        each ``[batch, ...]``; ``stage`` and ``model_version`` say who answered
        (``None``: the window's own model); ``error`` marks an answer the caller
        counts as failed. Raises :class:`WindowRecordError`, leaving the window
        as it was, for a request that does not fit the manifest.
        """
        # This runs for every request: checks first (so a bad request changes
        # nothing), then a copy into the buffer and a few counters.
        window, buffer = self._window, self._buffer
        if window is None or buffer is None:
            raise WindowRecordError("no model is installed: there is no window to record into")
        if not 0.0 <= latency_s < math.inf:
            raise WindowRecordError(f"latency must be a finite number >= 0, got {latency_s!r}")
        served = window.served
        if stage not in served:
            raise WindowRecordError(f"unknown stage {stage!r}; stages are {list(STAGE_NAMES)}")
        layout = buffer.layout
        slots = buffer.inputs
        if slots and isinstance(first_input := inputs.get(slots[0][0]), np.ndarray):
            rows = first_input.shape[0] if first_input.ndim else _batch_size(inputs, None)
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

        if window.start is None:
            window.start = self._clock()
        if named is not None:
            # Larger than the buffer: folded straight from the request's arrays,
            # a buffer's worth of rows at a time to bound the temporaries.
            if layout.features:
                for first in range(0, rows, buffer.capacity):
                    chunk = {k: a[first : first + buffer.capacity] for k, a in named.items()}
                    window.fold_rows(derive_features(layout.derivations, chunk))
            if scores is not None:
                window.fold_scores(scores, [0])
        elif rows:
            buffer.rows = end
            if scores is not None:
                buffer.score_starts.append(first_score)
                buffer.score_rows = first_score + rows
        held = buffer.latency_count
        if held == buffer.latencies.size:
            window.fold_latencies(buffer.latencies)
            held = 0
        buffer.latencies[held] = latency_s
        buffer.latency_count = held + 1
        window.requests += 1
        served[stage] += 1
        if error:
            window.errors += 1
        if window.requests >= self._max_requests:
            self.close_window()

    def record_error(self, latency_s: float | None = None) -> None:
        """Count a request that got no answer (the chain could not serve it) as an error.

        Ignored while no model is installed: such a request belongs to no model version.
        """
        window, buffer = self._window, self._buffer
        if window is None or buffer is None:
            return
        if window.start is None:
            window.start = self._clock()
        if latency_s is not None and 0.0 <= latency_s < math.inf:
            self._latency(latency_s)
        window.requests += 1
        window.errors += 1
        if window.requests >= self._max_requests:
            self.close_window()

    # -- closing -------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Requests in the current window so far."""
        return self._window.requests if self._window is not None else 0

    def poll(self, now: float | None = None) -> WindowSummary | None:
        """The oldest closed window not handed out yet, closing the current one if its time is up.

        Call it periodically (every second or so) and until it returns ``None``.
        """
        window = self._window
        if window is not None and window.start is not None:
            now = self._clock() if now is None else now
            if now - window.start >= self.policy.max_seconds:
                self.close_window(now)
        if not self._closed:
            return None
        closed, end = self._closed.popleft()
        return closed.summary(uuid.uuid4().hex, self.device_id, end)

    def close_window(self, now: float | None = None) -> None:
        """Close the current window now if it holds any request (e.g. before shutdown)."""
        window = self._window
        if window is None:
            return
        self._fold()
        if window.requests == 0:
            window.start = None
            return
        buffer = self._buffer
        if buffer is not None and buffer.latency_count:
            window.fold_latencies(buffer.latencies[: buffer.latency_count])
            buffer.latency_count = 0
        if len(self._closed) == MAX_CLOSED_WINDOWS:
            self._closed.popleft()
            self.dropped_windows += 1
            logger.warning("telemetry: a closed window was dropped; nobody collected it")
        self._closed.append((window, self._clock() if now is None else now))
        self._window = self._new_window()

    def _latency(self, seconds: float) -> None:
        buffer, window = self._buffer, self._window
        assert buffer is not None and window is not None
        held = buffer.latency_count
        if held == buffer.latencies.size:
            window.fold_latencies(buffer.latencies)
            held = 0
        buffer.latencies[held] = seconds
        buffer.latency_count = held + 1

    def _new_window(self) -> _Running | None:
        if self._layout is None:
            return None
        return _Running(self._layout, self._cohort_id, self._plan_id)

    def _fold(self) -> None:
        """Fold the buffered rows and scores into the current window."""
        window, buffer, layout = self._window, self._buffer, self._layout
        if window is None or buffer is None or layout is None:
            return
        if buffer.rows and layout.features:
            rows = buffer.rows
            named = {name: target[:rows] for name, _, target in buffer.inputs}
            window.fold_rows(derive_features(layout.derivations, named))
        buffer.rows = 0
        if buffer.score_rows:
            window.fold_scores(buffer.scores[: buffer.score_rows], buffer.score_starts)
            buffer.score_rows = 0
            buffer.score_starts = []
