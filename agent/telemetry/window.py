"""The device's window summaries: every answered request, counted in the current window.

Rules:

1. A window belongs to one model (name and version) and one baseline: its
   features are counted in that baseline's bins. :meth:`WindowRecorder.set_manifest`
   with a different model version or baseline closes the current window first,
   so a summary never mixes model versions; :meth:`WindowRecorder.set_cohort`
   does the same for a rollout cohort and plan.
2. :meth:`WindowRecorder.record` is on the serving path and does no per-value
   Python work: it copies a summarised request's rows into a preallocated
   buffer, folded into the window with a few numpy calls over all its rows
   (:mod:`agent.telemetry.fold`); the summaries equal
   :func:`protocol.summary.summarize` over the same rows.
3. Every request is counted, summarised or not: ``requests``, ``served`` per
   stage, ``errors``, and its latency, kept in a list and recorded into the
   window's base-2 exponential histogram (:func:`protocol.histogram.record`)
   when :meth:`~WindowRecorder.poll` hands the window out (or every
   :data:`LATENCY_BUFFER` requests).
4. What summarising may cost is bounded by the policy's ``max_overhead``, a
   share of the inference time: each request is summarised with the
   probability ``p`` that :mod:`agent.telemetry.budget` allows, measured with
   ``timer``. ``p`` starts at 1 for every new model and is updated after every
   fold and window close. The last fold of a window counts when requests
   filled the window; a window closed by time pays it once per
   ``max_seconds`` however quiet the device, and a quiet device is not held to
   a small sample for it. Which requests are summarised is drawn at random
   (from ``seed``), independently of their values: the features and the score
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
7. A shadow model's results (:meth:`WindowRecorder.record_shadow`, from
   :mod:`agent.serving.shadow`) are counted in the window open when they
   arrive, as its ``shadow`` section; a window in which no shadow ran has
   none. A result of another shadow bundle than the window's closes the
   window first, so a section never mixes two shadows.
8. While the device follows a hybrid plan, every answered request carries
   its :class:`~agent.serving.hybrid.Route` (``record(..., hybrid=)``) and is
   counted once in the window's ``hybrid`` section
   (:class:`protocol.hybrid.HybridSummary`): local, escalated or kept local
   for quota, cloud answers, cloud errors by kind, agreement, local and cloud
   latency, the calibrated-confidence histogram. The window is labelled with
   the plan's id (``plan_id``); a request under another plan, or under none
   after one, closes the window first, so a window never mixes plans. An
   audit's result (:meth:`WindowRecorder.record_audit`) is counted in the
   window open when it arrives if that window follows the audit's plan, and
   dropped otherwise (the plan changed while it was under way).
9. Closed windows wait in a queue until :meth:`~WindowRecorder.poll` hands them
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
from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.serving.hybrid import AuditResult, Route, confidence_bin
from agent.telemetry.budget import LATENCY_SAMPLE, SamplingBudget, geometric_gap
from agent.telemetry.fold import (
    HybridTally,
    RowBuffer,
    RunningWindow,
    ShadowTally,
    Tensors,
    WindowLayout,
    WindowRecordError,
    batch_size,
)
from protocol.derivation import derive_features
from protocol.inference import STAGE_NAMES, StageName
from protocol.manifest import Manifest
from protocol.window import WindowSummary

logger = logging.getLogger(__name__)

# Closed windows kept for poll(); at one window a minute that is an hour of
# windows nobody collected, and the outbox is the place for a longer backlog.
MAX_CLOSED_WINDOWS: Final = 64
# Latencies are recorded per window, not per fold (recording the concatenation
# and merging give the same buckets); this many are held between recordings.
LATENCY_BUFFER: Final = 4096
_MODEL_STAGES: Final = frozenset({"active", "previous"})
_INF: Final = math.inf
_TIMED_CALLS: Final = 256  # fast-path calls timed at start-up, three times over; the best counts
_NO_TENSORS: Final[Mapping[str, npt.ArrayLike]] = {}


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
        self._layout: WindowLayout | None = None
        self._buffer: RowBuffer | None = None
        self._window: RunningWindow | None = None
        self._cohort_id: str | None = None
        self._plan_id: str | None = None
        self._hybrid_plan: str | None = None  # the plan the requests were last routed by
        self.dropped_audits = 0
        """Audit results that arrived after their plan's window had closed (cumulative)."""
        self._closed: deque[tuple[RunningWindow, float]] = deque()
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
        self._budget: SamplingBudget | None = None
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
        layout = WindowLayout.of(manifest) if manifest is not None else None
        self._manifest = manifest
        if self._layout is not None and layout is not None and layout.key == self._layout.key:
            return
        self.close_window()
        self._layout = layout
        self._buffer = (
            RowBuffer(layout, self.policy.buffer_rows, self.policy.max_buffer_bytes)
            if layout is not None
            else None
        )
        self._window = self._new_window()
        # What summarising costs next to a new model is not known yet: all, until measured.
        max_overhead = self.policy.max_overhead
        self._budget = SamplingBudget(max_overhead, self._fixed_cost) if max_overhead else None
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
        hybrid: Route | None = None,
    ) -> None:
        """Count one answered request in the current window, and summarise it if it is chosen.

        ``inputs`` are the validated model inputs and ``outputs`` the answer's,
        each ``[batch, ...]``; ``stage`` and ``model_version`` say who answered
        (``None``: the window's own model); ``error`` marks an answer the caller
        counts as failed. Raises :class:`WindowRecordError`, leaving the window
        as it was, for a request that does not fit the manifest (a request left
        out of the summaries is not looked at, so it is refused only for its
        stage or latency). ``hybrid`` is how a hybrid plan routed it (rule 8).
        """
        if hybrid is not None or self._hybrid_plan is not None:
            plan_id = hybrid.plan_id if hybrid is not None else None
            if plan_id != self._hybrid_plan:
                self._hybrid_plan = plan_id
                self.set_cohort(self._cohort_id, plan_id)
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
            if hybrid is not None and self._window is not None:
                _tally(self._window, hybrid)
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
        if hybrid is not None:
            _tally(window, hybrid)
        latencies = self._latencies
        latencies.append(latency_s)
        if len(latencies) >= LATENCY_BUFFER:
            self._fold_latencies(window)
        if summarised and budget is not None:
            budget.summarised(self._timer() - start)
            if self._folds != folds:
                self._update_rate(budget)
            self._gap = geometric_gap(self._rate, self._random)
        if window.requests >= self._max_requests:
            self._close_window(None, full=True)
        elif self._gap:
            self._arm(window)

    def _summarise(
        self,
        window: RunningWindow,
        buffer: RowBuffer,
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
            rows = batch_size(inputs, slots[0][0] if slots else None)
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

    def record_shadow(
        self, bundle_id: str, model_version: str, *, agreed: bool, error: bool, latency_s: float
    ) -> None:
        """Count one request a shadow model ran on: agreed with the answer served, or failed.

        Ignored while no model is installed. Raises :class:`WindowRecordError`
        for a latency that is not a finite number >= 0, or an agreement that
        is also an error.
        """
        if not 0.0 <= latency_s < _INF:
            raise WindowRecordError(f"latency must be a finite number >= 0, got {latency_s!r}")
        if agreed and error:
            raise WindowRecordError("a shadow run cannot both agree and fail")
        window = self._window
        if window is None:
            return
        tally = window.shadow
        if tally is not None and tally.bundle_id != bundle_id:
            # A window without requests stays open (and its old tally is replaced).
            self._close_window(None, full=False)
            window = self._window
            assert window is not None
            tally = None
        if tally is None:
            tally = window.shadow = ShadowTally(bundle_id, model_version)
        tally.requests += 1
        tally.agreements += agreed
        tally.errors += error
        tally.latencies.append(latency_s)

    def record_audit(self, result: AuditResult) -> None:
        """Count one audit's outcome in the open window, if it follows the audit's plan (rule 8)."""
        window = self._window
        if window is None:
            return
        if result.plan_id != self._plan_id:
            self.dropped_audits += 1
            return
        tally = window.hybrid
        if tally is None:
            tally = window.hybrid = HybridTally(result.plan_id, result.mode)
        tally.audits += 1
        tally.error(result.cloud_error)
        if result.cloud_latency_s is not None:
            tally.cloud_latencies.append(result.cloud_latency_s)
        if result.agreed is not None:
            tally.audit_compared += 1
            tally.audit_agreements += result.agreed
            tally.audit_confidence_sum += min(max(result.confidence, 0.0), 1.0)

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

    def _settle(self, window: RunningWindow) -> None:
        """Move the requests the fast path took into the window; the fast path stops."""
        if taken := self._armed - self._countdown:
            window.requests += taken
            window.unsummarised += taken
            window.errors += self._errors
            self._gap -= taken
        self._errors = self._armed = self._countdown = 0

    def _arm(self, window: RunningWindow) -> None:
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

    def _update_rate(self, budget: SamplingBudget) -> None:
        recent = sorted(self._latencies[-LATENCY_SAMPLE:])
        self._rate = budget.rate(recent[len(recent) // 2] if recent else None)

    def _fold_latencies(self, window: RunningWindow) -> None:
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
            self._gap = geometric_gap(self._rate, self._random)
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

    def _new_window(self) -> RunningWindow | None:
        if self._layout is None:
            return None
        return RunningWindow(self._layout, self._cohort_id, self._plan_id)

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


def _tally(window: RunningWindow, route: Route) -> None:
    """Count one routed request in the window's hybrid section."""
    tally = window.hybrid
    if tally is None:
        tally = window.hybrid = HybridTally(route.plan_id, route.mode)
    name = route.route
    if name == "local":
        tally.local += 1
    elif name == "escalated":
        tally.escalated += 1
        if route.cloud_latency_s is not None:
            tally.cloud_answered += 1
            tally.cloud_latencies.append(route.cloud_latency_s)
        if route.agreed is not None:
            tally.escalated_compared += 1
            tally.escalated_agreements += route.agreed
    else:
        tally.kept_local_quota += 1
    if route.cloud_error is not None:
        tally.error(route.cloud_error)
    if route.confidence is not None:
        tally.confidence[confidence_bin(route.confidence)] += 1
    if route.local_latency_s is not None:
        tally.local_latencies.append(route.local_latency_s)


def _unknown_stage(stage: object) -> str:
    return f"unknown stage {stage!r}; stages are {list(STAGE_NAMES)}"
