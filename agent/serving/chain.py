"""The fallback chain: which stage answers an inference request.

Rules, in order:

1. The request is validated against the active manifest's contract first; a
   bad request raises :class:`~agent.serving.validation.InvalidInput` and no
   stage runs.
2. Stages are tried in the plan's order — ``local`` and
   ``local_with_escalation``: active model → previous model → cloud;
   ``cloud_primary``: cloud → active → previous — and the manifest's safe
   default answers when none of them could.
3. A stage that raises, exceeds its timeout, or returns an output with NaN or
   Inf (or of the wrong shape) has failed; the request passes on.
4. Each stage has a circuit breaker; a stage whose breaker is open is skipped
   without being called.
5. With ``local_with_escalation``, a local answer whose confidence (the lowest
   top score of the manifest's ``confidence_output`` over the batch) is below
   the threshold is sent on to the cloud; if the cloud fails, the local answer
   stands.
6. ``set_models`` swaps the models (an install switches slots); a request in
   flight finishes on the models it started with.
7. A shadow model (``set_shadow``, :mod:`agent.serving.shadow`) is offered each
   request after its answer is made; it never changes or fails the answer.

Every answer says which stage and model version served it and what happened
at each stage tried. Observers (a watchdog that rolls back a bad new model)
see every stage attempt; per-stage counters feed telemetry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.serving.breaker import BreakerState, CircuitBreaker
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
from protocol.inference import STAGE_NAMES, StageName
from protocol.manifest import Manifest

logger = logging.getLogger(__name__)

# on_result(stage name, model version, ok, reason when not ok)
StageObserver = Callable[[StageName, str | None, bool, str | None], None]
# on_answer(validated inputs, answer, seconds it took)
AnswerListener = Callable[[dict[str, npt.NDArray[Any]], "Answer", float], None]


class RequestCounter(Protocol):
    """Where the chain counts its requests (``agent.metrics.InferenceMetrics``); must not block."""

    def answered(self, stage: StageName, seconds: float) -> None: ...

    def refused(self, outcome: Literal["client_error", "unavailable"]) -> None: ...


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


class ServingPlan(BaseModel):
    """How this device serves, as the fleet server's hybrid planner decides.

    ``confidence_threshold`` overrides the manifest's when set.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["local", "local_with_escalation", "cloud_primary"] = "local"
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class ChainConfig(BaseModel):
    """Timeouts and circuit-breaker settings for the local stages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_timeout_s: float | None = Field(default=1.0, gt=0)
    failure_threshold: int = Field(default=5, ge=1)
    reset_after_s: float = Field(default=30.0, ge=0)
    inline_below_s: float = Field(default=INLINE_BELOW_S, ge=0)


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

    plan: ServingPlan
    manifest: Manifest | None = None
    contract: InputContract | None = None
    safe_default: SafeDefaultStage | None = None
    active: _Entry | None = None
    previous: _Entry | None = None
    slots: tuple[ModelSlot | None, ModelSlot | None] = (None, None)
    cloud: _Entry | None = None


class FallbackChain:
    """Answers inference requests through active → previous → cloud → safe default.

    ``counter``, when given, counts every request: the stage that answered and
    its time, or why no stage ran (see :class:`RequestCounter`).
    """

    def __init__(
        self,
        active: ModelSlot | None = None,
        previous: ModelSlot | None = None,
        *,
        cloud: Stage | None = None,
        plan: ServingPlan | None = None,
        config: ChainConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        counter: RequestCounter | None = None,
    ) -> None:
        self.config = config or ChainConfig()
        self._clock = clock
        self._counter = counter
        self._observers: list[StageObserver] = []
        self._counters = {name: StageCounters() for name in STAGE_NAMES}
        self._snapshot = _Snapshot(plan=plan or ServingPlan())
        self._listener: AnswerListener | None = None
        self._shadow: ShadowRunner | None = None
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

    def set_plan(self, plan: ServingPlan) -> None:
        """Serve by ``plan`` from the next request on."""
        self._snapshot = dataclasses.replace(self._snapshot, plan=plan)

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
    def plan(self) -> ServingPlan:
        return self._snapshot.plan

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
        counter = self._counter
        try:
            answer = await self._infer(tensors, version, validated)
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
        return answer

    def on_answer(self, listener: AnswerListener | None) -> None:
        """Call ``listener(validated inputs, answer, seconds)`` after every answer."""
        self._listener = listener

    async def _infer(
        self, tensors: Mapping[str, npt.ArrayLike], version: str | None, validated: list[Tensors]
    ) -> Answer:
        snap = self._snapshot
        if snap.manifest is None or snap.contract is None or snap.safe_default is None:
            raise ChainNotReady("no model is installed on this device yet")
        order = self._order(snap, version)
        inputs = snap.contract.validate(tensors)
        validated.append(inputs)
        rows = batch_rows(inputs)
        attempts: list[Attempt] = []
        for entry in order:
            outputs = await self._attempt(entry, inputs, rows, snap.manifest, attempts)
            if outputs is None:
                continue
            stage = entry.stage
            if stage.name in ("active", "previous") and snap.plan.mode == "local_with_escalation":
                answer = await self._escalate(snap, entry, outputs, inputs, rows, attempts)
                if answer is not None:
                    return answer
            self._counters[stage.name].served += 1
            return self._answer(snap.manifest, stage, outputs, attempts)
        fallback = snap.safe_default
        outputs = fallback.answer(rows)
        attempts.append(Attempt(fallback.name, fallback.model_version, ok=True))
        self._counters[fallback.name].served += 1
        self._notify(fallback.name, fallback.model_version, True, None)
        return self._answer(snap.manifest, fallback, outputs, attempts)

    def _order(self, snap: _Snapshot, version: str | None) -> list[_Entry]:
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
        ordered = (
            [snap.cloud, *local] if snap.plan.mode == "cloud_primary" else [*local, snap.cloud]
        )
        return [entry for entry in ordered if entry is not None]

    async def _escalate(
        self,
        snap: _Snapshot,
        local: _Entry,
        outputs: Tensors,
        inputs: Tensors,
        rows: int,
        attempts: list[Attempt],
    ) -> Answer | None:
        """The cloud's answer when the local one is not confident enough and the cloud answers."""
        assert snap.manifest is not None
        confidence = _confidence(snap.manifest, outputs, rows)
        threshold = snap.plan.confidence_threshold
        if threshold is None:
            threshold = snap.manifest.fallback.confidence_threshold
        if confidence is None or confidence >= threshold or snap.cloud is None:
            return None
        attempts[-1] = dataclasses.replace(
            attempts[-1], reason=f"confidence {confidence:.3f} is below {threshold:g}; escalated"
        )
        self._counters[local.stage.name].escalated += 1
        cloud_outputs = await self._attempt(snap.cloud, inputs, rows, snap.manifest, attempts)
        if cloud_outputs is None:
            return None
        self._counters["cloud"].served += 1
        return self._answer(
            snap.manifest, snap.cloud.stage, cloud_outputs, attempts, escalated=True, local=outputs
        )

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
        attempts.append(Attempt(stage.name, version, ok=outputs is not None, reason=reason))
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
    ) -> Answer:
        return Answer(
            model_name=manifest.name,
            outputs=outputs,
            stage=stage.name,
            model_version=stage.model_version,
            escalated=escalated,
            attempts=tuple(attempts),
            local_outputs=local,
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


def _check_outputs(
    manifest: Manifest, raw: Mapping[str, npt.ArrayLike], rows: int
) -> tuple[Tensors | None, str | None]:
    """The manifest's outputs, checked: every one present, of the right shape, finite."""
    checked: Tensors = {}
    for spec in manifest.outputs:
        if spec.name not in raw:
            return None, f"gave no output {spec.name!r}"
        array = np.asarray(raw[spec.name])
        expected = [rows, *spec.example_shape]
        if list(array.shape) != expected:
            return None, f"output {spec.name!r} has shape {list(array.shape)}, expected {expected}"
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():  # one test in the common case; details only on failure
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


def _confidence(manifest: Manifest, outputs: Tensors, rows: int) -> float | None:
    """The lowest top score over the batch, or ``None`` if the manifest names no score output."""
    name = manifest.fallback.confidence_output
    if name is None:
        return None
    scores = outputs[name].reshape(rows, -1).astype(np.float64)
    return float(scores.max(axis=1).min())
