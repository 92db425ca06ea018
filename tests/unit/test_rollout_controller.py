"""The rollout controller over plain data: every row of its table, the rules of a tick, replays."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_server.errors import Conflict
from fleet_server.rollouts.controller import (
    SRM_THRESHOLD,
    TRANSITIONS,
    Abort,
    ActionRefused,
    AssignDevices,
    AssignStage,
    Effect,
    Event,
    InstallShadow,
    Pause,
    Promote,
    RecordDecision,
    Resume,
    RollbackReached,
    ServeStage,
    Start,
    Tick,
    decide,
    required_gates,
)
from fleet_server.rollouts.gates import gate_specs, required
from fleet_server.rollouts.state import FINAL_PHASES, HISTORY_LIMIT, Phase, RolloutState
from fleet_server.rollouts.verdicts import Decision, GateEvaluation, Severity
from fleet_server.rollouts.waves import DeviceFacts, Population, plan_from_json, plan_to_json, waves
from protocol.api.rollouts import RolloutSpec

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
GATES = ("accuracy_estimated", "fallback_rate", "install_failures", "latency_p95")
HARDWARE = ("rpi4", "rpi5", "jetson")
REGIONS = ("eu-west", "us-east")
ASSIGNING = (AssignStage, AssignDevices, ServeStage, InstallShadow)


def fleet(n: int, seed: int = 0) -> Population:
    rng = random.Random(seed)
    devices = [
        DeviceFacts(f"dev-{i:05d}", rng.choice(HARDWARE), rng.choice(REGIONS)) for i in range(n)
    ]
    return Population.of("r1", devices)


POP = fleet(2000)


def spec(**changes: Any) -> RolloutSpec:
    base = {
        "release": "detector@2.0.0",
        "select": "hardware=rpi4,hardware=rpi5,hardware=jetson",
        "waves": "1%,10%,50%,100%",
        "bake": "30m",
    }
    return RolloutSpec.model_validate({**base, **changes})


def gate(
    name: str,
    decision: Decision,
    severity: Severity = "stop",
    missing: str | None = None,
    log_e_harm: float = 0.0,
) -> GateEvaluation:
    return GateEvaluation(
        gate=name,
        severity=severity,
        decision=decision,
        n_devices=40,
        n_control=400,
        n_requests=24_000,
        estimate=0.001,
        low=-0.01,
        high=0.012,
        harm_at=0.0,
        margin=0.02,
        log_e_harm=log_e_harm,
        log_e_ni=5.2,
        alpha=0.00625,
        beta=0.00625,
        missing=missing,
    )


def passing(*, but: dict[str, GateEvaluation] | None = None) -> list[GateEvaluation]:
    found = {name: gate(name, "pass") for name in GATES} | (but or {})
    return [*found.values(), gate("class_mix", "inconclusive", severity="warn")]


def tick(evaluations: Sequence[GateEvaluation] | None = None, srm: float | None = 0.0) -> Tick:
    return Tick(passing() if evaluations is None else evaluations, srm, POP)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def of(kind: type, effects: Sequence[Effect]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def kinds(effects: Sequence[Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def started(s: RolloutSpec) -> RolloutState:
    state, _ = decide(RolloutState(), Start(POP), s, T0)
    return state


def reached_share(state: RolloutState, population: Population = POP) -> float:
    return float((waves(state.plan, population) > 0).mean())


# -- states in every phase, reached by the rules themselves ------------------------------


def in_phase(phase: Phase) -> tuple[RolloutState, RolloutSpec]:
    plain, shadowed, rollback = spec(), spec(shadow="1h"), spec(on_failure="rollback")
    harm = tick(passing(but={"fallback_rate": gate("fallback_rate", "fail")}))
    if phase == Phase.PENDING:
        return RolloutState(), plain
    if phase == Phase.SHADOW:
        return started(shadowed), shadowed
    if phase == Phase.BAKING:
        return started(plain), plain
    if phase == Phase.PAUSED:
        return decide(started(plain), Pause("ops"), plain, minutes(1))[0], plain
    if phase == Phase.STOPPED:
        return decide(started(plain), harm, plain, minutes(1))[0], plain
    if phase == Phase.ROLLING_BACK:
        return decide(started(rollback), harm, rollback, minutes(1))[0], rollback
    if phase == Phase.COMPLETED:
        state = started(plain)
        while state.phase != Phase.COMPLETED:
            state, _ = decide(state, Promote("ops", POP), plain, minutes(1))
        return state, plain
    assert phase == Phase.ABORTED
    return decide(started(plain), Abort("ops"), plain, minutes(1))[0], plain


EVENTS: dict[type, Event] = {
    Start: Start(POP),
    Tick: tick(),
    Pause: Pause("ops", "looking at the dashboards"),
    Resume: Resume("ops"),
    Promote: Promote("ops", POP, "the field team asked"),
    Abort: Abort("ops", "wrong release"),
}

# (phase, event) -> (the phase after, the effects) for the event above, two minutes in.
EXPECTED: dict[tuple[Phase, type], tuple[Phase, list[str]]] = {
    (Phase.PENDING, Start): (Phase.BAKING, ["AssignStage", "AssignDevices", "RecordDecision"]),
    (Phase.PENDING, Abort): (Phase.ABORTED, ["RecordDecision"]),
    (Phase.SHADOW, Tick): (Phase.SHADOW, ["AssignDevices", "RecordDecision"]),
    (Phase.SHADOW, Pause): (Phase.PAUSED, ["RecordDecision"]),
    (Phase.SHADOW, Promote): (Phase.BAKING, ["ServeStage", "AssignDevices", "RecordDecision"]),
    (Phase.SHADOW, Abort): (Phase.ABORTED, ["RecordDecision"]),
    (Phase.BAKING, Tick): (Phase.BAKING, ["AssignDevices", "RecordDecision"]),
    (Phase.BAKING, Pause): (Phase.PAUSED, ["RecordDecision"]),
    (Phase.BAKING, Promote): (Phase.BAKING, ["AssignStage", "AssignDevices", "RecordDecision"]),
    (Phase.BAKING, Abort): (Phase.ABORTED, ["RecordDecision"]),
    (Phase.PAUSED, Tick): (Phase.PAUSED, ["RecordDecision"]),
    (Phase.PAUSED, Resume): (Phase.BAKING, ["RecordDecision"]),
    (Phase.PAUSED, Promote): (Phase.BAKING, ["AssignStage", "AssignDevices", "RecordDecision"]),
    (Phase.PAUSED, Abort): (Phase.ABORTED, ["RecordDecision"]),
    (Phase.STOPPED, Tick): (Phase.STOPPED, ["RecordDecision"]),
    (Phase.STOPPED, Abort): (Phase.ABORTED, ["RecordDecision"]),
    (Phase.ROLLING_BACK, Tick): (Phase.ROLLING_BACK, []),
    (Phase.COMPLETED, Tick): (Phase.COMPLETED, []),
    (Phase.ABORTED, Tick): (Phase.ABORTED, []),
}


def test_the_expectations_name_every_row_of_the_table() -> None:
    assert set(EXPECTED) == {(t.phase, t.event) for t in TRANSITIONS}


@pytest.mark.parametrize(
    ("phase", "event"), list(EXPECTED), ids=lambda x: getattr(x, "__name__", x)
)
def test_every_row_of_the_table(phase: Phase, event: type) -> None:
    state, s = in_phase(phase)
    assert state.phase == phase
    after, effects = decide(state, EVENTS[event], s, minutes(2))
    to, effect_kinds = EXPECTED[(phase, event)]
    assert after.phase == to
    assert kinds(effects) == effect_kinds
    if effects:
        (record,) = of(RecordDecision, effects)
        assert record.record == after.history[-1]
        assert (record.record.from_phase, record.record.phase) == (phase, to)
        assert record.record.seq == state.decisions + 1 == after.decisions
    else:
        assert after == state


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(EVENTS), ids=lambda e: e.__name__)
def test_an_event_the_table_does_not_name_is_refused_naming_both(phase: Phase, event: type) -> None:
    if (phase, event) in EXPECTED:
        return
    state, s = in_phase(phase)
    with pytest.raises(ActionRefused) as refused:
        decide(state, EVENTS[event], s, minutes(2))
    assert event.__name__ in str(refused.value) and phase.value in str(refused.value)
    assert (refused.value.phase, refused.value.event) == (phase, event.__name__)
    assert isinstance(refused.value, Conflict)  # the API answers it 409


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        decide(RolloutState(), Start(POP), spec(), datetime(2026, 3, 2, 12, 0))


# -- a whole rollout ---------------------------------------------------------------------


def run(
    state: RolloutState,
    s: RolloutSpec,
    start: float,
    until: float,
    evaluations: Sequence[GateEvaluation] | None = None,
    every: float = 5,
) -> tuple[RolloutState, list[tuple[float, Effect]]]:
    """Ticks from ``start`` to ``until`` minutes with the same evaluations; the effects, timed."""
    seen: list[tuple[float, Effect]] = []
    t = start
    while t <= until and state.phase not in FINAL_PHASES:
        state, effects = decide(state, tick(evaluations), s, minutes(t))
        seen.extend((t, e) for e in effects)
        t += every
    return state, seen


def test_a_rollout_whose_gates_pass_goes_through_every_wave_and_the_holdback_and_completes() -> (
    None
):
    s = spec()
    assert len(s.shares) == 5  # 1 %, 10 %, 50 %, 95 %, then the 5 % holdback's release
    state, first = decide(RolloutState(), Start(POP), s, T0)
    assert of(AssignStage, first) == [AssignStage(1)]
    state, seen = run(state, s, 5, 24 * 60)
    assert state.phase == Phase.COMPLETED
    stages = [(t, e.stage) for t, e in seen if isinstance(e, AssignStage)]
    # Each stage promotes at the first tick once its 30-minute bake has passed.
    assert stages == [(30, 2), (60, 3), (90, 4), (120, 5)]
    records = [e.record for e in [*first, *(e for _, e in seen)] if isinstance(e, RecordDecision)]
    assert [r.seq for r in records] == list(range(1, state.decisions + 1))  # the store gets all
    assert [r.action for r in records if r.action.startswith(("start", "complete"))] == [
        "start wave 1",
        "start stage 2",
        "start stage 3",
        "start stage 4",
        "start stage 5",
        "complete",
    ]
    assert state.history[-1].rule == "bake passed and every required gate passes"
    assert state.history[-1].at == minutes(150)
    assert reached_share(state) == 1.0
    assert state.history[-1].reached == state.history[-1].matched == len(POP)


def test_each_stage_reaches_its_share_of_the_devices_and_the_holdback_waits_for_the_last() -> None:
    s = spec()
    state = started(s)
    shares = []
    for k in range(2, 6):
        shares.append(reached_share(state))
        state, effects = decide(state, Promote("ops", POP), s, minutes(k))
        assert of(AssignStage, effects) == [AssignStage(k)]
    shares.append(reached_share(state))
    assert shares[0] == pytest.approx(0.01, abs=0.01)  # one canary a stratum at most over 1 %
    assert shares[1:4] == pytest.approx([0.10, 0.50, 0.95], abs=0.005)
    assert shares[4] == 1.0


def test_the_install_gate_is_required_only_from_the_promotion_into_the_last_wave() -> None:
    s = spec()
    young = {
        "install_failures": gate(
            "install_failures", "inconclusive", missing="needs 900 more installs"
        )
    }
    state, seen = run(started(s), s, 5, 4 * 60, passing(but=young))
    assert [e.stage for _, e in seen if isinstance(e, AssignStage)] == [2, 3]
    assert state.phase == Phase.PAUSED and state.stage == 3  # 50 %: the last wave (95 %) waits
    assert state.missing == {"install_failures": "needs 900 more installs"}
    assert "install_failures needs 900 more installs" in (state.reason or "")
    assert "install_failures" not in required_gates(replace(state, stage=2), s)
    assert "install_failures" in required_gates(state, s)


def test_the_controller_requires_what_the_gates_rule_says_at_every_stage() -> None:
    for s in (spec(), spec(shadow="1h"), spec(waves="100%"), spec(waves="5%,100%", holdback=0)):
        specs = gate_specs(s.gates, shadow=s.shadow is not None)
        for stage in range(len(s.shares)):
            state = replace(started(s), stage=stage)
            assert required_gates(state, s) == required(specs, stage, len(s.waves)), (s, stage)
        assert required_gates(replace(started(s), stage=len(s.shares)), s) == []


def test_a_labelled_accuracy_gate_without_labels_does_not_hold_a_promotion() -> None:
    s = spec()
    no_labels = {
        "accuracy_labelled": gate("accuracy_labelled", "inconclusive", missing="labels"),
    }
    state, seen = run(started(s), s, 5, 35, passing(but=no_labels))
    assert state.stage == 2 and [e.stage for _, e in seen if isinstance(e, AssignStage)] == [2]
    assert "accuracy_labelled" in state.known_gates  # evaluated, a stop-gate, never required


def test_a_one_wave_rollout_requires_the_install_gate_before_its_holdback_is_released() -> None:
    s = spec(waves="100%")
    state = started(s)
    assert s.shares[0] == pytest.approx(0.95) and len(s.shares) == 2
    assert set(required_gates(decide(state, tick(), s, minutes(1))[0], s)) == set(GATES)


# -- harm, mismatch, too little evidence -------------------------------------------------------


def test_a_failing_stop_gate_stops_assigning_and_devices_keep_what_they_have() -> None:
    s = spec(rate="10/min")
    state, _ = run(started(s), s, 5, 40)  # into stage 2
    assert state.stage == 2
    bad = passing(but={"latency_p95": gate("latency_p95", "fail", log_e_harm=6.1)})
    state, effects = decide(state, tick(bad), s, minutes(45))
    assert state.phase == Phase.STOPPED and state.stage == 2
    assert kinds(effects) == ["RecordDecision"]
    assert state.reason is not None and state.reason.startswith("stop-gate failed: latency_p95")
    record = state.history[-1]
    assert (record.rule, record.action) == ("harm shown", "stop")
    assert record.evaluations == tuple(bad)
    # Stopped: later ticks record, never assign; good news changes nothing.
    state, seen = run(state, s, 50, 300)
    assert state.phase == Phase.STOPPED
    assert kinds([e for _, e in seen]) == ["RecordDecision"] * 51
    with pytest.raises(ActionRefused):
        decide(state, Resume("ops"), s, minutes(301))


def test_a_failing_stop_gate_with_rollback_sends_every_device_reached_back() -> None:
    s = spec(on_failure="rollback")
    state, _ = run(started(s), s, 5, 70)
    assert state.stage == 3
    bad = passing(but={"install_failures": gate("install_failures", "fail")})
    state, effects = decide(state, tick(bad), s, minutes(75))
    assert state.phase == Phase.ROLLING_BACK
    (rollback,) = of(RollbackReached, effects)
    assert rollback.stage == 3 and "install_failures shows harm" in rollback.reason
    assert state.history[-1].action == "roll back"
    assert decide(state, tick(bad), s, minutes(80)) == (state, [])


def test_harm_shown_while_paused_still_stops_and_rolls_back() -> None:
    s = spec(on_failure="rollback")
    state, _ = decide(started(s), Pause("ops"), s, minutes(1))
    bad = passing(but={"fallback_rate": gate("fallback_rate", "fail")})
    state, effects = decide(state, tick(bad), s, minutes(5))
    assert state.phase == Phase.ROLLING_BACK
    assert of(RollbackReached, effects) == [RollbackReached(1, state.reason or "")]


def test_a_failing_warn_gate_never_stops_and_its_warning_is_recorded() -> None:
    s = spec()
    mix = gate("class_mix", "fail", severity="warn")
    state, _ = run(started(s), s, 5, 24 * 60, [*passing()[:-1], mix])
    assert state.phase == Phase.COMPLETED
    assert all(
        r.warnings == ("class_mix: harm shown (a warning, not a stop)",) for r in state.history[1:]
    )


def test_a_sample_ratio_mismatch_pauses() -> None:
    s = spec()
    state, _ = decide(started(s), tick(srm=SRM_THRESHOLD - 0.01), s, minutes(5))
    assert state.phase == Phase.BAKING
    state, effects = decide(state, tick(srm=SRM_THRESHOLD + 0.01), s, minutes(10))
    assert state.phase == Phase.PAUSED
    assert state.reason is not None and state.reason.startswith("sample ratio mismatch")
    assert kinds(effects) == ["RecordDecision"]
    assert state.history[-1].rule == "sample ratio mismatch"
    assert math.isclose(SRM_THRESHOLD, math.log(1000))


def test_an_inconclusive_wave_pauses_after_the_maximum_bake_saying_what_each_gate_lacks() -> None:
    s = spec(max_bake="2h")
    weak = {
        "fallback_rate": gate("fallback_rate", "inconclusive", missing="needs 14 more devices"),
        "accuracy_estimated": gate("accuracy_estimated", "inconclusive"),
    }
    state, seen = run(started(s), s, 5, 115, passing(but=weak))
    assert state.phase == Phase.BAKING and state.stage == 1  # baked, but never promoted
    assert not of(AssignStage, [e for _, e in seen])
    assert state.history[-1].rule == "waiting for the gates"
    state, effects = decide(state, tick(passing(but=weak)), s, minutes(120))
    assert state.phase == Phase.PAUSED
    assert state.missing == {
        "accuracy_estimated": "has shown neither harm nor non-inferiority yet",
        "fallback_rate": "needs 14 more devices",
    }
    assert state.reason == (
        "inconclusive after 2h00m: accuracy_estimated has shown neither harm nor "
        "non-inferiority yet; fallback_rate needs 14 more devices"
    )
    assert kinds(effects) == ["RecordDecision"]
    # Resumed, it waits a whole maximum bake again before pausing again.
    state, _ = decide(state, Resume("ops"), s, minutes(130))
    state, _ = run(state, s, 135, 245, passing(but=weak))
    assert state.phase == Phase.BAKING
    state, _ = decide(state, tick(passing(but=weak)), s, minutes(250))
    assert state.phase == Phase.PAUSED


def test_a_gate_that_stops_reporting_is_not_passing() -> None:
    s = spec(max_bake="1h")
    state, _ = decide(started(s), tick(), s, minutes(5))
    without = [e for e in passing() if e.gate != "latency_p95"]
    state, _ = run(state, s, 10, 60, without)
    assert state.phase == Phase.PAUSED and state.stage == 1
    assert state.missing == {"latency_p95": "has no evaluation at this tick"}


def test_no_evaluation_at_all_never_promotes() -> None:
    s = spec()
    state, seen = run(started(s), s, 5, 24 * 60, [])
    assert state.phase == Phase.PAUSED and state.stage == 1
    assert state.missing == {"gates": "none evaluated yet; no stop-gate has evidence"}
    assert not of(AssignStage, [e for _, e in seen])


def test_the_stage_reaching_every_device_completes_after_its_bake_unless_harm_is_shown() -> None:
    s = spec(holdback=0, waves="50%,100%")
    state, _ = decide(started(s), Promote("ops", POP), s, minutes(1))
    assert state.stage == 2 and required_gates(state, s) == []
    state, _ = run(state, s, 5, 30, [])
    assert state.phase == Phase.BAKING
    state, _ = decide(state, tick([]), s, minutes(31))
    assert state.phase == Phase.COMPLETED


# -- operators -----------------------------------------------------------------------------


def test_an_operator_pause_assigns_nothing_until_resumed() -> None:
    s = spec(rate="5/min")
    state, _ = decide(started(s), Pause("ana", "checking a customer report"), s, minutes(1))
    assert state.reason == "paused by ana: checking a customer report"
    assert state.history[-1].by == "ana" and state.history[-1].rule == "operator pause"
    state, seen = run(state, s, 2, 60)
    assert state.phase == Phase.PAUSED  # passing gates do not resume it
    assert not [e for _, e in seen if isinstance(e, ASSIGNING)]
    state, effects = decide(state, Resume("ana"), s, minutes(61))
    assert state.phase == Phase.BAKING and state.watch_from == minutes(61)
    assert state.reason is None
    state, effects = decide(state, tick(), s, minutes(62))
    assert state.stage == 2  # baked long ago and every gate passes
    assert of(AssignStage, effects) == [AssignStage(2)]


def test_an_operator_promote_is_an_override_recorded_as_such() -> None:
    s = spec()
    weak = passing(but={"fallback_rate": gate("fallback_rate", "inconclusive")})
    state, _ = decide(started(s), tick(weak), s, minutes(1))
    state, effects = decide(state, Promote("bo", POP, "the lab run was clean"), s, minutes(2))
    assert state.stage == 2 and state.phase == Phase.BAKING
    assert state.stage_started_at == minutes(2)
    record = state.history[-1]
    assert (record.event, record.by, record.rule) == ("promote", "bo", "operator override")
    assert record.reason == "promoted by bo: the lab run was clean"
    assert of(AssignStage, effects) == [AssignStage(2)]


def test_an_operator_abort_ends_the_rollout() -> None:
    s = spec()
    state, _ = decide(started(s), Abort("cy", "wrong release"), s, minutes(3))
    assert state.phase == Phase.ABORTED and state.reason == "aborted by cy: wrong release"
    state, seen = run(state, s, 5, 60)
    assert seen == []
    for event in (Pause("cy"), Resume("cy"), Promote("cy", POP), Abort("cy"), Start(POP)):
        with pytest.raises(ActionRefused, match="aborted"):
            decide(state, event, s, minutes(61))


# -- the shadow stage ----------------------------------------------------------------------


def test_a_shadow_runs_on_wave_1_first_and_serves_once_judged() -> None:
    s = spec(shadow="1h")
    state, effects = decide(RolloutState(), Start(POP), s, T0)
    assert state.phase == Phase.SHADOW and state.stage == 0
    assert of(InstallShadow, effects) == [InstallShadow(1)]
    assert not of(AssignStage, effects)
    assert reached_share(state) == pytest.approx(0.01, abs=0.01)  # the wave-1 devices hold it
    # The shadow stage is judged by its own gates; the others' passes do not count there.
    state, _ = run(state, s, 5, 30)
    assert state.phase == Phase.SHADOW
    assert required_gates(state, s) == ["shadow_errors", "shadow_latency_p95"]
    shadow_passing = [
        gate("shadow_errors", "pass"),
        gate("shadow_latency_p95", "pass"),
        gate("shadow_agreement", "inconclusive", severity="warn"),
    ]
    state, _ = run(state, s, 35, 55, shadow_passing)
    assert state.phase == Phase.SHADOW  # passing, but not for an hour yet
    assert required_gates(state, s) == ["shadow_errors", "shadow_latency_p95"]
    state, effects = decide(state, tick(shadow_passing), s, minutes(60))
    assert state.phase == Phase.BAKING and state.stage == 1
    assert kinds(effects) == ["ServeStage", "AssignDevices", "RecordDecision"]
    assert state.history[-1].action == "serve wave 1"
    # Wave 1 is judged by the other gates from now on, never by the shadow's.
    assert not set(required_gates(state, s)) & {"shadow_errors", "shadow_latency_p95"}


def test_a_shadow_showing_harm_is_dropped_with_rollback() -> None:
    s = spec(shadow="1h", on_failure="rollback")
    bad = passing(but={"latency_p95": gate("latency_p95", "fail")})
    state, effects = decide(started(s), tick(bad), s, minutes(5))
    assert state.phase == Phase.ROLLING_BACK
    assert [e.stage for e in of(RollbackReached, effects)] == [0]


def test_a_paused_shadow_resumes_as_a_shadow() -> None:
    s = spec(shadow="1h")
    state, _ = decide(started(s), Pause("ops"), s, minutes(5))
    state, _ = decide(state, Resume("ops"), s, minutes(6))
    assert state.phase == Phase.SHADOW and state.stage == 0


# -- pacing ------------------------------------------------------------------------------


def test_installs_are_granted_by_the_ramp_each_grant_once() -> None:
    s = spec(rate="10/min", rate_factor=2, window="Mon-Fri 02:00-05:00 Europe/Berlin")
    state, effects = decide(RolloutState(), Start(POP), s, T0)
    assert of(AssignDevices, effects) == [AssignDevices(1, 10, s.window)]
    limits = []
    for second in range(20, 4 * 60, 20):
        state, effects = decide(state, tick(), s, T0 + timedelta(seconds=second))
        limits.append(sum(e.limit for e in of(AssignDevices, effects)))
    # Minute 1 adds 20, minute 2 adds 40, minute 3 adds 80, each at the first tick of the minute.
    assert limits == [0, 0, 20, 0, 0, 40, 0, 0, 80, 0, 0]
    assert state.granted[1] == 10 + 20 + 40 + 80


def test_a_pause_saves_no_installs_up_the_ramp_starts_again_at_a_resume() -> None:
    s = spec(rate="10/min", max_bake="6h")
    weak = passing(but={"fallback_rate": gate("fallback_rate", "inconclusive")})
    state, _ = decide(started(s), Pause("ops"), s, minutes(0.5))
    state, _ = run(state, s, 1, 60, weak)
    assert state.granted[1] == 10
    state, _ = decide(state, Resume("ops"), s, minutes(60.5))
    state, effects = decide(state, tick(weak), s, minutes(60.6))
    assert of(AssignDevices, effects) == [AssignDevices(1, 10, None)]
    state, effects = decide(state, tick(weak), s, minutes(61.6))
    assert of(AssignDevices, effects) == [AssignDevices(1, 10, None)]
    assert state.granted[1] == 30


def test_without_a_rate_every_tick_lets_the_stage_assign_all() -> None:
    s = spec()
    _, effects = decide(started(s), tick(), s, minutes(1))
    assert of(AssignDevices, effects) == [AssignDevices(1, None, None)]


def test_a_new_stage_ramps_from_its_own_start() -> None:
    s = spec(rate="10/min", rate_factor=2)
    state, _ = run(started(s), s, 5, 29)
    state, effects = decide(state, tick(), s, minutes(30))
    assert state.stage == 2
    assert of(AssignDevices, effects) == [AssignDevices(2, 10, None)]


# -- replays and persistence ----------------------------------------------------------------


def test_a_replayed_tick_changes_nothing_and_has_no_effects() -> None:
    s = spec(rate="10/min", rate_factor=2)
    state = started(s)
    for t in (1, 7, 30, 31, 65):
        event = tick(srm=1.0)
        after, effects = decide(state, event, s, minutes(t))
        assert effects  # each first time, at least its record
        assert decide(after, event, s, minutes(t)) == (after, [])
        assert decide(after, event, s, minutes(t - 0.5)) == (after, [])
        state = after


def test_a_step_lost_before_it_was_stored_is_taken_again_the_same_way() -> None:
    s = spec(rate="10/min", rate_factor=2)
    stored = run(started(s), s, 1, 29)[0].to_json()
    lost = decide(RolloutState.from_json(stored), tick(), s, minutes(30))
    again = decide(RolloutState.from_json(json.loads(json.dumps(stored))), tick(), s, minutes(30))
    assert lost == again
    assert of(AssignStage, lost[1]) == [AssignStage(2)]


def test_the_state_goes_to_json_and_back_exactly() -> None:
    s = spec(rate="10/min", rate_factor=1.5, on_failure="rollback", max_bake="1h")
    odd = gate("fallback_rate", "inconclusive", missing="needs requests")
    odd = replace(odd, estimate=None, low=-math.inf, high=math.inf, log_e_harm=-math.inf)
    state, _ = run(started(s), s, 2, 140, passing(but={"fallback_rate": odd}), every=2)
    state, _ = decide(state, Resume("ops"), s, minutes(141))
    state, _ = decide(state, tick(srm=1.25), s, minutes(142))
    assert state.phase == Phase.BAKING and state.missing == {}
    assert len(state.history) == HISTORY_LIMIT and state.decisions > HISTORY_LIMIT
    paused = decide(state, Pause("ops"), s, minutes(143))[0]
    for each in (RolloutState(), started(spec(shadow="1h")), state, paused):
        text = json.dumps(each.to_json(), allow_nan=False)
        assert RolloutState.from_json(json.loads(text)) == each
    assert plan_from_json(json.loads(json.dumps(plan_to_json(state.plan)))) == state.plan


def test_a_state_of_another_version_is_refused() -> None:
    data = RolloutState().to_json() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        RolloutState.from_json(data)


def test_new_strata_are_fixed_at_the_tick_that_first_sees_them() -> None:
    s = spec()
    state = started(s)
    grown = Population.of(
        "r1",
        [
            *(DeviceFacts(d, "rpi4", "eu-west") for d in POP.ids[:10]),
            *(DeviceFacts(f"new-{i}", "rpi5", "ap-south") for i in range(50)),
        ],
    )
    assert ("rpi5", "ap-south") not in state.plan.strata
    state, _ = decide(state, Tick(passing(), 0.0, grown), s, minutes(1))
    assert state.plan.strata[("rpi5", "ap-south")].canaries  # wave 1 holds the new stratum too
    assert state.plan.stage == 1


# -- a property over random sequences -------------------------------------------------------


def random_event(rng: random.Random, population: Population) -> Event:
    roll = rng.random()
    if roll < 0.04:
        return Pause("ops")
    if roll < 0.08:
        return Resume("ops")
    if roll < 0.11:
        return Promote("ops", population)
    if roll < 0.12:
        return Abort("ops")
    decisions: tuple[Decision, ...] = ("pass", "pass", "pass", "inconclusive", "fail")
    weights = (30, 30, 30, 8, 0.4)
    evaluations = [
        gate(
            name, rng.choices(decisions, weights)[0], severity=rng.choice(("stop", "stop", "warn"))
        )
        for name in GATES
        if rng.random() < 0.97
    ]
    srm = rng.choice((None, 0.5, 2.0, 3.0, SRM_THRESHOLD + 1)) if rng.random() < 0.1 else 0.0
    return Tick(evaluations, srm, population)


@pytest.mark.parametrize("seed", range(8))
def test_the_stage_never_goes_back_and_a_halted_rollout_never_assigns(seed: int) -> None:
    rng = random.Random(seed)
    population = fleet(300, seed)
    phases_seen: set[Phase] = set()
    for _ in range(25):
        s = spec(
            shadow=rng.choice((None, "20m")),
            on_failure=rng.choice(("pause", "rollback")),
            rate=rng.choice((None, "3/min")),
            max_bake="1h",
        )
        state, _ = decide(RolloutState(), Start(population), s, T0)
        now = T0
        for _ in range(120):
            now += timedelta(minutes=rng.choice((0, 1, 5, 10)))
            event = random_event(rng, population)
            try:
                after, effects = decide(state, event, s, now)
            except ActionRefused:
                continue
            assert after.stage >= state.stage
            assert after.plan.stage >= state.plan.stage
            assert after.decisions >= state.decisions
            assigning = [e for e in effects if isinstance(e, ASSIGNING)]
            if state.phase in (Phase.STOPPED, *FINAL_PHASES):
                assert assigning == []
                assert after.phase in (state.phase, Phase.ABORTED)
            if state.phase == Phase.PAUSED and not isinstance(event, Resume | Promote):
                assert assigning == []
            if after.phase in (Phase.PAUSED, Phase.STOPPED, *FINAL_PHASES):
                assert assigning == [] or isinstance(event, Promote)
            if of(RollbackReached, effects):
                assert after.phase == Phase.ROLLING_BACK and s.on_failure == "rollback"
            phases_seen.add(after.phase)
            state = after
    assert {Phase.BAKING, Phase.PAUSED, Phase.COMPLETED} <= phases_seen
