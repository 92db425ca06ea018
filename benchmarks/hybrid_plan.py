"""Hybrid planning for 100,000 devices, against the same plan written as a per-device loop.

The fleet (made once, untimed, ``numpy.random.default_rng(0)``): ``DEVICES``
devices with lognormal request rates (median 1/s), weights 1, 2 or 5, 5 %
opted out, link error shares Beta(1, 30) (mean 3 %, 0.1 % above the 0.2
limit), cloud latencies lognormal around 150 ms (2 % above the 1000 ms
limit), 2 % with no requests, and a calibrated
confidence histogram of :data:`~protocol.hybrid.CONFIDENCE_BINS` bins leaning
towards 1 (Poisson counts, a few hundred requests each). The cloud's capacity
is 30 % of the fleet's eligible demand, so the water-filling has to find a
level and most devices get a tau strictly inside (0, 1).

What is measured:

- *plan_fleet*: :func:`fleet_server.hybrid.planner.plan_fleet` over the
  arrays, on ``DEVICES`` and on ``LOOP_DEVICES`` devices;
- its parts on ``DEVICES``: :func:`water_level`, and
  :func:`confidence_quantile` over the histograms it reads (those of the
  devices whose tau is strictly inside (0, 1); the rest is elementwise);
- *baseline*: the same plan written the plain way, one device at a time in
  Python (the inputs given as lists, converted untimed; ``sorted`` for the
  water level, a walk over the bins for each tau), on ``LOOP_DEVICES``
  devices, scaled to ``DEVICES`` linearly; it is checked to give the same
  plan as :func:`plan_fleet` on the same devices;
- floors: ``numpy.argsort`` of ``DEVICES`` float64 (the least the
  water-filling's sort costs) and ``numpy.cumsum`` over the
  ``[DEVICES, CONFIDENCE_BINS]`` histograms (the least reading every
  histogram once costs).

``ROUNDS`` rounds after a warm-up, the measurements in an order rotating from
round to round so all see the same machine state; medians.
``python -m benchmarks.hybrid_plan [devices]``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fleet_server.hybrid.planner import (
    PLAN_REASONS,
    FleetDemand,
    FleetPlan,
    PlannerSettings,
    confidence_quantile,
    plan_fleet,
    water_level,
)
from protocol.hybrid import CONFIDENCE_BINS, PLAN_MODES

DEVICES = 100_000
LOOP_DEVICES = 10_000
ROUNDS = 7
GOAL_S = 1.0
DEMAND_SHARE = 0.3  # capacity handed out, as a share of the eligible demand


def make_fleet(devices: int) -> FleetDemand:
    """``devices`` devices as described in the module docstring."""
    rng = np.random.default_rng(0)
    rate = rng.lognormal(0.0, 1.0, devices) * (rng.random(devices) > 0.02)
    lean = np.linspace(0.05, 1.0, CONFIDENCE_BINS) ** 4  # confidence leans towards 1
    volume = rng.gamma(2.0, 4.0, (devices, 1))
    return FleetDemand(
        device_ids=[f"dev-{i:07d}" for i in range(devices)],
        rate=rate,
        weight=rng.choice(np.array([1.0, 2.0, 5.0]), devices),
        confidence=rng.poisson(lean[None, :] * volume * 10).astype(np.int64),
        opted_out=rng.random(devices) < 0.05,
        link_errors=rng.beta(1.0, 30.0, devices),
        link_latency_ms=rng.lognormal(math.log(150.0), 0.9, devices),
    )


def settings_for(demand: FleetDemand) -> PlannerSettings:
    """Capacity at ``DEMAND_SHARE`` of what the eligible devices could send."""
    probe = plan_fleet(demand, PlannerSettings(capacity=1e18, headroom=0.0))
    handed = float(probe.demand.sum()) * DEMAND_SHARE
    return PlannerSettings(capacity=handed / 0.9, headroom=0.1)


def plan_loop(columns: dict[str, list[Any]], settings: PlannerSettings) -> dict[str, list[Any]]:
    """The planner's rules, one device at a time in plain Python (the baseline)."""
    rate, weight, counts = columns["rate"], columns["weight"], columns["confidence"]
    n = len(rate)
    wanted = []
    for i in range(n):
        ok = (
            not columns["opted_out"][i]
            and not columns["link_errors"][i] > settings.max_link_errors
            and not columns["link_latency_ms"][i] > settings.max_link_latency_ms
        )
        wanted.append(rate[i] if ok and rate[i] > 0 else 0.0)
    capacity = settings.handed_out
    active = sorted((wanted[i] / weight[i], wanted[i], weight[i]) for i in range(n) if wanted[i])
    level = 0.0
    if active:
        level = active[-1][0]
        if sum(d for _, d, _ in active) > capacity:
            met, left = 0.0, sum(w for _, _, w in active)
            for ratio, d, w in active:
                if met + ratio * left >= capacity:
                    level = max(0.0, (capacity - met) / left)
                    break
                met += d
                left -= w
    out: dict[str, list[Any]] = {k: [] for k in ("mode", "share", "tau", "burst", "expected")}
    bins = CONFIDENCE_BINS
    for i in range(n):
        share = min(wanted[i], level * weight[i])
        mode, tau, expected, burst = "local", 0.0, 0.0, 0
        if share > 0:
            s = min(share / rate[i], 1.0)
            mode = "escalate"
            audit = min(settings.audit_rate, s)
            f = 1.0 if share >= wanted[i] else max(0.0, min(1.0, (s - audit) / (1.0 - audit)))
            row = counts[i]
            total = sum(row)
            if f >= 1.0:
                tau = 1.0
            elif f <= 0.0:
                tau = 0.0
            elif total == 0:
                tau = f
            else:
                target, below = f * total, 0.0
                for k in range(bins):
                    if below + row[k] >= target:
                        tau = (k + (target - below) / row[k]) / bins
                        break
                    below += row[k]
            # The mass below tau, read back from the histogram.
            position = tau * bins
            k = min(int(position), bins - 1)
            mass = (sum(row[:k]) + (position - k) * row[k]) / total if total else tau
            expected = mass + audit * (1.0 - mass)
            burst = max(1, math.ceil(share * settings.burst_seconds))
        out["mode"].append(mode)
        out["share"].append(share)
        out["tau"].append(tau)
        out["burst"].append(burst)
        out["expected"].append(expected)
    return out


def as_columns(demand: FleetDemand) -> dict[str, list[Any]]:
    return {
        "rate": demand.rate.tolist(),
        "weight": demand.weight.tolist(),
        "confidence": demand.confidence.tolist(),
        "opted_out": demand.opted_out.tolist(),
        "link_errors": demand.link_errors.tolist(),
        "link_latency_ms": demand.link_latency_ms.tolist(),
    }


def same_plan(plan: FleetPlan, loop: dict[str, list[Any]]) -> None:
    """Refuse to report a baseline that does not compute the same plan."""
    assert [PLAN_MODES[m] for m in plan.mode] == loop["mode"]
    np.testing.assert_allclose(plan.share, loop["share"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(plan.tau, loop["tau"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(plan.quota_burst, loop["burst"])
    np.testing.assert_allclose(plan.expected_offload, loop["expected"], rtol=1e-9, atol=1e-12)


def run(devices: int = DEVICES) -> dict[str, float]:
    big = make_fleet(devices)
    small = make_fleet(LOOP_DEVICES)
    big_settings, small_settings = settings_for(big), settings_for(small)
    columns = as_columns(small)
    big_plan = plan_fleet(big, big_settings)
    same_plan(plan_fleet(small, small_settings), plan_loop(columns, small_settings))
    read = (big_plan.tau > 0) & (big_plan.tau < 1)
    read_counts, fraction = big.confidence[read], big_plan.expected_offload[read]
    ratio_input = big.rate / big.weight
    measures: dict[str, Callable[[], object]] = {
        "plan": lambda: plan_fleet(big, big_settings),
        "plan_small": lambda: plan_fleet(small, small_settings),
        "water_level": lambda: water_level(big_plan.demand, big.weight, big_settings.handed_out),
        "quantile": lambda: confidence_quantile(read_counts, fraction),
        "loop_small": lambda: plan_loop(columns, small_settings),
        "argsort": lambda: np.argsort(ratio_input, kind="stable"),
        "cumsum": lambda: np.cumsum(big.confidence, axis=1),
    }
    for measure in measures.values():
        measure()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in measures}
    names = list(measures)
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            measures[name]()
            times[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_max": max(v) for k, v in times.items()})
    out["devices"] = float(devices)
    out["level"] = big_plan.level
    out["bottlenecked"] = float(np.count_nonzero(big_plan.bottlenecked()))
    out["inside"] = float(np.count_nonzero(read))
    for code, why in enumerate(PLAN_REASONS):
        out[f"reason_{why}"] = float(np.count_nonzero(big_plan.reason == code))
    return out


def main(devices: int = DEVICES) -> None:
    r = run(devices)
    scale = devices / LOOP_DEVICES
    loop_scaled = r["loop_small"] * scale
    print(
        f"{devices:,} devices (baseline loop on {LOOP_DEVICES:,}, scaled x{scale:g}); "
        f"median of {ROUNDS} rounds"
    )
    print(
        f"  {int(r['bottlenecked']):,} bottlenecked at level {r['level']:.3f}, "
        f"{int(r['inside']):,} with 0 < tau < 1; local: "
        + ", ".join(
            f"{why} {int(r[f'reason_{why}']):,}" for why in PLAN_REASONS[1:] if r[f"reason_{why}"]
        )
    )
    rows = [
        (f"plan_fleet, {devices:,} devices", r["plan"], r["plan_max"]),
        ("  water_level", r["water_level"], r["water_level_max"]),
        (
            f"  confidence_quantile, {int(r['inside']):,} histograms",
            r["quantile"],
            r["quantile_max"],
        ),
        (f"plan_fleet, {LOOP_DEVICES:,} devices", r["plan_small"], r["plan_small_max"]),
        (f"per-device loop, {LOOP_DEVICES:,} devices", r["loop_small"], r["loop_small_max"]),
        (f"per-device loop, scaled to {devices:,}", loop_scaled, r["loop_small_max"] * scale),
        (f"floor: argsort of {devices:,} float64", r["argsort"], r["argsort_max"]),
        (f"floor: cumsum of {devices:,} histograms", r["cumsum"], r["cumsum_max"]),
    ]
    for label, median, slowest in rows:
        print(f"  {label:44} {median * 1000:8.1f} ms  (slowest {slowest * 1000:.1f} ms)")
    print(
        f"  plan_fleet against the loop: {r['plan_small'] / r['loop_small']:.3f}x on "
        f"{LOOP_DEVICES:,} devices, {r['plan'] / loop_scaled:.3f}x on {devices:,} (scaled)"
    )
    verdict = "met" if r["plan"] <= GOAL_S else "NOT met"
    print(f"  goal: plan_fleet for {devices:,} devices <= {GOAL_S:g} s: {verdict}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES)
