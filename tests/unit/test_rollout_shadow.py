"""The shadow stage over the pure core: synthetic wave-1 devices running a shadow beside their
active model, judged by the shadow gates at every tick, stepped by the controller (seeded)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import pytest

from fleet_server.rollouts.controller import (
    SRM_THRESHOLD,
    DropShadows,
    Promote,
    RollbackReached,
    ServeStage,
    Start,
    Tick,
    decide,
)
from fleet_server.rollouts.evidence import (
    INSTALL_FAILURES,
    SHADOW_AGREEMENT,
    SHADOW_ERRORS,
    SHADOW_GATES,
    SHADOW_LATENCY_P95,
    DeviceAggregate,
    InstallTally,
    ShadowDevice,
    ShadowInstall,
    gather_shadow,
    shadow_install_tally,
    shadow_reporting,
)
from fleet_server.rollouts.gates import (
    SHADOW_DEFAULTS,
    UnknownGateError,
    evaluate_all,
    gate_specs,
    split,
    srm_log_e,
)
from fleet_server.rollouts.state import Phase, RolloutState
from fleet_server.rollouts.verdicts import GateEvaluation
from fleet_server.rollouts.waves import DeviceFacts, Population, waves
from protocol.api.rollouts import GateOverride, RolloutSpec

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def population(n: int = 3000, seed: int = 0) -> Population:
    rng = random.Random(seed)
    return Population.of(
        "r1",
        [DeviceFacts(f"dev-{i:05d}", rng.choice(("rpi4", "rpi5")), "eu") for i in range(n)],
    )


POP = population()


def spec(**changes: Any) -> RolloutSpec:
    base = {
        "release": "detector@2.0.0",
        "select": "hardware=rpi4,hardware=rpi5",
        "waves": "1%,10%,50%,100%",
        "bake": "30m",
        "shadow": "1h",
    }
    return RolloutSpec.model_validate({**base, **changes})


@dataclass
class Wave1:
    """Wave-1 devices in the field: per minute, each sends ``requests`` and the shadow runs
    on ``shadow_share`` of them, erring at ``shadow_error`` (the active model at 0.1 %)."""

    ids: list[str]
    shadow_share: float = 0.5
    shadow_error: float = 0.001
    agreement: float = 0.95
    slower: float = 1.0
    requests: int = 60
    seed: int = 0
    sums: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        # Each device's own latency level: devices differ far more than their requests.
        self.level = {d: self.rng.normal(math.log(40.0), 0.3) for d in self.ids}
        self.sums = {d: dict.fromkeys(("n", "a", "e", "sn", "sa", "se"), 0.0) for d in self.ids}

    def minutes(self, count: int) -> list[ShadowDevice]:
        for d in self.ids:
            s = self.sums[d]
            n = self.requests * count
            shadow = self.rng.binomial(n, self.shadow_share)
            errors = self.rng.binomial(shadow, self.shadow_error)
            s["n"] += n
            s["e"] += self.rng.binomial(n, 0.001)
            s["sn"] += shadow
            s["se"] += errors
            s["sa"] += self.rng.binomial(shadow - errors, self.agreement)
        out = []
        for d in self.ids:
            s = self.sums[d]
            if s["sn"] == 0:
                out.append(ShadowDevice(d, active_requests=int(s["n"]), active_errors=int(s["e"])))
                continue
            # p95 of the hours so far: the device's level plus its estimation noise.
            noise = 0.5 / math.sqrt(s["sn"])
            out.append(
                ShadowDevice(
                    device_id=d,
                    requests=int(s["sn"]),
                    agreements=int(s["sa"]),
                    errors=int(s["se"]),
                    log_p95=self.level[d] + math.log(self.slower) + self.rng.normal(0, noise),
                    active_requests=int(s["n"]),
                    active_errors=int(s["e"]),
                    active_log_p95=self.level[d] + self.rng.normal(0, 0.5 / math.sqrt(s["n"])),
                )
            )
        return out


def run(
    s: RolloutSpec, make: Any, until: int = 180, every: int = 5
) -> tuple[RolloutState, list[Any], list[GateEvaluation]]:
    """Start, then tick every ``every`` minutes judging the shadow gates, until the stage ends."""
    state, effects = decide(RolloutState(), Start(POP), s, T0)
    assert state.phase == Phase.SHADOW
    wave1 = [POP.ids[i] for i in np.flatnonzero(waves(state.plan, POP))]
    assert len(wave1) >= 20
    devices = make(wave1)
    specs = gate_specs(s.gates, shadow=True)
    seen: list[Any] = list(effects)
    evaluations: list[GateEvaluation] = []
    for minute in range(every, until + 1, every):
        evidence = gather_shadow(devices.minutes(every))
        evaluations = evaluate_all(specs, evidence, only=SHADOW_GATES)
        state, effects = decide(
            state, Tick(evaluations, None, POP), s, T0 + timedelta(minutes=minute)
        )
        seen += effects
        if state.phase != Phase.SHADOW:
            break
    return state, seen, evaluations


def test_a_good_shadow_passes_its_gates_and_wave_1_then_serves_it() -> None:
    for seed in range(5):
        s = spec()
        state, effects, evaluations = run(s, partial(Wave1, seed=seed))
        assert state.phase == Phase.BAKING and state.stage == 1, (seed, state.reason)
        assert [e for e in effects if isinstance(e, ServeStage)] == [ServeStage(1)]
        assert not [e for e in effects if isinstance(e, RollbackReached)]
        served_at = state.history[-1].at
        assert served_at >= T0 + timedelta(hours=1)  # the shadow runs at least its hour
        by_gate = {e.gate: e for e in evaluations}
        assert by_gate[SHADOW_ERRORS].decision == by_gate[SHADOW_LATENCY_P95].decision == "pass"
        assert by_gate[SHADOW_AGREEMENT].severity == "warn"


def test_a_shadow_producing_nan_is_stopped_and_with_rollback_its_shadows_are_dropped() -> None:
    for seed in range(5):
        s = spec(on_failure="rollback")
        state, effects, _ = run(s, partial(Wave1, shadow_error=0.05, seed=seed), until=60)
        assert state.phase == Phase.ROLLING_BACK, (seed, state.reason)
        assert [e.stage for e in effects if isinstance(e, RollbackReached)] == [0]
        assert not [e for e in effects if isinstance(e, ServeStage)]
        assert "shadow_errors shows harm" in (state.reason or "")
    stopped, effects, _ = run(spec(), lambda ids: Wave1(ids, shadow_error=0.05, seed=7), until=60)
    # on_failure=pause: stopped, and the shadows, which serve nothing but cost CPU, dropped.
    assert stopped.phase == Phase.STOPPED and stopped.stage == 0
    assert [e for e in effects if isinstance(e, DropShadows)] == [DropShadows()]
    assert not [e for e in effects if isinstance(e, RollbackReached | ServeStage)]


def test_a_stop_after_the_shadow_stage_drops_no_shadows() -> None:
    s = spec()
    state, _ = decide(RolloutState(), Start(POP), s, T0)
    state, _ = decide(state, Tick([], None, POP), s, T0 + timedelta(minutes=61))
    # No gate evaluated yet: the shadow stage waits. Promoted by an operator instead.
    state, effects = decide(state, Promote("ops", POP), s, T0 + timedelta(minutes=62))
    assert state.stage == 1 and ServeStage(1) in effects
    harm = evaluate_all(
        gate_specs(), {INSTALL_FAILURES: InstallTally(30, 30)}, only=[INSTALL_FAILURES]
    )
    state, effects = decide(state, Tick(harm, None, POP), s, T0 + timedelta(minutes=70))
    assert state.phase == Phase.STOPPED and state.stage == 1
    assert not [e for e in effects if isinstance(e, DropShadows)]


def test_a_slow_shadow_is_stopped_by_its_latency_gate() -> None:
    state, _, evaluations = run(spec(), lambda ids: Wave1(ids, slower=1.5, seed=3), until=120)
    assert state.phase == Phase.STOPPED, state.reason
    assert {e.gate: e.decision for e in evaluations}[SHADOW_LATENCY_P95] == "fail"


def test_too_few_shadow_requests_stay_inconclusive_and_pause_after_the_maximum_bake() -> None:
    s = spec()
    state, effects, evaluations = run(
        s, lambda ids: Wave1(ids, requests=1, shadow_share=0.02, seed=1), until=300
    )
    assert not [e for e in effects if isinstance(e, ServeStage)]
    assert state.phase == Phase.PAUSED and state.stage == 0
    assert state.missing == {SHADOW_ERRORS: "requests", SHADOW_LATENCY_P95: "requests"}
    assert "inconclusive after 2h00m" in (state.reason or "")
    assert all(e.decision == "inconclusive" for e in evaluations)


def test_agreement_warns_by_default_and_an_operators_minimum_makes_it_a_stop() -> None:
    state, _, _ = run(spec(), lambda ids: Wave1(ids, agreement=0.7, seed=2))
    assert state.phase == Phase.BAKING  # a better model may rightly disagree: served anyway
    assert any(SHADOW_AGREEMENT in w for d in state.history for w in d.warnings)
    strict = spec(gates={SHADOW_AGREEMENT: {"min_agreement": 0.9}})
    state, _, evaluations = run(strict, lambda ids: Wave1(ids, agreement=0.7, seed=2))
    assert state.phase == Phase.STOPPED and SHADOW_AGREEMENT in (state.reason or "")
    agreement = {e.gate: e for e in evaluations}[SHADOW_AGREEMENT]
    assert agreement.severity == "stop" and agreement.harm_at == pytest.approx(0.9)


def test_shadow_gates_share_alpha_with_the_others_and_belong_to_shadowed_rollouts_only() -> None:
    specs = gate_specs(shadow=True)
    alphas = split(0.05, specs)
    assert sum(alphas[s.name] for s in specs if s.severity == "stop") == pytest.approx(0.05)
    assert {s.name for s in SHADOW_DEFAULTS} == SHADOW_GATES
    with pytest.raises(UnknownGateError, match="shadow stage; this rollout has none"):
        gate_specs({SHADOW_ERRORS: GateOverride(margin=0.01)})
    with pytest.raises(UnknownGateError, match="min_agreement applies to shadow_agreement"):
        gate_specs({"latency_p95": GateOverride(min_agreement=0.9)}, shadow=True)
    # A rollout without a shadow stage judges exactly as before.
    plain = gate_specs()
    assert not {s.name for s in plain} & SHADOW_GATES


# -- shadow installs: a refusal is a failed install -----------------------------------

TIMEOUT = timedelta(hours=1)


def test_shadow_installs_refused_silent_overdue_or_never_running_count_as_failed() -> None:
    def one(**fields: Any) -> InstallTally:
        return shadow_install_tally([ShadowInstall("d", T0, **fields)], now, TIMEOUT)

    now = T0 + timedelta(minutes=90)
    recent = T0 + timedelta(minutes=80)
    running = {"shadow_requests": 40, "active_requests": 120, "last_seen": recent}
    assert one(result="refused", last_seen=recent) == InstallTally(1, 1)
    assert one(result="installed", installed_at=T0, **running) == InstallTally(0, 1)
    # Installed, its active model answering, its shadow running on nothing for over an hour.
    idle = {"shadow_requests": 0, "active_requests": 120, "last_seen": recent}
    assert one(result="installed", installed_at=T0, **idle) == InstallTally(1, 1)
    assert one(result="installed", installed_at=recent, **idle) == InstallTally(0, 1)
    # No traffic at all: nothing to run the shadow on, no failure of the shadow.
    assert one(result="installed", installed_at=T0, last_seen=recent) == InstallTally(0, 1)
    # No outcome: none yet within the timeout, failed after it, or when silent that long.
    assert shadow_install_tally(
        [ShadowInstall("d", T0)], T0 + timedelta(minutes=30), TIMEOUT
    ) == InstallTally(0, 0)
    assert one(last_seen=recent) == InstallTally(1, 1)
    assert one(result="installed", installed_at=T0, shadow_requests=40) == InstallTally(1, 1)


def test_a_shadow_refused_across_wave_1_stops_the_shadow_stage_on_the_install_gate() -> None:
    s = spec()
    state, _ = decide(RolloutState(), Start(POP), s, T0)
    wave1 = [POP.ids[i] for i in np.flatnonzero(waves(state.plan, POP))]
    now = T0 + timedelta(minutes=10)
    # Over its budget on every device: refused, so no shadow ever runs or reports.
    installs = [ShadowInstall(d, T0, "refused", last_seen=now) for d in wave1]
    evidence = {**gather_shadow([]), INSTALL_FAILURES: shadow_install_tally(installs, now, TIMEOUT)}
    specs = gate_specs(s.gates, shadow=True)
    evaluations = evaluate_all(specs, evidence, only=SHADOW_GATES | {INSTALL_FAILURES})
    by_gate = {e.gate: e for e in evaluations}
    assert by_gate[INSTALL_FAILURES].decision == "fail"
    assert by_gate[INSTALL_FAILURES].n_devices == len(wave1)
    assert by_gate[SHADOW_ERRORS].decision == "inconclusive"  # absent, never passing
    state, effects = decide(state, Tick(evaluations, None, POP), s, now)
    assert state.phase == Phase.STOPPED and "install_failures shows harm" in (state.reason or "")
    assert DropShadows() in effects
    # A few refusals among many installs show no harm: the shadow stage goes on.
    mixed = [
        ShadowInstall(d, T0, "refused" if i < 1 else "installed", T0, now, 50, 100)
        for i, d in enumerate(wave1)
    ]
    evidence[INSTALL_FAILURES] = shadow_install_tally(mixed, now, TIMEOUT)
    fine = evaluate_all(specs, evidence, only=SHADOW_GATES | {INSTALL_FAILURES})
    assert {e.gate: e for e in fine}[INSTALL_FAILURES].decision != "fail"


# -- sample-ratio mismatch in the shadow stage ----------------------------------------


def test_installed_shadows_not_reporting_pause_the_shadow_stage_as_a_ratio_mismatch() -> None:
    s = spec()
    state, _ = decide(RolloutState(), Start(POP), s, T0)
    in_wave = set(np.flatnonzero(waves(state.plan, POP)))
    wave1 = [POP.ids[i] for i in sorted(in_wave)]
    control = [
        DeviceAggregate(POP.ids[i], "control", windows=3)
        for i in range(len(POP))
        if i not in in_wave
    ]

    def srm(running: int) -> float:
        holders = [ShadowDevice(d, requests=30 if n < running else 0) for n, d in enumerate(wave1)]
        reporting, assigned = shadow_reporting(holders, control)
        assert assigned == (len(wave1), len(control))
        total = sum(assigned)
        return srm_log_e(list(reporting), [a / total for a in assigned])

    assert srm(len(wave1)) < SRM_THRESHOLD
    # A shadow that runs on a third of the devices that installed it: far fewer than their share.
    mismatch = srm(len(wave1) // 3)
    assert mismatch >= SRM_THRESHOLD
    state, effects = decide(state, Tick([], mismatch, POP), s, T0 + timedelta(minutes=10))
    assert state.phase == Phase.PAUSED and state.stage == 0
    assert "sample ratio mismatch" in (state.reason or "")
    assert not [e for e in effects if isinstance(e, DropShadows)]  # paused: kept for a resume
