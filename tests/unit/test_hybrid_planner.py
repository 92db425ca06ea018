"""The hybrid planner: the weighted max-min split, tau from confidence, quotas, and the checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fleet_server.errors import Invalid
from fleet_server.hybrid.checks import CheckInputError, wilson_interval, within_plan, z_score
from fleet_server.hybrid.planner import (
    PLAN_REASONS,
    FleetDemand,
    FleetPlan,
    Floats,
    PlanInputError,
    PlannerSettings,
    confidence_quantile,
    jain_index,
    mass_below,
    plan_fleet,
    water_level,
    weighted_fairness,
)
from protocol.hybrid import CONFIDENCE_BINS, PLAN_MODES


def fleet(
    rate: list[float],
    weight: list[float] | None = None,
    *,
    confidence: Any = None,
    opted_out: list[bool] | None = None,
    link_errors: list[float] | None = None,
    link_latency_ms: list[float] | None = None,
) -> FleetDemand:
    n = len(rate)
    return FleetDemand(
        device_ids=[f"d{i}" for i in range(n)],
        rate=np.asarray(rate, dtype=np.float64),
        weight=np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64),
        confidence=np.zeros((n, CONFIDENCE_BINS)) if confidence is None else confidence,
        opted_out=np.zeros(n, bool) if opted_out is None else np.asarray(opted_out),
        link_errors=np.zeros(n) if link_errors is None else np.asarray(link_errors, float),
        link_latency_ms=(
            np.full(n, np.nan) if link_latency_ms is None else np.asarray(link_latency_ms, float)
        ),
    )


def modes(plan: FleetPlan) -> list[str]:
    return [PLAN_MODES[m] for m in plan.mode]


def reasons(plan: FleetPlan) -> list[str]:
    return [PLAN_REASONS[r] for r in plan.reason]


def reference_level(demand: Floats, weight: Floats, capacity: float) -> float:
    """The water level by bisection: slow, obviously right."""
    if demand.sum() <= capacity:
        return float((demand / weight).max()) if demand.any() else 0.0
    lo, hi = 0.0, float((demand / weight).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(demand, mid * weight).sum() < capacity:
            lo = mid
        else:
            hi = mid
    return hi


def random_fleet(seed: int, n: int) -> FleetDemand:
    rng = np.random.RandomState(seed)
    rate = rng.lognormal(0.0, 1.5, n) * (rng.rand(n) > 0.1)
    return fleet(
        list(rate),
        list(rng.choice([0.5, 1.0, 2.0, 5.0], n)),
        confidence=rng.poisson(rng.rand(n, CONFIDENCE_BINS) * 20 * (rng.rand(n, 1) > 0.05)),
        opted_out=list(rng.rand(n) < 0.1),
        link_errors=list(np.where(rng.rand(n) < 0.1, np.nan, rng.rand(n) * 0.3)),
        link_latency_ms=list(np.where(rng.rand(n) < 0.3, np.nan, rng.rand(n) * 1500)),
    )


# --- the split ---


def test_equal_weights_fill_the_small_demands_then_split_the_rest_evenly() -> None:
    plan = plan_fleet(fleet([1.0, 2.0, 10.0, 10.0]), PlannerSettings(capacity=20.0, headroom=0.1))
    # 18 handed out: 1 and 2 are met, 15 left for the two big ones, 7.5 each.
    np.testing.assert_allclose(plan.share, [1.0, 2.0, 7.5, 7.5])
    assert plan.level == pytest.approx(7.5)
    assert modes(plan) == ["escalate"] * 4
    assert plan.bottlenecked().tolist() == [False, False, True, True]


def test_unequal_weights_split_in_proportion_to_weight() -> None:
    plan = plan_fleet(fleet([4.0, 4.0, 4.0], [1.0, 2.0, 3.0]), PlannerSettings(6.0, headroom=0.0))
    np.testing.assert_allclose(plan.share, [1.0, 2.0, 3.0])
    assert plan.level == pytest.approx(1.0)
    # 1 is met; 6 left over weights 1 + 2 at level 2.
    plan = plan_fleet(fleet([10.0, 1.0, 10.0], [1.0, 1.0, 2.0]), PlannerSettings(7.0, headroom=0.0))
    np.testing.assert_allclose(plan.share, [2.0, 1.0, 4.0])
    assert plan.level == pytest.approx(2.0)


def test_capacity_above_total_demand_meets_every_demand() -> None:
    plan = plan_fleet(fleet([1.0, 2.0], [1.0, 4.0]), PlannerSettings(capacity=100.0))
    np.testing.assert_allclose(plan.share, [1.0, 2.0])
    assert plan.level == pytest.approx(1.0)  # the smallest level that meets both
    assert not plan.bottlenecked().any()
    np.testing.assert_allclose(plan.tau, [1.0, 1.0])
    np.testing.assert_allclose(plan.expected_offload, [1.0, 1.0])


def test_zero_capacity_plans_everyone_local() -> None:
    plan = plan_fleet(fleet([1.0, 5.0]), PlannerSettings(capacity=0.0))
    assert modes(plan) == ["local", "local"]
    assert reasons(plan) == ["no_capacity", "no_capacity"]
    assert plan.share.tolist() == [0.0, 0.0]
    assert plan.quota_rate.tolist() == [0.0, 0.0]
    assert plan.quota_burst.tolist() == [0, 0]
    assert plan.tau.tolist() == [0.0, 0.0]
    assert plan.expected_offload.tolist() == [0.0, 0.0]
    assert plan.audit_rate.tolist() == [0.0, 0.0]
    assert plan.level == 0.0


def test_opted_out_and_bad_links_are_local_and_leave_their_share_to_the_others() -> None:
    demand = fleet(
        [5.0, 5.0, 5.0, 5.0, 5.0],
        opted_out=[True, False, False, False, False],
        link_errors=[0.0, 0.5, 0.0, np.nan, 0.2],
        link_latency_ms=[np.nan, 10.0, 5000.0, np.nan, 1000.0],
    )
    plan = plan_fleet(demand, PlannerSettings(capacity=8.0, headroom=0.0))
    assert reasons(plan) == ["opted_out", "link_errors", "link_latency", "shared", "shared"]
    assert modes(plan) == ["local", "local", "local", "escalate", "escalate"]
    # An unknown link is good; at the limit is still good. They split all 8.
    np.testing.assert_allclose(plan.share, [0.0, 0.0, 0.0, 4.0, 4.0])
    np.testing.assert_allclose(plan.demand, [0.0, 0.0, 0.0, 5.0, 5.0])
    assert plan.quota_burst.tolist() == [0, 0, 0, 8, 8]


def test_a_device_with_no_requests_is_local_unless_a_bootstrap_share_is_left() -> None:
    demand = fleet([0.0, 2.0, 0.0])
    plan = plan_fleet(demand, PlannerSettings(capacity=10.0, headroom=0.0))
    assert reasons(plan) == ["no_requests", "shared", "no_requests"]
    assert modes(plan) == ["local", "escalate", "local"]
    plan = plan_fleet(demand, PlannerSettings(capacity=10.0, headroom=0.0, bootstrap_rate=0.5))
    assert reasons(plan) == ["bootstrap", "shared", "bootstrap"]
    assert modes(plan) == ["escalate"] * 3
    np.testing.assert_allclose(plan.share, [0.5, 2.0, 0.5])
    np.testing.assert_allclose(plan.tau, [1.0, 1.0, 1.0])
    assert plan.quota_burst.tolist() == [1, 4, 1]
    # Only what is left once every demand is met: 1 left for two of them.
    plan = plan_fleet(demand, PlannerSettings(capacity=3.0, headroom=0.0, bootstrap_rate=5.0))
    np.testing.assert_allclose(plan.share, [0.5, 2.0, 0.5])
    plan = plan_fleet(demand, PlannerSettings(capacity=1.0, headroom=0.0, bootstrap_rate=5.0))
    assert reasons(plan) == ["no_requests", "shared", "no_requests"]
    np.testing.assert_allclose(plan.share, [0.0, 1.0, 0.0])


def test_cloud_first_only_when_asked_and_the_share_covers_the_rate() -> None:
    settings = PlannerSettings(capacity=5.0, headroom=0.0, cloud_first_when_covered=True)
    plan = plan_fleet(fleet([1.0, 10.0]), settings)
    assert modes(plan) == ["cloud_first", "escalate"]
    assert plan.tau[0] == 1.0
    assert plan.audit_rate.tolist() == [0.0, 0.02]
    assert plan.expected_offload[0] == 1.0
    plan = plan_fleet(fleet([1.0, 10.0]), PlannerSettings(capacity=5.0, headroom=0.0))
    assert modes(plan) == ["escalate", "escalate"]


def test_quota_is_the_share_and_a_burst_of_a_few_seconds_of_it() -> None:
    plan = plan_fleet(
        fleet([0.3, 6.0]), PlannerSettings(capacity=100.0, headroom=0.0, burst_seconds=2.0)
    )
    np.testing.assert_allclose(plan.quota_rate, plan.share)
    assert plan.quota_burst.tolist() == [1, 12]  # ceil(0.6) = 1, at least 1


# --- tau ---


def high_confidence_histogram() -> Floats:
    """100 requests, 10 in each bin from 0.8 to 1.0."""
    counts = np.zeros((1, CONFIDENCE_BINS))
    counts[0, 40:50] = 10
    return counts


def test_tau_is_the_quantile_that_makes_escalations_fit_the_share() -> None:
    # 25 % escalated plus 2 % audits of the other 75 % = 26.5 % of 10 requests a second.
    demand = fleet([10.0], confidence=high_confidence_histogram())
    plan = plan_fleet(demand, PlannerSettings(capacity=2.65, headroom=0.0, audit_rate=0.02))
    # 25 of 100: bins 40 and 41 (20), then half of bin 42: tau = 42.5 / 50.
    assert plan.tau[0] == pytest.approx(0.85)
    assert plan.expected_offload[0] == pytest.approx(0.265)
    assert plan.expected_offload[0] == pytest.approx(plan.share[0] / 10.0)
    assert plan.audit_rate[0] == 0.02


def test_audits_never_cost_more_than_the_share() -> None:
    demand = fleet([100.0], confidence=high_confidence_histogram())
    plan = plan_fleet(demand, PlannerSettings(capacity=1.0, headroom=0.0, audit_rate=0.02))
    assert plan.audit_rate[0] == pytest.approx(0.01)  # all of the 1 % share goes to audits
    assert plan.tau[0] == 0.0
    assert plan.expected_offload[0] == pytest.approx(0.01)
    assert modes(plan) == ["escalate"]


def test_a_device_without_a_histogram_is_taken_as_uniform() -> None:
    plan = plan_fleet(fleet([10.0]), PlannerSettings(capacity=5.0, headroom=0.0, audit_rate=0.0))
    assert plan.tau[0] == pytest.approx(0.5)
    assert plan.expected_offload[0] == pytest.approx(0.5)


def test_quantile_on_known_histograms() -> None:
    counts = np.zeros((3, CONFIDENCE_BINS))
    counts[0, :] = 1  # uniform: tau = fraction
    counts[1, 49] = 7  # everything in the last bin [0.98, 1]
    counts[2, [10, 30]] = [1, 3]  # a quarter in [0.2, 0.22], the rest in [0.6, 0.62]
    tau = confidence_quantile(counts, np.array([0.3, 0.5, 0.5]))
    np.testing.assert_allclose(tau, [0.3, 0.99, 0.6 + 0.02 / 3])
    np.testing.assert_allclose(mass_below(counts, tau), [0.3, 0.5, 0.5])
    assert confidence_quantile(counts, np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert confidence_quantile(counts, np.ones(3)).tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(mass_below(counts, np.array([1.0, 0.98, 0.21])), [1.0, 0.0, 0.125])


@pytest.mark.parametrize("seed", range(5))
def test_quantile_and_mass_below_invert_each_other(seed: int) -> None:
    rng = np.random.RandomState(seed)
    counts = rng.poisson(rng.rand(200, CONFIDENCE_BINS) * 5) * (rng.rand(200, 1) > 0.1)
    fraction = rng.rand(200)
    np.testing.assert_allclose(mass_below(counts, confidence_quantile(counts, fraction)), fraction)


# --- properties over random fleets ---


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("capacity", [0.0, 1.0, 50.0, 300.0, 1e6])
def test_random_fleets_obey_the_rules(seed: int, capacity: float) -> None:
    demand = random_fleet(seed, 300)
    settings = PlannerSettings(capacity=capacity, headroom=0.1, audit_rate=0.02)
    plan = plan_fleet(demand, settings)
    handed = capacity * 0.9
    eligible = (
        ~demand.opted_out
        & ~(demand.link_errors > settings.max_link_errors)
        & ~(demand.link_latency_ms > settings.max_link_latency_ms)
        & (demand.rate > 0)
    )
    np.testing.assert_array_equal(plan.demand, np.where(eligible, demand.rate, 0.0))
    # Never above demand; the whole capacity when demand exceeds it, else every demand met.
    assert np.all(plan.share <= plan.demand)
    assert np.all(plan.share >= 0)
    if plan.demand.sum() > handed:
        assert plan.share.sum() == pytest.approx(handed, rel=1e-9)
    else:
        np.testing.assert_allclose(plan.share, plan.demand)
    # The level agrees with a bisection; shares are min(demand, level * weight).
    assert plan.level == pytest.approx(
        reference_level(plan.demand, demand.weight, handed), rel=1e-9, abs=1e-12
    )
    np.testing.assert_allclose(plan.share, np.minimum(plan.demand, plan.level * demand.weight))
    # Exact weighted max-min: the bottlenecked all sit at the same share per weight.
    assert weighted_fairness(plan.share, demand.weight, plan.bottlenecked()) == pytest.approx(1.0)
    # Plans are consistent per device.
    local = plan.mode == PLAN_MODES.index("local")
    np.testing.assert_array_equal(local, plan.share == 0)
    assert np.all(plan.quota_burst[local] == 0) and np.all(plan.quota_burst[~local] >= 1)
    np.testing.assert_array_equal(plan.quota_rate, plan.share)
    assert np.all((plan.tau >= 0) & (plan.tau <= 1))
    assert np.all(plan.audit_rate <= 0.02)
    # What a device is expected to send is exactly its share of its requests.
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(demand.rate > 0, plan.share / demand.rate, 0.0)
    np.testing.assert_allclose(plan.expected_offload, s, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_more_capacity_never_shrinks_a_share_and_weights_scale_out(seed: int) -> None:
    demand = random_fleet(seed, 200)
    small = plan_fleet(demand, PlannerSettings(capacity=40.0))
    large = plan_fleet(demand, PlannerSettings(capacity=80.0))
    assert np.all(large.share >= small.share - 1e-12)
    scaled = FleetDemand(**{**demand.__dict__, "weight": demand.weight * 7.0})
    np.testing.assert_allclose(
        plan_fleet(scaled, PlannerSettings(capacity=40.0)).share, small.share
    )


@pytest.mark.parametrize("seed", range(4))
def test_bootstrap_shares_only_what_every_demand_left(seed: int) -> None:
    demand = random_fleet(seed, 300)
    for capacity in (10.0, 1e4):
        settings = PlannerSettings(capacity=capacity, headroom=0.1, bootstrap_rate=0.3)
        plan = plan_fleet(demand, settings)
        boot = np.array(reasons(plan)) == "bootstrap"
        assert plan.share.sum() <= settings.handed_out * (1 + 1e-12)
        if boot.any():
            np.testing.assert_allclose(plan.share[~boot], plan.demand[~boot])  # all met first
            assert np.all(plan.share[boot] <= 0.3) and np.all(plan.share[boot] > 0)
            assert np.all(plan.tau[boot] == 1.0) and np.all(plan.expected_offload[boot] == 1.0)
            assert np.all(plan.quota_burst[boot] >= 1)
        else:
            assert capacity == 10.0


def test_a_large_fleet_hands_out_exactly_the_capacity() -> None:
    demand = random_fleet(11, 20_000)
    settings = PlannerSettings(capacity=2_000.0, headroom=0.1)
    plan = plan_fleet(demand, settings)
    assert plan.share.sum() == pytest.approx(settings.handed_out, rel=1e-9)
    assert weighted_fairness(plan.share, demand.weight, plan.bottlenecked()) == pytest.approx(1.0)


def test_integer_and_float_counts_plan_alike() -> None:
    demand = random_fleet(3, 100)
    as_int = FleetDemand(**{**demand.__dict__, "confidence": demand.confidence.astype(np.int32)})
    as_float = FleetDemand(**{**demand.__dict__, "confidence": demand.confidence.astype(float)})
    settings = PlannerSettings(capacity=20.0)
    np.testing.assert_allclose(plan_fleet(as_int, settings).tau, plan_fleet(as_float, settings).tau)
    as_bool = FleetDemand(**{**demand.__dict__, "confidence": demand.confidence > 0})
    with pytest.raises(PlanInputError, match="confidence counts of type bool"):
        plan_fleet(as_bool, settings)


def test_ties_and_one_device() -> None:
    plan = plan_fleet(fleet([3.0, 3.0, 3.0]), PlannerSettings(capacity=6.0, headroom=0.0))
    np.testing.assert_allclose(plan.share, [2.0, 2.0, 2.0])
    plan = plan_fleet(fleet([3.0]), PlannerSettings(capacity=1.0, headroom=0.0))
    np.testing.assert_allclose(plan.share, [1.0])
    assert water_level(np.zeros(0), np.zeros(0), 5.0) == 0.0


def test_an_empty_fleet_plans_nothing() -> None:
    plan = plan_fleet(fleet([]), PlannerSettings(capacity=10.0))
    assert plan.share.size == 0 and plan.level == 0.0


# --- fairness ---


def test_jain_index() -> None:
    assert jain_index(np.array([2.0, 2.0, 2.0])) == 1.0
    assert jain_index(np.array([1.0, 0.0])) == 0.5
    assert jain_index(np.array([1.0, 0.0, 0.0, 0.0])) == 0.25
    assert jain_index(np.array([])) == 1.0
    assert jain_index(np.zeros(3)) == 1.0
    assert jain_index(np.array([1.0, 2.0, 3.0])) == pytest.approx(36 / 42)


def test_weighted_fairness_of_observed_shares() -> None:
    weight = np.array([1.0, 2.0, 1.0, 1.0])
    bottlenecked = np.array([True, True, True, False])
    # Observed 1, 2, 1 per second on weights 1, 2, 1: fair; the met device does not count.
    assert weighted_fairness(np.array([1.0, 2.0, 1.0, 0.1]), weight, bottlenecked) == 1.0
    # One bottlenecked device served nothing: two of three equal.
    unfair = weighted_fairness(np.array([1.0, 2.0, 0.0, 0.1]), weight, bottlenecked)
    assert unfair == pytest.approx(2 / 3)
    assert weighted_fairness(np.ones(4), weight, np.zeros(4, bool)) == 1.0


# --- bad input ---


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rate": np.array([1.0, -1.0])}, "rate"),
        ({"rate": np.array([1.0, np.nan])}, "rate"),
        ({"weight": np.array([1.0, 0.0])}, "weight"),
        ({"weight": np.array([1.0, np.inf])}, "weight"),
        ({"weight": np.array([1.0])}, "weight has shape"),
        ({"confidence": np.zeros((2, 10))}, "confidence has shape"),
        ({"confidence": np.full((2, CONFIDENCE_BINS), -1.0)}, "confidence counts"),
        ({"link_errors": np.array([0.0, -0.1])}, "link error"),
        ({"link_latency_ms": np.array([-1.0, 0.0])}, "link latency"),
    ],
)
def test_bad_input_is_refused_naming_it(change: dict[str, Any], named: str) -> None:
    demand = FleetDemand(**{**fleet([1.0, 2.0]).__dict__, **change})
    with pytest.raises(PlanInputError, match=named) as refused:
        plan_fleet(demand, PlannerSettings(capacity=1.0))
    assert isinstance(refused.value, Invalid)
    if "shape" not in named:
        assert "'d" in str(refused.value)  # names the first device


@pytest.mark.parametrize(
    "settings",
    [
        {"capacity": -1.0},
        {"capacity": math.inf},
        {"capacity": 1.0, "headroom": 1.0},
        {"capacity": 1.0, "audit_rate": 1.0},
        {"capacity": 1.0, "burst_seconds": 0.0},
        {"capacity": 1.0, "bootstrap_rate": -0.1},
        {"capacity": 1.0, "max_link_latency_ms": 0.0},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(PlanInputError, match="planner settings refused"):
        PlannerSettings(**settings)


# --- the loop-closing check ---


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval([5, 0, 10, 0, 20], [10, 10, 10, 0, 100])
    np.testing.assert_allclose(low, [0.236593, 0.0, 0.722467, 0.0, 0.133367], rtol=0, atol=1e-6)
    np.testing.assert_allclose(high, [0.763407, 0.277533, 1.0, 1.0, 0.288829], rtol=0, atol=1e-6)
    assert z_score(0.95) == pytest.approx(1.959964, abs=1e-6)
    wide_low, wide_high = wilson_interval([20], [100], confidence=0.99)
    assert wide_low[0] < low[4] and wide_high[0] > high[4]


def test_within_plan_reads_the_interval() -> None:
    inside = within_plan([20, 20, 0, 0, 3], [100, 100, 0, 50, 50], [0.05, 0.2, 0.7, 0.0, 0.06])
    assert inside.tolist() == [False, True, True, True, True]
    assert within_plan(5, 10, 0.5).item() is True


def test_the_check_refuses_impossible_counts() -> None:
    with pytest.raises(CheckInputError, match="k outside"):
        wilson_interval([11], [10])
    with pytest.raises(CheckInputError, match="k outside"):
        wilson_interval([-1], [10])
    with pytest.raises(CheckInputError, match="shape"):
        wilson_interval([1, 2], [10])
    with pytest.raises(CheckInputError, match="in \\[0, 1\\]"):
        within_plan([1], [10], [1.5])
    with pytest.raises(CheckInputError, match="confidence"):
        z_score(1.0)
