"""Rollout gates: anytime-valid verdicts, their budgets, and the issue's simulated rollouts.

The simulations are seeded (deterministic) and vectorised over rollouts with
the gates' own functions (:mod:`benchmarks.rollout_gates`); the two that take
about ten seconds are marked slow. The figures beside a fixed-level test are
in benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.rollout_gates import AA, BAD, HALF_WAVE, SILENT, SRM_PAUSE, Plan, simulate
from fleet_server.rollouts.evidence import (
    ACCURACY_ESTIMATED,
    ACCURACY_LABELLED,
    CLASS_MIX,
    FALLBACK_RATE,
    INSTALL_FAILURES,
    LATENCY_P95,
    SHADOW_ERRORS,
    SHADOW_LATENCY_P95,
    ArmRates,
    Comparison,
    DeviceAggregate,
    InstallTally,
    gather,
)
from fleet_server.rollouts.gates import (
    DEFAULT_GATES,
    SHADOW_DEFAULTS,
    GateSpec,
    UnknownGateError,
    decide,
    evaluate,
    evaluate_all,
    gate_specs,
    install_log_e,
    normal_mixture_log_e,
    normal_mixture_reach,
    required,
    split,
    srm_log_e,
)
from protocol.api.rollouts import GateOverride, RolloutSpec

SPECS = {s.name: s for s in DEFAULT_GATES}
FALLBACK = SPECS[FALLBACK_RATE]
ACCURACY = SPECS[ACCURACY_ESTIMATED]
INSTALL = SPECS[INSTALL_FAILURES]


def comparison(estimate: float, se: float, devices: int = 100, requests: int = 6000) -> Comparison:
    return Comparison(estimate, se, devices, 9000, requests, 500_000)


# --------------------------------------------------------------------------- budgets and specs


def test_alpha_split_over_the_stop_gates_sums_to_alpha() -> None:
    shares = split(0.05, DEFAULT_GATES)
    stops = [s.name for s in DEFAULT_GATES if s.severity == "stop"]
    assert sum(shares[name] for name in stops) == pytest.approx(0.05)
    assert shares[INSTALL_FAILURES] == pytest.approx(0.05 * 5 / 9)
    assert shares[FALLBACK_RATE] == pytest.approx(0.05 / 9)


def test_warn_gates_draw_nothing_from_the_budget() -> None:
    as_warn = gate_specs({CLASS_MIX: GateOverride(severity="warn")})
    as_stop = gate_specs({CLASS_MIX: GateOverride(severity="stop")})
    assert split(0.05, as_warn)[FALLBACK_RATE] > split(0.05, as_stop)[FALLBACK_RATE]
    assert split(0.05, as_warn)[CLASS_MIX] == 0.05
    stops = [s.name for s in as_stop if s.severity == "stop"]
    assert sum(split(0.05, as_stop)[n] for n in stops) == pytest.approx(0.05)


def test_overrides_from_the_rollout_spec_change_only_what_they_name() -> None:
    spec = RolloutSpec.model_validate(
        {
            "release": "pump-health@1.1.0",
            "select": "tag=pumps",
            "waves": "1%,10%,50%,100%",
            "bake": "30m",
            "gates": {
                FALLBACK_RATE: {"margin": 0.2, "min_devices": 50},
                INSTALL_FAILURES: {"allowed_rate": 0.02},
                CLASS_MIX: {"severity": "stop"},
            },
        }
    )
    specs = {s.name: s for s in gate_specs(spec.gates)}
    assert specs[FALLBACK_RATE].bounds == (pytest.approx(math.log(1.2)),) * 2
    assert specs[FALLBACK_RATE].min_devices == 50
    assert specs[FALLBACK_RATE].min_requests == FALLBACK.min_requests
    assert specs[INSTALL_FAILURES].bounds == pytest.approx((0.02, 0.03))
    assert specs[CLASS_MIX].severity == "stop"
    assert specs[LATENCY_P95] == SPECS[LATENCY_P95]


def test_an_unknown_gate_or_a_misplaced_field_is_refused_by_name() -> None:
    with pytest.raises(UnknownGateError, match="no gate 'latency'"):
        gate_specs({"latency": GateOverride(margin=0.1)})
    with pytest.raises(UnknownGateError, match="allowed_rate applies"):
        gate_specs({FALLBACK_RATE: GateOverride(allowed_rate=0.01)})


def test_an_allowed_rate_outside_zero_to_one_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="allowed_rate"):
        GateOverride.model_validate({"allowed_rate": 1.5})
    with pytest.raises(ValidationError, match="allowed_rate"):
        GateOverride.model_validate({"allowed_rate": math.nan})


def test_a_moved_class_mix_warns_without_drawing_on_the_stop_budget() -> None:
    class_mix = SPECS[CLASS_MIX]
    verdict = evaluate_all(DEFAULT_GATES, {CLASS_MIX: comparison(0.3, 0.02)})[-1]
    assert (verdict.gate, verdict.severity, verdict.decision) == (CLASS_MIX, "warn", "fail")
    assert verdict.alpha == 0.05
    assert class_mix.required_from is None


def test_bounds_follow_the_direction_and_scale() -> None:
    assert ACCURACY.bounds == (-0.01, -0.01)
    assert FALLBACK.bounds[0] == pytest.approx(math.log(1.1))
    assert INSTALL.bounds == (0.01, 0.02)


def test_the_install_gates_pass_is_required_only_before_the_last_wave() -> None:
    assert required(DEFAULT_GATES, 1, 4) == [FALLBACK_RATE, LATENCY_P95, ACCURACY_ESTIMATED]
    assert required(DEFAULT_GATES, 2, 4) == [FALLBACK_RATE, LATENCY_P95, ACCURACY_ESTIMATED]
    assert INSTALL_FAILURES in required(DEFAULT_GATES, 3, 4)
    assert required(DEFAULT_GATES, 4, 4) == required(DEFAULT_GATES, 3, 4)  # holdback release
    # Out of the shadow into wave 1: the shadow's stop-gates, and only they, judge it.
    assert required(DEFAULT_GATES, 0, 4) == []
    with_shadow = (*DEFAULT_GATES, *SHADOW_DEFAULTS)
    assert required(with_shadow, 0, 4) == [SHADOW_ERRORS, SHADOW_LATENCY_P95]
    for later in (1, 2, 3, 4):
        assert required(with_shadow, later, 4) == required(DEFAULT_GATES, later, 4)
    for never in (ACCURACY_LABELLED, CLASS_MIX):
        assert never not in required(DEFAULT_GATES, 3, 4)


# --------------------------------------------------------------------------- the tests


def test_shown_harm_wins_over_a_shown_pass() -> None:
    assert decide(10.0, 10.0, 0.01, 0.01) == "fail"
    assert decide(1.0, 10.0, 0.01, 0.01) == "pass"
    assert decide(1.0, 1.0, 0.01, 0.01) == "inconclusive"


def test_normal_mixture_without_a_usable_se_is_no_evidence() -> None:
    values = normal_mixture_log_e(
        np.array([0.5, math.nan, 0.5, 0.5, math.inf]),
        np.array([math.nan, 0.1, 0.0, -1.0, 0.1]),
        0.0,
        "above",
        0.2,
    )
    assert values.tolist() == [0.0] * 5


def test_normal_mixture_stays_finite_far_on_the_nulls_side() -> None:
    value = float(normal_mixture_log_e(-1e6, 0.01, 0.0, "above", 0.2))
    assert math.isfinite(value) and value < -10


def test_normal_mixture_is_elementwise() -> None:
    estimates, ses = np.array([0.0, 0.1, -0.2]), np.array([0.05, 0.02, 0.1])
    together = normal_mixture_log_e(estimates, ses, 0.05, "below", 0.1)
    for i in range(3):
        alone = normal_mixture_log_e(float(estimates[i]), float(ses[i]), 0.05, "below", 0.1)
        assert together[i] == pytest.approx(float(alone))


def test_the_interval_and_the_verdict_agree() -> None:
    alpha = beta = 0.01
    for estimate in np.linspace(-0.1, 0.3, 41):
        verdict = evaluate(FALLBACK, comparison(float(estimate), 0.03), alpha, beta)
        assert verdict.low is not None and verdict.high is not None
        assert (verdict.decision == "fail") == (verdict.low >= verdict.harm_at - 1e-9)
        if verdict.decision != "fail":
            assert (verdict.decision == "pass") == (verdict.high <= verdict.margin + 1e-9)
    for estimate in np.linspace(-0.05, 0.02, 29):
        verdict = evaluate(ACCURACY, comparison(float(estimate), 0.005), alpha, beta)
        assert verdict.low is not None and verdict.high is not None
        assert (verdict.decision == "fail") == (verdict.high <= verdict.harm_at + 1e-9)


def test_the_confidence_sequence_covers_at_every_look() -> None:
    # Running means of N(theta, 1) for 400 looks over 4,000 paths: the one-sided
    # sequences at alpha each miss theta at some look in at most alpha of the paths.
    rng = np.random.default_rng(11)
    theta, looks, paths, level, tau = 0.3, 400, 4000, 0.05, 0.2
    n = np.arange(1, looks + 1)
    means = np.cumsum(theta + rng.standard_normal((paths, looks)), axis=1) / n
    se = 1 / np.sqrt(n)
    reach = np.array([normal_mixture_reach(float(s), level, tau) for s in se])
    above = np.any(means - reach > theta, axis=1).mean()
    below = np.any(means + reach < theta, axis=1).mean()
    assert above <= level and below <= level
    assert above + below > 0  # the sequence is not vacuous


def test_install_harm_e_process_holds_its_level_across_every_install() -> None:
    # At the allowed rate, installs one by one up to 5,000: a false stop at any
    # count in at most alpha of 2,000 paths. The e-value grows with k at fixed n,
    # so the first k that rejects at each n is found once.
    alpha = 0.05 * 5 / 9
    limit = math.log(1 / alpha)
    rng = np.random.default_rng(5)
    n_max, paths = 5000, 2000
    first_rejected = np.full(n_max + 1, np.inf)
    for n in range(1, n_max + 1):
        low, high = 0, n + 1  # the e-value rises with k: bisect for the first k that rejects
        while low < high:
            middle = (low + high) // 2
            if install_log_e(INSTALL, middle, n)[0] >= limit:
                high = middle
            else:
                low = middle + 1
        first_rejected[n] = low if low <= n else np.inf
    failures = np.cumsum(rng.random((paths, n_max)) < 0.01, axis=1)
    stopped = np.any(failures >= first_rejected[1:], axis=1).mean()
    assert stopped <= alpha


def test_install_gate_needs_thousands_to_pass_and_a_thousand_to_show_three_percent() -> None:
    a = b = split(0.05, DEFAULT_GATES)[INSTALL_FAILURES]
    assert evaluate(INSTALL, InstallTally(30, 1000), a, b).decision == "fail"
    assert evaluate(INSTALL, InstallTally(10, 1000), a, b).decision == "inconclusive"
    assert evaluate(INSTALL, InstallTally(50, 5000), a, b).decision == "pass"
    assert evaluate(INSTALL, InstallTally(3, 100), a, b).decision == "inconclusive"


def test_install_interval_matches_its_verdict() -> None:
    for failures in range(0, 60, 3):
        verdict = evaluate(INSTALL, InstallTally(failures, 1500), 0.03, 0.03)
        assert verdict.low is not None and verdict.high is not None
        assert verdict.low <= failures / 1500 <= verdict.high
        assert (verdict.decision == "fail") == (verdict.low > verdict.harm_at)
        if verdict.decision != "fail":
            assert (verdict.decision == "pass") == (verdict.high < verdict.margin)


def test_install_log_e_without_installs_is_no_evidence() -> None:
    assert install_log_e(INSTALL, 0, 0) == (0.0, 0.0)


def test_an_allowed_rate_of_zero_fails_on_the_first_failure() -> None:
    strict = gate_specs({INSTALL_FAILURES: GateOverride(allowed_rate=0.0)})[0]
    assert evaluate(strict, InstallTally(1, 1000), 0.03, 0.03).decision == "fail"
    assert evaluate(strict, InstallTally(0, 1000), 0.03, 0.03).decision != "fail"


def test_a_tally_with_more_failures_than_installs_is_refused() -> None:
    with pytest.raises(ValueError, match="not a tally"):
        evaluate(INSTALL, InstallTally(5, 3), 0.03, 0.03)


# --------------------------------------------------------------------------- missing evidence


def test_too_few_devices_is_inconclusive_however_good_the_estimate() -> None:
    verdict = evaluate(FALLBACK, comparison(-0.5, 0.001, devices=5), 0.01, 0.01)
    assert verdict.decision == "inconclusive" and verdict.missing == "devices"
    assert verdict.log_e_ni > math.log(100)  # the evidence would pass; the minimum holds it


def test_too_few_requests_says_requests() -> None:
    verdict = evaluate(FALLBACK, comparison(0.0, 0.01, requests=10), 0.01, 0.01)
    assert (verdict.decision, verdict.missing) == ("inconclusive", "requests")


def test_no_labels_says_labels() -> None:
    labelled = SPECS[ACCURACY_LABELLED]
    verdict = evaluate(labelled, Comparison(math.nan, math.nan, 0, 0, 0, 0), 0.01, 0.01)
    assert (verdict.decision, verdict.missing) == ("inconclusive", "labels")


def test_nan_evidence_never_reaches_a_verdict() -> None:
    for estimate, se in ((math.nan, 0.01), (0.5, math.nan), (math.inf, 0.01), (0.5, 0.0)):
        verdict = evaluate(FALLBACK, comparison(estimate, se), 0.01, 0.01)
        assert verdict.decision == "inconclusive"
        assert verdict.missing == "requests"
        assert verdict.log_e_harm == 0.0 and verdict.log_e_ni == 0.0


def test_a_gate_with_no_evidence_at_all_is_inconclusive() -> None:
    verdicts = evaluate_all(DEFAULT_GATES, {})
    assert {v.decision for v in verdicts} == {"inconclusive"}
    assert {v.missing for v in verdicts} == {"devices", "labels"}


def test_a_small_fleet_is_inconclusive_and_says_it_lacks_devices() -> None:
    # 200 devices, a 1 % wave: 2 on the new version, however well they do.
    devices = [
        DeviceAggregate(
            f"dev-{i}",
            "treatment" if i < 2 else "control",
            requests=6000,
            fallbacks=100,
            expected_fallbacks=120.0,
            log_p95=3.7,
            pre_log_p95=3.7 + 0.01 * (i % 3),
            accuracy=0.9,
            pre_accuracy=0.9 - 0.001 * (i % 4),
            windows=100,
        )
        for i in range(200)
    ]
    verdicts = {v.gate: v for v in evaluate_all(DEFAULT_GATES, gather(devices, InstallTally(0, 2)))}
    for name in (FALLBACK_RATE, LATENCY_P95, ACCURACY_ESTIMATED):
        assert (verdicts[name].decision, verdicts[name].missing) == ("inconclusive", "devices")
    assert verdicts[ACCURACY_LABELLED].missing == "labels"
    assert verdicts[INSTALL_FAILURES].decision == "inconclusive"


# --------------------------------------------------------------------------- sample ratio


def test_srm_flags_a_wave_reporting_far_below_its_share() -> None:
    assert srm_log_e([60, 9900], [0.01, 0.99]) > math.log(100)
    assert srm_log_e([100, 9900], [0.01, 0.99]) < 0
    assert srm_log_e([0, 0], [0.5, 0.5]) == 0.0


def test_srm_holds_its_level_under_many_looks() -> None:
    rng = np.random.default_rng(8)
    paths, looks, per_look = 1000, 20, 50
    arms = np.cumsum(rng.random((paths, looks, per_look)) < 0.1, axis=2)[:, :, -1]
    treatment = np.cumsum(arms, axis=1)
    total = per_look * np.arange(1, looks + 1)
    stopped = 0
    for row in treatment:
        e = [srm_log_e([t, n - t], [0.1, 0.9]) for t, n in zip(row, total, strict=True)]
        stopped += max(e) >= math.log(1 / 0.05)
    assert stopped / paths <= 0.05


def test_srm_refuses_counts_that_do_not_match_shares() -> None:
    with pytest.raises(ValueError, match="do not match"):
        srm_log_e([1, 2, 3], [0.5, 0.5])
    with pytest.raises(ValueError, match="summing to 1"):
        srm_log_e([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="do not match"):
        srm_log_e([math.nan, 2], [0.5, 0.5])


# --------------------------------------------------------------------------- fallbacks from zero


def quiet_fleet(
    minutes: int, treatment_rate: float, seed: int, devices: int = 400, wave: int = 40
) -> list[DeviceAggregate]:
    """A fleet whose current version never fell back (a day of history each), ``wave`` devices
    on the new version falling back at ``treatment_rate``, ``minutes`` of 60 requests each."""
    rng = np.random.default_rng(seed)
    pre_requests = 60 * 1440
    requests = 60 * minutes
    out = []
    for i in range(devices):
        arm = "treatment" if i < wave else "control"
        rate = treatment_rate if arm == "treatment" else 0.0
        out.append(
            DeviceAggregate(
                f"d{i}",
                arm,  # type: ignore[arg-type]
                requests=requests,
                fallbacks=int(rng.binomial(requests, rate)),
                expected_fallbacks=requests * 1 / (pre_requests + 1),
                windows=minutes,
            )
        )
    return out


def fallback_verdicts(treatment_rate: float, seed: int) -> list[str]:
    """The fallback gate's decision at every minute of an hour."""
    return [
        next(
            e.decision
            for e in evaluate_all(DEFAULT_GATES, gather(quiet_fleet(m, treatment_rate, seed),
                                                        InstallTally(0, 40)))
            if e.gate == FALLBACK_RATE
        )
        for m in range(1, 61)
    ]  # fmt: skip


def test_a_version_falling_back_where_the_fleet_never_does_is_stopped() -> None:
    # No ratio holds over a control with no fallbacks; 3 % of requests is 30 times the
    # absolute bound (0.1 points), shown within minutes.
    for seed in range(5):
        verdicts = fallback_verdicts(0.03, seed)
        assert "fail" in verdicts[:10], verdicts
    assert FALLBACK.allowed_extra == 0.001


def test_identical_versions_that_never_fall_back_pass_and_are_never_stopped() -> None:
    for seed in range(5):
        verdicts = fallback_verdicts(0.0, seed)
        assert "fail" not in verdicts
        assert verdicts[-1] == "pass", verdicts  # within the absolute bound, shown


def test_harm_needs_both_the_ratio_and_the_absolute_bound() -> None:
    def rates(treatment: float, control: float) -> ArmRates:
        return ArmRates(treatment, 1e-12, control, 1e-12)  # rates known to a hair

    # 2x a 0.01 % rate is 0.01 points more: beyond the ratio's margin, within the bound.
    tiny = Comparison(math.log(2.0), 0.01, 100, 9000, 10**7, 10**8, rates(0.0002, 0.0001))
    assert evaluate(FALLBACK, tiny, 0.01, 0.01).decision == "pass"
    # 1.3x a 2 % rate is 0.6 points more: beyond both.
    both = Comparison(math.log(1.3), 0.01, 100, 9000, 10**7, 10**8, rates(0.026, 0.02))
    assert evaluate(FALLBACK, both, 0.01, 0.01).decision == "fail"
    # 1.05x a 20 % rate is a point more: beyond the bound, within the ratio's margin.
    high = Comparison(math.log(1.05), 0.01, 100, 9000, 10**7, 10**8, rates(0.21, 0.20))
    assert evaluate(FALLBACK, high, 0.01, 0.01).decision == "pass"
    # Without the rates the ratio judges alone, as before.
    assert evaluate(FALLBACK, comparison(math.log(2.0), 0.01), 0.01, 0.01).decision == "fail"


def test_allowed_extra_is_overridden_only_on_a_gate_that_has_one() -> None:
    specs = {s.name: s for s in gate_specs({FALLBACK_RATE: GateOverride(allowed_extra=0.005)})}
    assert specs[FALLBACK_RATE].allowed_extra == 0.005
    with pytest.raises(UnknownGateError, match="allowed_extra applies"):
        gate_specs({LATENCY_P95: GateOverride(allowed_extra=0.01)})
    with pytest.raises(ValidationError, match="allowed_extra"):
        GateOverride.model_validate({"allowed_extra": -0.1})


# --------------------------------------------------------------------------- simulated rollouts


def test_the_simulation_judges_as_evaluate_does() -> None:
    # Every gate of every live rollout at every tick, through evaluate() as well.
    plan = Plan(devices=2000, waves=(0.05, 0.25, 0.5, 0.95), max_bake=40)
    assert len(simulate(AA, 2, seed=3, plan=plan, cross_check=True).ending) == 2
    assert len(simulate(BAD[1], 4, seed=3, plan=plan, cross_check=True).ending) == 4


@pytest.mark.slow
def test_identical_versions_are_falsely_stopped_in_at_most_five_percent() -> None:
    # 500 A/A rollouts judged at every one-minute tick; 1,000 devices (waves of
    # 10, 25, 50 and 95 %, so the first wave has 100) keep it to seconds.
    plan = Plan(devices=1000, waves=(0.10, 0.25, 0.50, 0.95), max_bake=60)
    outcomes = simulate(AA, 500, seed=1, plan=plan)
    assert outcomes.share("fail") <= 0.05
    # The sample-ratio test runs at every tick too (2 % of the devices in both arms send no
    # windows): its false pauses count with the false stops.
    assert outcomes.share("fail") + outcomes.share_paused_by(SRM_PAUSE) <= 0.05
    assert outcomes.share("fail") + outcomes.share("completed") + outcomes.share("paused") == 1


@pytest.mark.parametrize(
    ("index", "rollouts"),
    [pytest.param(0, 200, marks=pytest.mark.slow), (1, 100), (2, 100), (3, 100)],
    ids=["install-3pct", "fallback-x1.3", "accuracy-3pts", "crash-loop-1-of-5-hardware"],
)
def test_a_bad_version_is_stopped_before_the_half_fleet_wave(index: int, rollouts: int) -> None:
    # 10,000 devices, waves 1, 10, 50, 100 %, one window of 60 requests a device a minute.
    plan = Plan(stop_at_wave=HALF_WAVE)
    outcomes = simulate(BAD[index], rollouts, seed=100 + index, plan=plan)
    assert outcomes.share("fail", before_wave=HALF_WAVE) >= 0.95


def test_a_wave_half_of_which_goes_silent_is_paused_by_the_sample_ratio_test() -> None:
    plan = Plan(devices=2000, waves=(0.05, 0.25, 0.50, 0.95), max_bake=60)
    outcomes = simulate(SILENT, 50, seed=11, plan=plan)
    assert outcomes.share_paused_by(SRM_PAUSE) >= 0.95, outcomes.reason
    # In the first wave (100 devices), or at the latest when the second wave goes silent.
    assert max(outcomes.wave) < HALF_WAVE


def test_too_few_devices_never_promotes() -> None:
    outcomes = simulate(AA, 50, seed=7, plan=Plan(devices=200, max_bake=60))
    assert set(outcomes.ending) == {"paused"}
    assert set(outcomes.wave) == {0}
    assert all(FALLBACK_RATE in reason for reason in outcomes.reason)


def test_every_default_gate_is_a_gatespec_with_a_positive_tau_or_a_rate() -> None:
    for spec in DEFAULT_GATES:
        assert isinstance(spec, GateSpec)
        assert spec.scale == "rate" or spec.tau > 0
