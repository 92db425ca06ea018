"""The fallback chain: which stage answers an inference request.

Rules, in order:

1. The request is validated against the active manifest's contract first; a
   bad request raises :class:`~agent.serving.validation.InvalidInput` and no
   stage runs.
2. Stages are tried in order: active model → previous model → cloud, and the
   manifest's safe default answers when none of them could.
3. A stage that raises, exceeds its timeout, or returns an output with NaN or
   Inf (or of the wrong shape) has failed; the request passes on.
4. Each stage has a circuit breaker; a stage whose breaker is open is skipped
   without being called.
5. ``set_models`` swaps the models (an install switches slots); a request in
   flight finishes on the models it started with.
6. A shadow model (``set_shadow``, :mod:`agent.serving.shadow`) is offered each
   request after its answer is made; it never changes or fails the answer.

Hybrid plans (``set_hybrid_plan``, :class:`protocol.hybrid.HybridPlan`), the
rules the device follows when the fleet server shares its requests with the
cloud model:

7. No plan, or a plan past its ``expires_at`` (on the injected wall clock):
   no request is routed to the cloud; the cloud stage is only the fallback of
   rule 2, after both local models failed. A plan in mode ``local``: nothing
   leaves the device, not even that fallback (a device that opted out).
8. ``escalate``: the local answer's calibrated confidence
   (:func:`protocol.hybrid.calibrated_confidence` with the plan's
   temperature over the manifest's ``confidence_output``; a batch's is its
   lowest row) below ``tau`` sends the request to the cloud, if a token is
   left in the plan's bucket (``quota_rate``/``quota_burst``), no back-off is
   in force and the cloud's breaker is not open; otherwise the local answer
   stands, counted as kept local for quota. ``cloud_first``: every request,
   answered locally first (that answer is the fallback, and gives the
   confidence and agreement the window reports), goes to the cloud on the
   same conditions. A request pinned to a model version is answered locally.
9. Any failure of a cloud call — 429, timeout, unreachable, 5xx, a malformed
   answer — leaves the local answer (or rule 2's fallback); every request is
   answered. The error is counted by kind
   (:data:`protocol.hybrid.CLOUD_ERROR_KINDS`). A 429 starts a back-off of
   its ``retry_after_s`` (plan or not): no cloud call until it is over. Other
   failures count towards the cloud's circuit breaker (rule 4).
10. ``escalate`` with ``audit_rate``: a confident request is, with that
    probability, also sent to the cloud after its local answer was returned
    (it never delays or changes it), on the conditions of rule 8 and with at
    most ``max_audits_in_flight`` audits under way (one more is not sent), to
    measure agreement (:meth:`FallbackChain.on_audit`).
11. Every request under a plan in force carries a :class:`~agent.serving.hybrid.Route`
    (``Answer.hybrid``): local, escalated or kept local for quota, with its
    confidence, latencies, cloud error and agreement; the window counts it.

Every answer says which stage and model version served it and what happened
at each stage tried. Observers (a watchdog that rolls back a bad new model)
see every stage attempt; per-stage counters feed telemetry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.serving.breaker import BreakerState, CircuitBreaker
from agent.serving.cloud import CloudError, CloudRateLimited, CloudStage
from agent.serving.hybrid import (
    AuditResult,
    PlanState,
    Route,
    RouteName,
    request_confidence,
    same_top_class,
)
from agent.serving.shadow import ShadowRunner
from agent.serving.stages import (
    INLINE_BELOW_S,
    ModelStage,
    SafeDefaultStage,
    Stage,
    Tensors,
    batch_rows,
)
from agent.serving.validation import InputContract, InvalidInput
from model_runtime import LoadedModel, Runtime
from protocol.hybrid import CloudErrorKind, HybridPlan
from protocol.inference import STAGE_NAMES, StageName
from protocol.manifest import Manifest

logger = logging.getLogger(__name__)

# on_result(stage name, model version, ok, reason when not ok)
StageObserver = Callable[[StageName, str | None, bool, str | None], None]
# on_answer(validated inputs, answer, seconds it took)
AnswerListener = Callable[[dict[str, npt.NDArray[Any]], "Answer", float], None]
AuditListener = Callable[[AuditResult], None]


class RequestCounter(Protocol):
    """Where the chain counts its requests (``agent.metrics.InferenceMetrics``); must not block."""

    def answered(self, stage: StageName, seconds: float) -> None: ...

    def refused(self, outcome: Literal["client_error", "unavailable"]) -> None: ...


class HybridCounter(Protocol):
    """Where the chain counts what it did under a hybrid plan (``agent.metrics.HybridMetrics``)."""

    def route(self, route: Route) -> None: ...

    def audit(self, result: AuditResult) -> None: ...


class ChainNotReady(RuntimeError):
    """No model is installed, so not even a safe default is known."""


class UnknownVersion(LookupError):
    """A request pinned a model version this device does not hold."""


@dataclass(frozen=True)
class ModelSlot:
    """A model the device holds: its manifest, and the loaded model (``None`` if it cannot run)."""

    manifest: Manifest
    model: LoadedModel | None

    @classmethod
    def load(cls, manifest: Manifest, model_path: Path, runtime: Runtime) -> ModelSlot:
        """Load the model file; raises the runtime's ``ModelLoadError``."""
        return cls(manifest, runtime.load(model_path))


class ChainConfig(BaseModel):
    """Timeouts, circuit-breaker settings, and the audits a hybrid plan may have under way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_timeout_s: float | None = Field(default=1.0, gt=0)
    failure_threshold: int = Field(default=5, ge=1)
    reset_after_s: float = Field(default=30.0, ge=0)
    inline_below_s: float = Field(default=INLINE_BELOW_S, ge=0)
    max_audits_in_flight: int = Field(default=2, ge=1)


@dataclass(frozen=True)
class Attempt:
    """What happened at one stage: served (``ok``), failed or skipped, and why."""

    stage: StageName
    model_version: str | None
    ok: bool
    reason: str | None = None


@dataclass(frozen=True)
class Answer:
    """The chain's answer to one request."""

    model_name: str
    outputs: Tensors
    stage: StageName
    model_version: str | None
    escalated: bool
    attempts: tuple[Attempt, ...]
    # The local answer the cloud's replaced, when the request was escalated.
    local_outputs: Tensors | None = None
    # How the request was routed, while a hybrid plan is in force.
    hybrid: Route | None = None


@dataclass
class StageCounters:
    """Per-stage counts since start: requests answered, failures, breaker skips, escalations."""

    served: int = 0
    failed: int = 0
    skipped: int = 0
    escalated: int = 0


@dataclass(frozen=True)
class _Entry:
    stage: Stage
    breaker: CircuitBreaker


@dataclass(frozen=True)
class _Snapshot:
    """Everything one request uses, swapped as a whole so a request never sees half a swap."""

    manifest: Manifest | None = None
    contract: InputContract | None = None
    safe_default: SafeDefaultStage | None = None
    active: _Entry | None = None
    previous: _Entry | None = None
    slots: tuple[ModelSlot | None, ModelSlot | None] = (None, None)
    cloud: _Entry | None = None
    hybrid: PlanState | None = None


@dataclass(frozen=True)
class _CloudCall:
    """One call to the cloud: its checked outputs, or why there are none."""

    outputs: Tensors | None
    skipped: bool = False  # not sent: back-off, quota or open breaker
    error: CloudErrorKind | None = None
    latency_s: float | None = None


@dataclass(frozen=True)
class _Audit:
    state: PlanState
    entry: _Entry
    manifest: Manifest
    inputs: Tensors
    local: Tensors
    rows: int
    confidence: float


class FallbackChain:
    """Answers inference requests through active → previous → cloud → safe default.

    ``counter``, when given, counts every request: the stage that answered and
    its time, or why no stage ran (see :class:`RequestCounter`);
    ``hybrid_counter`` counts routes and audits under a hybrid plan. ``clock``
    (monotonic seconds) drives breakers, the plan's token bucket and the
    back-off; ``wall_clock`` (seconds since the epoch) a plan's expiry;
    ``seed`` the audit draws.
    """

    def __init__(
        self,
        active: ModelSlot | None = None,
        previous: ModelSlot | None = None,
        *,
        cloud: Stage | None = None,
        config: ChainConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        counter: RequestCounter | None = None,
        hybrid_counter: HybridCounter | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config or ChainConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        self._counter = counter
        self._hybrid_counter = hybrid_counter
        self._observers: list[StageObserver] = []
        self._counters = {name: StageCounters() for name in STAGE_NAMES}
        self._snapshot = _Snapshot()
        self._listener: AnswerListener | None = None
        self._audit_listener: AuditListener | None = None
        self._shadow: ShadowRunner | None = None
        self._random = random.Random(seed)
        self._backoff_until = -float("inf")  # monotonic: no cloud call before (after a 429)
        self._audits: set[asyncio.Task[None]] = set()
        self.audits_skipped = 0
        """Audits drawn but not sent: back-off, quota, open breaker or too many under way."""
        self.set_cloud(cloud)
        self.set_models(active=active, previous=previous)

    # -- configuration -------------------------------------------------------

    def set_models(self, *, active: ModelSlot | None, previous: ModelSlot | None) -> None:
        """Serve these models from now on; requests in flight finish on the old ones.

        A stage keeps its circuit breaker when its slot keeps the same model.
        """
        old = self._snapshot
        governing = active or previous
        manifest = governing.manifest if governing else None
        self._snapshot = dataclasses.replace(
            old,
            manifest=manifest,
            contract=InputContract(manifest) if manifest else None,
            safe_default=SafeDefaultStage(manifest) if manifest else None,
            active=self._model_entry("active", active, old.active),
            previous=self._model_entry("previous", previous, old.previous),
            slots=(active, previous),
        )

    def set_cloud(self, cloud: Stage | None) -> None:
        """Use ``cloud`` as the cloud stage (``None``: this device has no cloud endpoint)."""
        old = self._snapshot
        if old.cloud is not None and old.cloud.stage is cloud:
            return
        self._snapshot = dataclasses.replace(
            old, cloud=_Entry(cloud, self._breaker()) if cloud is not None else None
        )

    def set_shadow(self, shadow: ShadowRunner | None) -> None:
        """Offer every answered request to ``shadow`` from now on (``None``: no shadow runs).

        The shadow replaced stops taking requests (:meth:`ShadowRunner.close`).
        """
        old, self._shadow = self._shadow, shadow
        if old is not None and old is not shadow:
            old.close()

    @property
    def shadow(self) -> ShadowRunner | None:
        """The shadow model offered the answered requests, if one runs."""
        return self._shadow

    def set_hybrid_plan(self, plan: HybridPlan | None) -> None:
        """Follow ``plan`` from the next request on (``None``: no plan; rules 7-11).

        The same plan set again keeps its token bucket; a new one starts with a full bucket
        and ends a back-off a 429 started: the new plan is a new quota, granted after it.
        """
        old = self._snapshot.hybrid
        if plan is not None and old is not None and old.plan == plan:
            return
        if plan is not None:
            self._backoff_until = -float("inf")
        state = PlanState(plan, self._clock()) if plan is not None else None
        self._snapshot = dataclasses.replace(self._snapshot, hybrid=state)

    @property
    def hybrid_plan(self) -> HybridPlan | None:
        """The plan followed now: ``None`` without one, or once it expired."""
        state = self._snapshot.hybrid
        if state is None or not state.in_force(self._wall_clock()):
            return None
        return state.plan

    @property
    def backing_off_s(self) -> float:
        """Seconds left of the back-off a 429 asked for (0: none)."""
        return max(0.0, self._backoff_until - self._clock())

    def on_audit(self, listener: AuditListener | None) -> None:
        """Call ``listener(result)`` when an audit (rule 10) has its outcome."""
        self._audit_listener = listener

    async def audits_idle(self) -> None:
        """Wait until no audit is under way and every result is reported."""
        while self._audits:
            await asyncio.gather(*list(self._audits), return_exceptions=True)

    def subscribe(self, observer: StageObserver) -> Callable[[], None]:
        """Call ``observer(stage, model_version, ok, reason)`` after every stage attempt.

        Returns a function that unsubscribes it. An observer must not block; its
        exceptions are logged and otherwise ignored.
        """
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    # -- state ---------------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        """The manifest whose contract requests must meet (the active model's)."""
        return self._snapshot.manifest

    def manifest_of(self, version: str | None) -> Manifest | None:
        """The manifest of a model version this device holds (``None``: the active one)."""
        if version is None:
            return self._snapshot.manifest
        for slot in self._snapshot.slots:
            if slot is not None and slot.manifest.version == version:
                return slot.manifest
        return None

    @property
    def slots(self) -> tuple[ModelSlot | None, ModelSlot | None]:
        """The active and the previous model (``None`` where there is none)."""
        return self._snapshot.slots

    @property
    def versions(self) -> list[str]:
        """The model versions this device holds, active first."""
        versions: list[str] = []
        for slot in self._snapshot.slots:
            if slot is not None and slot.manifest.version not in versions:
                versions.append(slot.manifest.version)
        return versions

    def readiness(self) -> tuple[bool, str]:
        """Whether a request can be answered now (a model or at least the safe default), and how."""
        snap = self._snapshot
        if snap.manifest is None:
            return False, "no model is installed on this device yet"
        for entry in (snap.active, snap.previous, snap.cloud):
            if entry is not None and entry.breaker.state is not BreakerState.OPEN:
                return True, f"stage {entry.stage.name!r} can answer"
        return True, "only the safe default can answer"

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    @property
    def counters(self) -> dict[StageName, StageCounters]:
        """A copy of the per-stage counters."""
        return {name: dataclasses.replace(c) for name, c in self._counters.items()}

    def breaker(self, stage: StageName) -> CircuitBreaker | None:
        """The circuit breaker of a stage, if the chain has that stage."""
        entry: _Entry | None = getattr(self._snapshot, stage, None)
        return entry.breaker if isinstance(entry, _Entry) else None

    # -- serving -------------------------------------------------------------

    async def infer(
        self, tensors: Mapping[str, npt.ArrayLike], *, version: str | None = None
    ) -> Answer:
        """Validate ``tensors`` and answer them; ``version`` pins a model version this device holds.

        Raises ``InvalidInput`` for a bad request, :class:`UnknownVersion` for a
        version the device does not hold, :class:`ChainNotReady` before any
        model is installed. Stage failures never raise: the safe default answers.
        Each request is counted in the chain's ``counter``.
        """
        started = time.perf_counter()
        validated: list[Tensors] = []  # per call: concurrent requests must not share it
        audits: list[_Audit] = []
        counter = self._counter
        try:
            answer = await self._infer(tensors, version, validated, audits)
        except (InvalidInput, UnknownVersion):
            if counter is not None:
                counter.refused("client_error")
            raise
        except ChainNotReady:
            if counter is not None:
                counter.refused("unavailable")
            raise
        seconds = time.perf_counter() - started
        if counter is not None:
            counter.answered(answer.stage, seconds)
        if answer.hybrid is not None and self._hybrid_counter is not None:
            try:
                self._hybrid_counter.route(answer.hybrid)
            except Exception:  # counting must never fail a request
                logger.exception("a hybrid counter failed")
        if self._listener is not None and validated:
            try:
                self._listener(validated[0], answer, seconds)
            except Exception:  # telemetry must never fail a request
                logger.exception("an answer listener failed")
        shadow = self._shadow
        if shadow is not None and validated and not answer.escalated:
            try:
                shadow.offer(validated[0], answer.outputs, answer.stage)
            except Exception:  # the shadow must never fail a request
                logger.exception("the shadow model failed to take a request")
        if audits:
            self._start_audit(audits[0])
        return answer

    def on_answer(self, listener: AnswerListener | None) -> None:
        """Call ``listener(validated inputs, answer, seconds)`` after every answer."""
        self._listener = listener

    async def _infer(
        self,
        tensors: Mapping[str, npt.ArrayLike],
        version: str | None,
        validated: list[Tensors],
        audits: list[_Audit],
    ) -> Answer:
        snap = self._snapshot
        manifest = snap.manifest
        if manifest is None or snap.contract is None or snap.safe_default is None:
            raise ChainNotReady("no model is installed on this device yet")
        local = self._local_order(snap, version)
        inputs = snap.contract.validate(tensors)
        validated.append(inputs)
        rows = batch_rows(inputs)
        state = snap.hybrid
        if state is not None and not state.in_force(self._wall_clock()):
            state = None  # rule 7: an expired plan is no plan
        cloud = snap.cloud
        if state is not None and state.plan.mode == "local":
            cloud = None  # rule 7: nothing leaves the device
        attempts: list[Attempt] = []
        started = time.perf_counter()
        for entry in local:
            outputs = await self._attempt(entry, inputs, rows, manifest, attempts)
            if outputs is None:
                continue
            if state is None:
                self._counters[entry.stage.name].served += 1
                return self._answer(manifest, entry.stage, outputs, attempts)
            return await self._route(
                state,
                entry,
                cloud,
                manifest,
                inputs,
                outputs,
                rows,
                version,
                attempts,
                started,
                audits,
            )
        # No local model answered: the cloud, then the safe default (rule 2).
        route: Route | None = None
        if cloud is not None:
            call = await self._call_cloud(cloud, state, manifest, inputs, rows, attempts)
            if state is not None:
                route = Route(
                    state.plan.plan_id,
                    state.plan.mode,
                    "kept_local_quota" if call.skipped else "escalated",
                    cloud_latency_s=call.latency_s,
                    cloud_error=call.error,
                )
            if call.outputs is not None:
                self._counters["cloud"].served += 1
                return self._answer(manifest, cloud.stage, call.outputs, attempts, hybrid=route)
        elif state is not None:
            route = Route(state.plan.plan_id, state.plan.mode, "local")
        fallback = snap.safe_default
        outputs = fallback.answer(rows)
        attempts.append(Attempt(fallback.name, fallback.model_version, ok=True))
        self._counters[fallback.name].served += 1
        self._notify(fallback.name, fallback.model_version, True, None)
        return self._answer(manifest, fallback, outputs, attempts, hybrid=route)

    async def _route(
        self,
        state: PlanState,
        entry: _Entry,
        cloud: _Entry | None,
        manifest: Manifest,
        inputs: Tensors,
        outputs: Tensors,
        rows: int,
        version: str | None,
        attempts: list[Attempt],
        started: float,
        audits: list[_Audit],
    ) -> Answer:
        """A local model answered under a plan in force: keep it, or ask the cloud (rules 8-10)."""
        plan = state.plan
        local_s = time.perf_counter() - started
        confidence = request_confidence(manifest, outputs, rows, plan.temperature)
        stage = entry.stage
        route_name: RouteName = "local"
        error: CloudErrorKind | None = None
        if version is None and cloud is not None and state.wants_cloud(confidence):
            why = (
                "cloud first"
                if plan.mode == "cloud_first"
                else f"calibrated confidence {confidence or 0.0:.3f} is below tau {plan.tau:g}"
            )
            call = await self._call_cloud(cloud, state, manifest, inputs, rows, attempts)
            local_attempt = next(
                i for i, a in enumerate(attempts) if a.stage == stage.name and a.ok
            )
            if call.outputs is not None:
                attempts[local_attempt] = dataclasses.replace(
                    attempts[local_attempt], reason=f"{why}; escalated"
                )
                self._counters[stage.name].escalated += 1
                self._counters["cloud"].served += 1
                route = Route(
                    plan.plan_id,
                    plan.mode,
                    "escalated",
                    confidence,
                    local_s,
                    call.latency_s,
                    None,
                    same_top_class(manifest, outputs, call.outputs, rows),
                )
                return self._answer(
                    manifest,
                    cloud.stage,
                    call.outputs,
                    attempts,
                    escalated=True,
                    local=outputs,
                    hybrid=route,
                )
            if call.skipped:
                route_name, kept = "kept_local_quota", "not sent, kept"
            else:
                route_name, error, kept = "escalated", call.error, "the cloud failed, kept"
                self._counters[stage.name].escalated += 1
            attempts[local_attempt] = dataclasses.replace(
                attempts[local_attempt], reason=f"{why}; {kept}"
            )
        elif (
            plan.mode == "escalate"
            and version is None
            and cloud is not None
            and confidence is not None
            and plan.audit_rate > 0.0
            and self._random.random() < plan.audit_rate
        ):
            audits.append(_Audit(state, cloud, manifest, inputs, outputs, rows, confidence))
        self._counters[stage.name].served += 1
        route = Route(plan.plan_id, plan.mode, route_name, confidence, local_s, cloud_error=error)
        return self._answer(manifest, stage, outputs, attempts, hybrid=route)

    def _local_order(self, snap: _Snapshot, version: str | None) -> list[_Entry]:
        local = [snap.active, snap.previous]
        if version is not None:
            active_slot, previous_slot = snap.slots
            if active_slot is not None and active_slot.manifest.version == version:
                pass
            elif previous_slot is not None and previous_slot.manifest.version == version:
                local = [snap.previous]
            else:
                assert snap.manifest is not None
                raise UnknownVersion(
                    f"this device holds no version {version!r} of model {snap.manifest.name!r}; "
                    f"it holds {self.versions}"
                )
        return [entry for entry in local if entry is not None]

    def _may_call_cloud(self, entry: _Entry, state: PlanState | None, now: float) -> str | None:
        """Why the cloud may not be called now (``None``: it may; its breaker let it through)."""
        if now < self._backoff_until:
            return f"backing off for {self._backoff_until - now:.1f} s more after a 429"
        if state is not None and not state.bucket.has_token(now):
            return "the plan's quota is spent"
        if not entry.breaker.allow():
            self._counters["cloud"].skipped += 1
            return "circuit breaker is open"
        return None

    async def _call_cloud(
        self,
        entry: _Entry,
        state: PlanState | None,
        manifest: Manifest,
        inputs: Tensors,
        rows: int,
        attempts: list[Attempt],
    ) -> _CloudCall:
        """One call to the cloud under the back-off, the plan's quota and the breaker (rule 9)."""
        stage = entry.stage
        now = self._clock()
        refused = self._may_call_cloud(entry, state, now)
        if refused is not None:
            attempts.append(Attempt(stage.name, stage.model_version, ok=False, reason=refused))
            return _CloudCall(None, skipped=True)
        if state is not None:
            state.bucket.take(now)
        outputs, error, reason, latency = await self._run_cloud(
            entry, state, manifest, inputs, rows
        )
        version = stage.model_version
        if outputs is None:
            self._counters[stage.name].failed += 1
        attempts.append(Attempt(stage.name, version, ok=outputs is not None, reason=reason))
        self._notify(stage.name, version, outputs is not None, reason)
        return _CloudCall(outputs, error=error, latency_s=latency)

    async def _run_cloud(
        self,
        entry: _Entry,
        state: PlanState | None,
        manifest: Manifest,
        inputs: Tensors,
        rows: int,
    ) -> tuple[Tensors | None, CloudErrorKind | None, str | None, float | None]:
        """Call the cloud stage (already let through); outputs, error kind, reason, latency."""
        stage, breaker = entry.stage, entry.breaker
        started = time.perf_counter()
        error: CloudErrorKind | None = None
        outputs: Tensors | None = None
        reason: str | None
        try:
            async with asyncio.timeout(stage.timeout_s):
                if isinstance(stage, CloudStage):
                    name = (state.plan.cloud_model if state is not None else None) or (
                        stage.model_name or manifest.name
                    )
                    raw = await stage.infer(inputs, model_name=name)
                else:
                    raw = await stage.infer(inputs)
        except TimeoutError:
            error, reason = "timeout", f"no answer within {stage.timeout_s:g} s"
        except CloudRateLimited as exc:
            error, reason = "rate_limited", str(exc)
            self._backoff_until = max(self._backoff_until, self._clock() + exc.retry_after_s)
        except CloudError as exc:
            error, reason = exc.kind, str(exc)
        except Exception as exc:  # any failure of a stage passes the request on
            error, reason = "server_error", f"{type(exc).__name__}: {exc}"
        else:
            outputs, reason = _check_outputs(manifest, raw, rows)
            if outputs is None:
                error = "bad_answer"
        latency = time.perf_counter() - started
        if outputs is not None or error == "rate_limited":
            breaker.record_success()  # a 429 comes from an endpoint that is up
        else:
            breaker.record_failure()
        return outputs, error, reason, latency if outputs is not None else None

    def _start_audit(self, audit: _Audit) -> None:
        """Send a confident request to the cloud too, after its answer was returned (rule 10)."""
        if len(self._audits) >= self.config.max_audits_in_flight:
            self.audits_skipped += 1
            return
        if self._may_call_cloud(audit.entry, audit.state, self._clock()) is not None:
            self.audits_skipped += 1
            return
        audit.state.bucket.take(self._clock())
        task = asyncio.get_running_loop().create_task(self._audit(audit))
        self._audits.add(task)
        task.add_done_callback(self._audits.discard)

    async def _audit(self, audit: _Audit) -> None:
        outputs, error, _, latency = await self._run_cloud(
            audit.entry, audit.state, audit.manifest, audit.inputs, audit.rows
        )
        plan = audit.state.plan
        agreed = (
            same_top_class(audit.manifest, audit.local, outputs, audit.rows)
            if outputs is not None
            else None
        )
        result = AuditResult(plan.plan_id, plan.mode, audit.confidence, latency, error, agreed)
        try:
            if self._hybrid_counter is not None:
                self._hybrid_counter.audit(result)
            if self._audit_listener is not None:
                self._audit_listener(result)
        except Exception:  # counting must never break serving
            logger.exception("an audit listener failed")

    async def _attempt(
        self,
        entry: _Entry,
        inputs: Tensors,
        rows: int,
        manifest: Manifest,
        attempts: list[Attempt],
    ) -> Tensors | None:
        """Run one stage under its breaker and timeout; its checked outputs, or ``None``."""
        stage, breaker = entry.stage, entry.breaker
        if not breaker.allow():
            self._counters[stage.name].skipped += 1
            attempts.append(
                Attempt(stage.name, stage.model_version, ok=False, reason="circuit breaker is open")
            )
            return None
        outputs: Tensors | None = None
        try:
            if isinstance(stage, ModelStage) and stage.runs_inline:
                # A run on the event loop never awaits, so a timeout could not fire.
                raw = stage.run_inline(inputs)
            else:
                async with asyncio.timeout(stage.timeout_s):
                    raw = await stage.infer(inputs)
        except TimeoutError:
            reason: str | None = f"no answer within {stage.timeout_s:g} s"
        except Exception as exc:  # any failure of a stage passes the request on
            reason = f"{type(exc).__name__}: {exc}"
        else:
            outputs, reason = _check_outputs(manifest, raw, rows)
        version = stage.model_version
        if outputs is None:
            breaker.record_failure()
            self._counters[stage.name].failed += 1
        else:
            breaker.record_success()
        if outputs is not None and reason is None:
            attempts.append(_served(stage.name, version))
        else:
            attempts.append(Attempt(stage.name, version, ok=outputs is not None, reason=reason))
        if self._observers:
            self._notify(stage.name, version, outputs is not None, reason)
        return outputs

    def _answer(
        self,
        manifest: Manifest,
        stage: Stage,
        outputs: Tensors,
        attempts: Sequence[Attempt],
        *,
        escalated: bool = False,
        local: Tensors | None = None,
        hybrid: Route | None = None,
    ) -> Answer:
        return Answer(
            model_name=manifest.name,
            outputs=outputs,
            stage=stage.name,
            model_version=stage.model_version,
            escalated=escalated,
            attempts=tuple(attempts),
            local_outputs=local,
            hybrid=hybrid,
        )

    def _notify(self, stage: StageName, version: str | None, ok: bool, reason: str | None) -> None:
        for observer in list(self._observers):
            try:
                observer(stage, version, ok, reason)
            except Exception:
                logger.exception("a fallback-chain observer failed")

    def _breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.config.failure_threshold, self.config.reset_after_s, self._clock)

    def _model_entry(
        self, name: Literal["active", "previous"], slot: ModelSlot | None, old: _Entry | None
    ) -> _Entry | None:
        if slot is None or slot.model is None:
            return None
        if (
            old is not None
            and isinstance(old.stage, ModelStage)
            and old.stage.model is slot.model
            and old.stage.model_version == slot.manifest.version
        ):
            return old
        stage = ModelStage(
            name,
            slot.manifest.version,
            slot.model,
            timeout_s=self.config.local_timeout_s,
            inline_below_s=self.config.inline_below_s,
        )
        return _Entry(stage, self._breaker())


# Float outputs up to this many values are tested for NaN and Inf without numpy.
_SMALL_OUTPUT = 32


@lru_cache(maxsize=32)
def _served(stage: StageName, version: str | None) -> Attempt:
    """The attempt of a stage that answered: made once per stage and version (it is frozen)."""
    return Attempt(stage, version, ok=True)


def _check_outputs(
    manifest: Manifest, raw: Mapping[str, npt.ArrayLike], rows: int
) -> tuple[Tensors | None, str | None]:
    """The manifest's outputs, checked: every one present, of the right shape, finite."""
    checked: Tensors = {}
    for spec in manifest.outputs:
        if spec.name not in raw:
            return None, f"gave no output {spec.name!r}"
        value = raw[spec.name]
        array = value if type(value) is np.ndarray else np.asarray(value)
        expected = [rows, *spec.example_shape]
        if list(array.shape) != expected:
            return None, f"output {spec.name!r} has shape {list(array.shape)}, expected {expected}"
        if array.dtype.kind == "f":
            if array.size <= _SMALL_OUTPUT and array.itemsize <= 8:
                # A few values (each exact as a Python float): tested one by one in C,
                # without numpy's per-call cost.
                finite = all(map(math.isfinite, array.reshape(-1).tolist()))
            else:
                finite = bool(np.isfinite(array).all())
            if not finite:  # one test in the common case; details only on failure
                finite = np.isfinite(array.reshape(rows, -1)).all(axis=1)
                bad = np.flatnonzero(~finite)
                return None, (
                    f"output {spec.name!r} is NaN or Inf in {bad.size} of {rows} rows "
                    f"(first: row {int(bad[0])})"
                )
        elif array.dtype.kind not in "biu":
            return None, f"output {spec.name!r} is not numeric ({array.dtype})"
        checked[spec.name] = array.astype(spec.dtype, copy=False)
    return checked, None
