"""The rollout controller's rules as one step function: ``decide(state, event, spec, now)``.

No I/O and no clock here: the service loads the state, the gates'
evaluations and the devices the selector matches, calls :func:`decide` with
``now``, stores the state it returns and carries out the effects. Every
transition is a row of :data:`TRANSITIONS` — the phase it starts in, the named
event, the phases it may end in — so a rollout's whole life reads on one
screen; an event no row names for the current phase is refused
(:class:`ActionRefused`, naming both).

The rules of a tick, in this order (the first that applies decides):

1. A stop-gate ``fail`` — harm beyond its bound shown — stops assigning. With
   ``on_failure=rollback`` the rollout rolls back (:class:`RollbackReached`:
   every device it reached returns to the release it ran before); otherwise it
   is *stopped*, the devices keeping what they have (stopped in the shadow
   stage, the shadows are dropped: :class:`DropShadows`). Harm is acted on in every
   phase a tick judges, a paused one included. A warn-gate never stops; its
   warning is recorded.
2. Sample-ratio mismatch: ``srm_log_e >= log(1 / SRM_ALPHA)`` (an
   anytime-valid test that the arms report in other proportions than
   assigned) pauses, "sample ratio mismatch". In the shadow stage the arms
   are the devices that installed the shadow, reporting when it runs, and
   the devices outside wave 1.
3. The bake has passed (``bake``; ``shadow`` in the shadow stage) and every
   stop-gate required at this stage shows ``pass`` (non-inferiority within
   its margin shown; inconclusive is never a pass): the next stage starts
   (:class:`AssignStage`; :class:`ServeStage` after the shadow), or after the
   last stage the rollout completes. Which stop-gates a promotion requires is
   :func:`~fleet_server.rollouts.gates.required`'s to say, from the rollout's
   gates (install failures, judged against an allowed rate with no control,
   only from the promotion into the last wave on, where the larger waves give
   that test power; the labelled-accuracy gate never, since labels may never
   arrive); a required gate with no evaluation at a tick is not passing, and
   until some stop-gate has been evaluated nothing promotes. The stage that
   reaches every device has no control left to compare with: it completes
   after its bake unless harm is shown.
4. The maximum bake has passed (``spec.bake_limit``, counted from the stage's
   start or the last resume) and a required gate is still inconclusive:
   paused, the reason saying what each gate is missing.
5. Otherwise the stage goes on: :class:`AssignDevices` says how many more
   installs may start now (the exponential ramp of
   :mod:`~fleet_server.rollouts.pacing`, per stage from its start); the
   service starts them on devices the plan reaches whose maintenance window
   (:mod:`~fleet_server.rollouts.maintenance`) is open.

The wave plan lives in the state and the controller fixes it: every
:class:`Start`, :class:`Tick` and :class:`Promote` carries the devices the
selector matches now (a :class:`~fleet_server.rollouts.waves.Population`),
and :func:`~fleet_server.rollouts.waves.fix_cutoffs` fixes a stage's cutoffs
when it starts and a new stratum's at the tick that first sees it. The
service reads which devices are reached from ``state.plan``.

The shadow stage (``spec.shadow``): the wave-1 devices install the release
beside their active model (:class:`InstallShadow`) and run it on a share of
requests without serving its answers; the gates judge it by its agreement,
errors and latency, and it lasts at least ``shadow`` and at most the longer of
``shadow`` and the maximum bake. When it passes, wave 1 serves it
(:class:`ServeStage`).

Replays: a tick at or before the last tick the state has seen changes
nothing and has no effects, so a service that dies between deciding and
storing repeats the step it lost, and one that ticks twice takes one step.
Installs granted are counted in the state when granted, so the ramp never
grants an install twice; a grant the service could not use (no device
waiting, every window closed) is not carried over, so neither a closed window
nor a pause saves installs up for a burst (the ramp starts again at a
resume). Paused, stopped and final phases grant none; a paused rollout leaves
that phase only by an operator's action (or by harm shown); a stopped one
only by an abort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np

from fleet_server.errors import Conflict
from fleet_server.rollouts.gates import gate_specs, required
from fleet_server.rollouts.pacing import allowed_installs
from fleet_server.rollouts.state import HISTORY_LIMIT, DecisionRecord, Phase, RolloutState
from fleet_server.rollouts.verdicts import GateEvaluation
from fleet_server.rollouts.waves import Population, WavePlan, fix_cutoffs, waves
from protocol.api.rollouts import MaintenanceWindow, RolloutSpec

# The sample-ratio test's own error budget, apart from the gates' α: a mismatch
# only pauses, and a false one costs an operator's look.
SRM_ALPHA = 0.001
SRM_THRESHOLD = math.log(1 / SRM_ALPHA)


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the rollout: the shadow stage, or wave 1."""

    population: Population


@dataclass(frozen=True)
class Tick:
    """The controller's periodic look: every gate's evaluation now, the SRM test, the devices."""

    evaluations: Sequence[GateEvaluation]
    srm_log_e: float | None
    population: Population


@dataclass(frozen=True)
class Pause:
    """An operator stops assignments until a resume."""

    by: str
    reason: str | None = None


@dataclass(frozen=True)
class Resume:
    """An operator resumes a paused rollout; the maximum bake counts afresh from now."""

    by: str


@dataclass(frozen=True)
class Promote:
    """An operator's override: the next stage starts now, whatever the gates say."""

    by: str
    population: Population
    reason: str | None = None


@dataclass(frozen=True)
class Abort:
    """An operator ends the rollout; devices keep what they have."""

    by: str
    reason: str | None = None


Event = Start | Tick | Pause | Resume | Promote | Abort


# -- effects -------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallShadow:
    """The devices of ``stage`` (wave 1) install the release as a shadow, serving none of it."""

    stage: int


@dataclass(frozen=True)
class ServeStage:
    """The shadow passed: the devices of ``stage`` that hold it serve it from now on."""

    stage: int


@dataclass(frozen=True)
class AssignStage:
    """Stage ``stage`` starts: the devices ``state.plan`` reaches by it are to get the release."""

    stage: int


@dataclass(frozen=True)
class AssignDevices:
    """Up to ``limit`` more installs of ``stage`` may start now (``None``: no limit).

    Each on a device the plan reaches that has not started one, only while its
    maintenance ``window`` is open in its own time zone (``None``: always).
    """

    stage: int
    limit: int | None
    window: MaintenanceWindow | None


@dataclass(frozen=True)
class RollbackReached:
    """Every device the rollout reached goes back to the release it ran before.

    In the shadow stage (``stage`` 0) that is dropping the shadow.
    """

    stage: int
    reason: str


@dataclass(frozen=True)
class DropShadows:
    """The shadow stage stopped: every shadow the rollout installed is dropped.

    A shadow serves nothing but costs each device CPU; a rollout stopped in its
    shadow stage (``on_failure=pause``) leads nowhere but to an abort, so its
    shadows go at the stop rather than at the abort.
    """


@dataclass(frozen=True)
class RecordDecision:
    """Store this decision in the rollout's full record (keyed by ``record.seq``)."""

    record: DecisionRecord


Effect = (
    InstallShadow
    | ServeStage
    | AssignStage
    | AssignDevices
    | RollbackReached
    | DropShadows
    | RecordDecision
)
Step = tuple[RolloutState, list[Effect]]


class ActionRefused(Conflict):
    """An event the transition table does not allow in the rollout's phase."""

    def __init__(self, phase: Phase, event: str) -> None:
        self.phase = phase
        self.event = event
        super().__init__(f"{event} is refused: the rollout is {phase.value}{_ALLOWED_HINT[phase]}")


def decide(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    """The next state and the effects to carry out, in order, for ``event`` at ``now`` (aware)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{now} has no time zone; pass an aware datetime (UTC)")
    row = _TABLE.get((state.phase, type(event)))
    if row is None:
        raise ActionRefused(state.phase, _name(event))
    after, effects = row.rule(state, event, spec, now)
    if after.phase not in row.to:  # pragma: no cover - a bug in a rule
        raise AssertionError(f"{row.phase} --{row.event.__name__}--> {after.phase}")
    return after, effects


def required_gates(state: RolloutState, spec: RolloutSpec) -> list[str]:
    """The stop-gates whose ``pass`` promotion out of the current stage needs
    (:func:`~fleet_server.rollouts.gates.required`: stage ``k`` promotes into wave index ``k``)."""
    if state.stage >= len(spec.shares):
        return []  # every device reached: no control to show non-inferiority against
    return required(
        gate_specs(spec.gates, shadow=spec.shadow is not None), state.stage, len(spec.waves)
    )


# -- the rules -----------------------------------------------------------------------

Rule = Callable[[RolloutState, Event, RolloutSpec, datetime], Step]


def _start(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    assert isinstance(event, Start)
    started = replace(state, granted=(0,) * (len(spec.shares) + 1))
    if spec.shadow is not None:
        plan = fix_cutoffs(state.plan, event.population, spec.shares, 1)
        after = replace(
            started, phase=Phase.SHADOW, stage=0, plan=plan, stage_started_at=now, watch_from=now
        )
        after, pacing = _pace(after, spec, now)
        effects: list[Effect] = [InstallShadow(1), *pacing]
        action = "install the shadow on wave 1"
    else:
        after, effects = _enter(started, 1, spec, now, event.population)
        action = "start wave 1"
    return _record(
        state, after, effects, now, "start", None, "start", action, None, event.population
    )


def _judge(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    """A tick in the shadow stage or a baking one: the five rules of the module, in order."""
    assert isinstance(event, Tick)
    if _replayed(state, now):
        return state, []
    seen, evaluations, warnings = _seen(state, event, spec, now)

    def record(after: RolloutState, effects: list[Effect], rule: str, action: str) -> Step:
        reason = after.reason if after.phase != state.phase else None
        return _record(
            state, after, effects, now, "tick", None, rule, action, reason,
            event.population, evaluations, event.srm_log_e, warnings,
        )  # fmt: skip

    failed = [e for e in evaluations if e.severity == "stop" and e.decision == "fail"]
    if failed:
        after, effects, action = _stop(seen, spec, failed)
        return record(after, effects, "harm shown", action)
    if event.srm_log_e is not None and event.srm_log_e >= SRM_THRESHOLD:
        reason = (
            f"sample ratio mismatch: log e-value {event.srm_log_e:.2f} >= {SRM_THRESHOLD:.2f}; "
            "the wave reports far fewer devices or requests than its share"
        )
        return record(
            replace(seen, phase=Phase.PAUSED, reason=reason), [], "sample ratio mismatch", "pause"
        )
    lacking = _lacking(seen, spec, evaluations)
    shortest, longest = _bake_bounds(seen, spec)
    assert seen.stage_started_at is not None and seen.watch_from is not None
    if now - seen.stage_started_at >= shortest and not lacking:
        after, effects, action = _advance(seen, spec, now, event.population)
        return record(after, effects, "bake passed and every required gate passes", action)
    if now - seen.watch_from >= longest:
        waited = _duration(now - seen.watch_from)
        reason = f"inconclusive after {waited}: " + "; ".join(
            f"{g} {m}" for g, m in lacking.items()
        )
        paused = replace(seen, phase=Phase.PAUSED, reason=reason, missing=lacking)
        return record(paused, [], "maximum bake passed, inconclusive", "pause")
    after, effects = _pace(seen, spec, now)
    rule = "baking" if now - seen.stage_started_at < shortest else "waiting for the gates"
    return record(after, effects, rule, "assign" if effects else "wait")


def _watch(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    """A tick while paused or stopped: evidence recorded; harm still acted on when paused."""
    assert isinstance(event, Tick)
    if _replayed(state, now):
        return state, []
    seen, evaluations, warnings = _seen(state, event, spec, now)
    failed = [e for e in evaluations if e.severity == "stop" and e.decision == "fail"]
    if failed and state.phase == Phase.PAUSED:
        after, effects, action = _stop(seen, spec, failed)
        rule = "harm shown"
    else:
        after, effects, action = seen, [], "wait"
        rule = f"{state.phase.value}: evidence recorded"
    reason = after.reason if after.phase != state.phase else None
    return _record(
        state, after, effects, now, "tick", None, rule, action, reason,
        event.population, evaluations, event.srm_log_e, warnings,
    )  # fmt: skip


def _over(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    """A tick after the end: nothing to decide."""
    return state, []


def _pause(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    assert isinstance(event, Pause)
    reason = f"paused by {event.by}" + (f": {event.reason}" if event.reason else "")
    after = replace(state, phase=Phase.PAUSED, reason=reason, missing={})
    return _record(state, after, [], now, "pause", event.by, "operator pause", "pause", reason)


def _resume(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    assert isinstance(event, Resume)
    phase = Phase.SHADOW if state.stage == 0 else Phase.BAKING
    # The ramp starts again, as at a stage's start: a pause never saves up installs for a burst.
    base = state.granted[state.stage] if state.granted else 0
    after = replace(state, phase=phase, watch_from=now, ramp_base=base, reason=None, missing={})
    return _record(state, after, [], now, "resume", event.by, "operator resume", "resume", None)


def _promote(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    assert isinstance(event, Promote)
    after, effects, action = _advance(state, spec, now, event.population)
    reason = f"promoted by {event.by}" + (f": {event.reason}" if event.reason else "")
    return _record(
        state, after, effects, now, "promote", event.by, "operator override", action, reason,
        event.population,
    )  # fmt: skip


def _abort(state: RolloutState, event: Event, spec: RolloutSpec, now: datetime) -> Step:
    assert isinstance(event, Abort)
    reason = f"aborted by {event.by}" + (f": {event.reason}" if event.reason else "")
    after = replace(state, phase=Phase.ABORTED, reason=reason)
    return _record(state, after, [], now, "abort", event.by, "operator abort", "abort", reason)


# -- the parts the rules share --------------------------------------------------------


def _replayed(state: RolloutState, now: datetime) -> bool:
    return state.last_tick is not None and now <= state.last_tick


def _seen(
    state: RolloutState, tick: Tick, spec: RolloutSpec, now: datetime
) -> tuple[RolloutState, tuple[GateEvaluation, ...], tuple[str, ...]]:
    """The state after the tick (new strata fixed, stop-gates known), evaluations, warnings."""
    evaluations = tuple(tick.evaluations)
    stop_gates = {e.gate for e in evaluations if e.severity == "stop"}
    warnings = tuple(
        f"{e.gate}: harm shown (a warning, not a stop)"
        for e in evaluations
        if e.severity == "warn" and e.decision == "fail"
    )
    plan = fix_cutoffs(state.plan, tick.population, spec.shares)
    known = tuple(sorted(set(state.known_gates) | stop_gates))
    return replace(state, plan=plan, known_gates=known, last_tick=now), evaluations, warnings


def _lacking(
    state: RolloutState, spec: RolloutSpec, evaluations: Sequence[GateEvaluation]
) -> dict[str, str]:
    """Each required stop-gate not passing, with what it lacks; empty when promotion may go."""
    needed = required_gates(state, spec)
    if state.stage >= len(spec.shares):
        return {}
    if not state.known_gates:
        return {"gates": "none evaluated yet; no stop-gate has evidence"}
    by_gate = {e.gate: e for e in evaluations if e.severity == "stop"}
    lacking = {}
    for gate in sorted(needed):
        found = by_gate.get(gate)
        if found is None:
            lacking[gate] = "has no evaluation at this tick"
        elif found.decision != "pass":
            lacking[gate] = found.missing or "has shown neither harm nor non-inferiority yet"
    return lacking


def _bake_bounds(state: RolloutState, spec: RolloutSpec) -> tuple[timedelta, timedelta]:
    """The shortest and the longest the current stage bakes."""
    if state.stage == 0:
        shadow = spec.shadow if spec.shadow is not None else spec.bake
        return shadow, max(shadow, spec.bake_limit)
    return spec.bake, spec.bake_limit


def _stop(
    state: RolloutState, spec: RolloutSpec, failed: Sequence[GateEvaluation]
) -> tuple[RolloutState, list[Effect], str]:
    shown = "; ".join(
        f"{e.gate} shows harm (estimate {_show(e.estimate)}, bound {e.harm_at:g})" for e in failed
    )
    reason = f"stop-gate failed: {shown}"
    if spec.on_failure == "rollback":
        after = replace(state, phase=Phase.ROLLING_BACK, reason=reason, missing={})
        return after, [RollbackReached(state.stage, reason)], "roll back"
    stopped = replace(state, phase=Phase.STOPPED, reason=reason, missing={})
    if state.stage == 0:
        return stopped, [DropShadows()], "stop"
    return stopped, [], "stop"


def _advance(
    state: RolloutState, spec: RolloutSpec, now: datetime, population: Population
) -> tuple[RolloutState, list[Effect], str]:
    """The next stage started (or the rollout completed after the last)."""
    last = len(spec.shares)
    if state.stage >= last:
        return replace(state, phase=Phase.COMPLETED, reason=None, missing={}), [], "complete"
    if state.stage == 0:  # the shadow passed: wave 1, fixed when the shadow started, serves it
        after = _begin(state, 1, now, state.plan)
        after, pacing = _pace(after, spec, now)
        return after, [ServeStage(1), *pacing], "serve wave 1"
    after, effects = _enter(state, state.stage + 1, spec, now, population)
    return after, effects, f"start stage {state.stage + 1}"


def _enter(
    state: RolloutState, stage: int, spec: RolloutSpec, now: datetime, population: Population
) -> Step:
    plan = fix_cutoffs(state.plan, population, spec.shares, stage)
    after, pacing = _pace(_begin(state, stage, now, plan), spec, now)
    return after, [AssignStage(stage), *pacing]


def _begin(state: RolloutState, stage: int, now: datetime, plan: WavePlan) -> RolloutState:
    return replace(
        state,
        phase=Phase.BAKING,
        stage=stage,
        plan=plan,
        stage_started_at=now,
        watch_from=now,
        ramp_base=0,
        reason=None,
        missing={},
    )


def _pace(state: RolloutState, spec: RolloutSpec, now: datetime) -> Step:
    """The installs the ramp allows now that it has not granted yet, granted."""
    if spec.rate is None:
        return state, [AssignDevices(state.stage, None, spec.window)]
    assert state.watch_from is not None
    done = state.granted[state.stage]
    since = done - state.ramp_base
    limit = allowed_installs(now, state.watch_from, spec.rate, spec.rate_factor, since)
    if limit == 0:
        return state, []
    granted = list(state.granted)
    granted[state.stage] = done + limit
    return replace(state, granted=tuple(granted)), [AssignDevices(state.stage, limit, spec.window)]


def _record(
    before: RolloutState,
    after: RolloutState,
    effects: list[Effect],
    now: datetime,
    event: str,
    by: str | None,
    rule: str,
    action: str,
    reason: str | None,
    population: Population | None = None,
    evaluations: tuple[GateEvaluation, ...] = (),
    srm_log_e: float | None = None,
    warnings: tuple[str, ...] = (),
) -> Step:
    """``after`` with the decision in its history, and the effects then a record of it."""
    matched = reached = None
    if population is not None:
        matched = len(population)
        reached = int(np.count_nonzero(waves(after.plan, population)))
    seq = before.decisions + 1
    record = DecisionRecord(
        seq, now, event, by, before.phase, after.phase, after.stage, rule, action, reason,
        evaluations, srm_log_e, warnings, matched, reached,
    )  # fmt: skip
    history = (*after.history, record)[-HISTORY_LIMIT:]
    return replace(after, decisions=seq, history=history), [*effects, RecordDecision(record)]


def _name(event: object) -> str:
    return type(event).__name__


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _duration(value: timedelta) -> str:
    minutes = int(value.total_seconds() // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


# -- the table -----------------------------------------------------------------------

PENDING, SHADOW, BAKING, PAUSED, STOPPED, ROLLING_BACK, COMPLETED, ABORTED = tuple(Phase)


@dataclass(frozen=True)
class Transition:
    """One row: in ``phase``, ``event`` leads to one of ``to`` by ``rule``."""

    phase: Phase
    event: type
    to: frozenset[Phase]
    rule: Rule


def _row(phase: Phase, event: type, to: set[Phase], rule: Rule) -> Transition:
    return Transition(phase, event, frozenset(to), rule)


_HARM = {STOPPED, ROLLING_BACK}

TRANSITIONS: tuple[Transition, ...] = (
    _row(PENDING, Start, {SHADOW, BAKING}, _start),
    _row(PENDING, Abort, {ABORTED}, _abort),
    # The shadow stage: judged like a wave, then wave 1 serves it.
    _row(SHADOW, Tick, {SHADOW, BAKING, PAUSED, *_HARM}, _judge),
    _row(SHADOW, Pause, {PAUSED}, _pause),
    _row(SHADOW, Promote, {BAKING}, _promote),
    _row(SHADOW, Abort, {ABORTED}, _abort),
    # A stage served: promote, complete, pause, stop or roll back.
    _row(BAKING, Tick, {BAKING, PAUSED, COMPLETED, *_HARM}, _judge),
    _row(BAKING, Pause, {PAUSED}, _pause),
    _row(BAKING, Promote, {BAKING, COMPLETED}, _promote),
    _row(BAKING, Abort, {ABORTED}, _abort),
    # Paused: only an operator moves it on, but harm shown still stops it.
    _row(PAUSED, Tick, {PAUSED, *_HARM}, _watch),
    _row(PAUSED, Resume, {SHADOW, BAKING}, _resume),
    _row(PAUSED, Promote, {BAKING, COMPLETED}, _promote),
    _row(PAUSED, Abort, {ABORTED}, _abort),
    # Stopped on harm: evidence still recorded; the only way on is an abort.
    _row(STOPPED, Tick, {STOPPED}, _watch),
    _row(STOPPED, Abort, {ABORTED}, _abort),
    # The end: ticks change nothing, operators have nothing left to do.
    _row(ROLLING_BACK, Tick, {ROLLING_BACK}, _over),
    _row(COMPLETED, Tick, {COMPLETED}, _over),
    _row(ABORTED, Tick, {ABORTED}, _over),
)

_TABLE: Mapping[tuple[Phase, type], Transition] = {(t.phase, t.event): t for t in TRANSITIONS}
assert len(_TABLE) == len(TRANSITIONS), "one row per phase and event"

_ALLOWED_HINT: Mapping[Phase, str] = {
    phase: (
        f" (it accepts {', '.join(names)})"
        if (
            names := [
                t.event.__name__ for t in TRANSITIONS if t.phase == phase and t.event is not Tick
            ]
        )
        else " (nothing more can be done to it)"
    )
    for phase in Phase
}
