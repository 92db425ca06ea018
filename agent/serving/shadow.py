"""A shadow model beside the active one: run on a share of requests, its answers never served.

Rules:

1. Only a request the active model answered is offered (the comparison is
   with the active model), and only after its answer was computed: the
   shadow never changes an answer, delays it, or fails a request — whatever
   it does, the answer is already made.
2. Each offered request runs with probability ``share``, drawn at random
   independently of the request.
3. Bounded work: at most ``max_in_flight`` shadow runs at once. A shadow
   faster than ``inline_below_s`` (its moving average, measured as the
   chain's model stages measure theirs) runs on the event loop right after
   the answer is made; a slower one (and the first run, of unknown cost, or
   one beside another run) in a worker thread. A request drawn while the
   shadow is that busy is skipped and counted (:attr:`ShadowRunner.skipped`);
   nothing queues.
4. A run is compared with the answer served (:func:`compare`): it *agrees*
   when, for a classifier (the manifest names a ``confidence_output``), every
   row has the same top class; for other outputs, when every value is within
   the shadow manifest's golden tolerance of the served one
   (``atol + rtol * |served|``). It is an *error* when the runtime raised, an
   output is missing or of the wrong shape, or not finite. Its latency is the
   shadow's own run time.
5. Each result goes to ``on_result``, which counts it in the window
   (:meth:`agent.telemetry.WindowRecorder.record_shadow`).

The shadow gets the inputs the active model's contract validated: a shadow
whose inputs differ from the active model's fails on every request it runs,
and each failure is counted as an error — which is what a rollout's gates
should see of such a release.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from model_runtime import LoadedModel
from protocol.manifest import Manifest

logger = logging.getLogger(__name__)

Tensors = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class ShadowResult:
    """One shadow run: which shadow, whether it agreed with the answer served or failed."""

    bundle_id: str
    model_version: str
    agreed: bool
    error: bool
    latency_s: float
    reason: str | None = None  # why it disagreed or failed


ResultListener = Callable[[ShadowResult], None]


def compare(
    manifest: Manifest, served: Tensors, shadow: Mapping[str, Any]
) -> tuple[bool, bool, str | None]:
    """``(agreed, error, reason)`` of a shadow's outputs against the served ones (rule 4)."""
    checked: dict[str, npt.NDArray[np.float64]] = {}
    for spec in manifest.outputs:
        if spec.name not in shadow:
            return False, True, f"gave no output {spec.name!r}"
        array = np.asarray(shadow[spec.name])
        want = served.get(spec.name)
        if want is None or array.shape != np.shape(want):
            return False, True, f"output {spec.name!r} has shape {list(array.shape)}"
        if array.dtype.kind not in "fbiu":
            return False, True, f"output {spec.name!r} is not numeric ({array.dtype})"
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            return False, True, f"output {spec.name!r} is NaN or Inf"
        checked[spec.name] = values
    scores = manifest.fallback.confidence_output
    if scores is not None and scores in checked:
        rows = checked[scores].shape[0]
        mine = checked[scores].reshape(rows, -1).argmax(axis=1)
        theirs = np.asarray(served[scores], dtype=np.float64).reshape(rows, -1).argmax(axis=1)
        if np.array_equal(mine, theirs):
            return True, False, None
        return False, False, f"top class differs in {int((mine != theirs).sum())} of {rows} rows"
    atol, rtol = manifest.golden.atol, manifest.golden.rtol
    for name, values in checked.items():
        want = np.asarray(served[name], dtype=np.float64)
        if np.any(np.abs(values - want) > atol + rtol * np.abs(want)):
            return False, False, f"output {name!r} differs beyond atol {atol:g} + rtol {rtol:g}"
    return True, False, None


# A shadow faster than this runs on the event loop right after the answer is made
# (adding its run time to that request's response); a slower one in a worker thread.
# Lower than the chain's own threshold: the shadow's time is pure overhead.
SHADOW_INLINE_BELOW_S = 0.002


class ShadowRunner:
    """Runs one shadow model on a share of the active model's answered requests.

    Used from the event loop: :meth:`offer` never raises. A run in a worker
    thread starts at once (not in a task, which keep-alive traffic answered
    back to back could starve) and counts as in flight until its thread is done.
    """

    def __init__(
        self,
        bundle_id: str,
        manifest: Manifest,
        model: LoadedModel,
        *,
        share: float,
        on_result: ResultListener,
        max_in_flight: int = 1,
        inline_below_s: float = SHADOW_INLINE_BELOW_S,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, not {share!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight!r}")
        self.bundle_id = bundle_id
        self.manifest = manifest
        self.model = model
        self.share = share
        self.max_in_flight = max_in_flight
        self._on_result = on_result
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0  # runs whose thread has not finished (under _lock)
        self._pending: set[asyncio.Future[ShadowResult]] = set()
        self._closed = False
        self._inline_below_s = inline_below_s
        self._average_s: float | None = None
        self.offered = 0
        """Requests offered (answered by the active model), since the shadow was loaded."""
        self.ran = 0
        """Requests the shadow ran on."""
        self.skipped = 0
        """Requests drawn while the shadow was busy with ``max_in_flight`` runs: not run."""

    @property
    def version(self) -> str:
        return self.manifest.version

    def offer(self, inputs: Tensors, served: Tensors, stage: str) -> bool:
        """Maybe run the shadow on ``inputs`` (rules 1-3); whether it ran or started a run."""
        if self._closed or stage != "active":
            return False
        self.offered += 1
        if self.share < 1.0 and self._random.random() >= self.share:
            return False
        with self._lock:
            busy = self._in_flight
            if busy >= self.max_in_flight:
                self.skipped += 1
                return False
            self._in_flight += 1
        self.ran += 1
        average = self._average_s
        # Inline only when no other run is under way: the model's lock must never block the loop.
        if not busy and average is not None and average < self._inline_below_s:
            self._report(self._run(inputs, served))
            return True
        future = asyncio.get_running_loop().run_in_executor(None, self._run, inputs, served)
        self._pending.add(future)
        future.add_done_callback(self._finished)
        return True

    async def idle(self) -> None:
        """Wait until no shadow run is under way and every result is reported."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            await asyncio.sleep(0)  # the done callbacks

    def close(self) -> None:
        """Stop offering requests; runs under way finish, their results are dropped."""
        self._closed = True

    def _run(self, inputs: Tensors, served: Tensors) -> ShadowResult:
        """Run the shadow and compare (on the loop or in a worker thread); never raises."""
        try:
            started = time.perf_counter()
            try:
                outputs = self.model.run(inputs)
            except Exception as exc:  # any failure of the shadow is counted, never raised
                elapsed = time.perf_counter() - started
                why = f"{type(exc).__name__}: {exc}"
                return ShadowResult(self.bundle_id, self.version, False, True, elapsed, why)
            elapsed = time.perf_counter() - started
            average = self._average_s
            self._average_s = elapsed if average is None else 0.8 * average + 0.2 * elapsed
            agreed, error, reason = compare(self.manifest, served, outputs)
            return ShadowResult(self.bundle_id, self.version, agreed, error, elapsed, reason)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _finished(self, future: asyncio.Future[ShadowResult]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is None:
            self._report(future.result())

    def _report(self, result: ShadowResult) -> None:
        if self._closed:
            return
        try:
            self._on_result(result)
        except Exception:  # counting must never break serving
            logger.exception("a shadow result listener failed")
