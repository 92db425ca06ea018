"""Rollout gates in simulation: false stops and time to stop, ours beside a fixed-level test.

Seeded simulations of issue 12 point 8 over the gates' own functions
(:mod:`fleet_server.rollouts.evidence`, :mod:`fleet_server.rollouts.gates`),
many rollouts side by side as the rows of (rollouts x devices) arrays:

- each device has a random rank; wave ``k`` holds the ranks below
  ``ceil(share_k x devices)`` (exact counts, as the stratified waves give),
  and the hardware id (one of 5) follows the rank, so every wave holds each
  hardware id in proportion. The control is the devices not reached yet; the
  last wave keeps a holdback of 5 %;
- one tick is a minute, in which every device sends one window of 60
  requests. Devices differ: a fallback probability of ``2 % x Gamma(4, 1/4)``
  (CV 0.5), a CBPE accuracy of N(0.90, 0.02) and a log p95 of
  N(log 40 ms, 0.25), with window noise 0.05 and 0.15, and a day of
  pre-rollout history on the current version (each device's own baseline);
- a wave installs at its first tick; 1 % of installs fail; a failed device
  leaves both arms; 2 % of the devices, in both arms, are alive (they send
  heartbeats, and install) but send no windows;
- the sample-ratio test (:func:`~fleet_server.rollouts.gates.srm_log_e`) at
  every tick, as the service runs it: the devices that have reported in each
  arm against the arms' shares of the devices assigned (treatment: installed
  and not failed); a mismatch pauses (``SRM_THRESHOLD`` of the controller).

Policies: *anytime*, the gates as the controller uses them (every stop-gate
at every tick; fail on shown harm; pause on a sample-ratio mismatch; promote
after the bake only when every required gate passed; pause after the maximum
bake); *fixed*, a one-sided
z-test at 1 % per gate at every tick (Kayenta's 98 % interval) against the
same bounds, promoting after each bake when nothing failed; *fixed0*, the
same against no margin at all (any significant worsening fails).

Run ``python -m benchmarks.rollout_gates [--rollouts 500] [--policies anytime] [--only aa]``;
``make bench`` runs 100 rollouts per scenario (about 70 s on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from fleet_server.rollouts.controller import SRM_THRESHOLD
from fleet_server.rollouts.evidence import (
    ACCURACY_ESTIMATED,
    FALLBACK_RATE,
    INSTALL_FAILURES,
    LATENCY_P95,
    ArmRates,
    Comparison,
    Evidence,
    InstallTally,
    MeanSums,
    RateSums,
    arm_rates,
    log_rate_ratio,
    mean_difference,
)
from fleet_server.rollouts.gates import (
    ALPHA,
    BETA,
    GateSpec,
    comparison_log_e,
    evaluate,
    gate_specs,
    install_log_e,
    required,
    split,
    srm_log_e,
)

WAVES = (0.01, 0.10, 0.50, 0.95)  # the last wave keeps a 5 % holdback as its control
HALF_WAVE = 2  # the wave that reaches half the fleet
REQUESTS = 60
HARDWARE = 5
PRE_MINUTES = 1440
BASE_FALLBACK = 0.02
COMPARED = (FALLBACK_RATE, LATENCY_P95, ACCURACY_ESTIMATED)
FIXED_LEVEL = 0.01  # Kayenta's 98 % two-sided interval: a 1 % one-sided test
_Z_FIXED = NormalDist().inv_cdf(1.0 - FIXED_LEVEL)

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Scenario:
    """What the new version does differently from the current one."""

    name: str
    install_failure: float = 0.01
    fallback_factor: float = 1.0
    accuracy_shift: float = 0.0
    crash_hardware: int | None = None  # every install on this hardware id fails (crash loop)
    silent_share: float = 0.0  # this share of each wave stops reporting once installed


AA = Scenario("identical versions (A/A)")
BAD = (
    Scenario("install failures +2 pts over 1 %", install_failure=0.03),
    Scenario("fallback x1.3 over 2 %", fallback_factor=1.3),
    Scenario("CBPE accuracy -3 pts", accuracy_shift=-0.03),
    Scenario("crash loop on 1 hardware id of 5", crash_hardware=0),
)
SILENT = Scenario("half of each wave goes silent", silent_share=0.5)
OFFLINE = 0.02  # devices alive but sending no windows, in either arm
SRM_PAUSE = "sample ratio mismatch"


@dataclass
class Outcomes:
    """Per rollout: how it ended (fail, paused, completed, reached), at which tick and wave, why."""

    ending: list[str] = field(default_factory=list)
    tick: list[int] = field(default_factory=list)
    wave: list[int] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)

    def share(self, ending: str, before_wave: int | None = None) -> float:
        hits = [
            e == ending and (before_wave is None or w < before_wave)
            for e, w in zip(self.ending, self.wave, strict=True)
        ]
        return float(np.mean(hits)) if hits else math.nan

    def share_paused_by(self, reason: str) -> float:
        """The share of rollouts paused for ``reason`` (such as :data:`SRM_PAUSE`)."""
        hits = [
            e == "paused" and r == reason for e, r in zip(self.ending, self.reason, strict=True)
        ]
        return float(np.mean(hits)) if hits else math.nan

    def minutes_to_stop(self) -> list[int]:
        """Minutes from the first tick to the stop, of the rollouts that stopped."""
        return [t + 1 for e, t in zip(self.ending, self.tick, strict=True) if e == "fail"]


@dataclass
class _Fleet:
    """The devices of a batch of rollouts (rows) and what they have sent since joining their arm."""

    wave_of: npt.NDArray[np.intp]
    hardware: npt.NDArray[np.intp]
    fallback_p: Array
    accuracy: Array
    log_p95: Array
    pre_rate: Array
    pre_accuracy: Array
    pre_log_p95: Array
    installed: Mask
    failed: Mask
    quiet: Mask  # sends no windows: idle, or a silent install
    fallbacks: Array
    expected: Array
    accuracy_sum: Array
    latency_sum: Array
    windows: Array

    def keep(self, rows: Mask) -> None:
        for name, value in vars(self).items():
            setattr(self, name, value[rows])


def _fleet(rng: np.random.Generator, rollouts: int, devices: int, waves: Sequence[float]) -> _Fleet:
    shape = (rollouts, devices)
    rank = rng.permuted(np.tile(np.arange(devices), (rollouts, 1)), axis=1)
    cutoffs = np.ceil(np.asarray(waves) * devices)
    wave_of = np.searchsorted(cutoffs, rank, side="right")  # len(waves): the holdback
    p = BASE_FALLBACK * rng.gamma(4.0, 0.25, shape)
    accuracy = np.clip(0.90 + 0.02 * rng.standard_normal(shape), 0.0, 1.0)
    log_p95 = math.log(40.0) + 0.25 * rng.standard_normal(shape)
    pre_requests = REQUESTS * PRE_MINUTES
    # A day of history; the prior count keeps a device that never fell back off a zero rate.
    pre_rate = (rng.poisson(p * pre_requests) + 1.0) / (pre_requests + 1.0 / BASE_FALLBACK)
    noise = rng.standard_normal((2, *shape)) / math.sqrt(PRE_MINUTES)
    zeros = np.zeros(shape)
    return _Fleet(
        wave_of=wave_of,
        hardware=rank % HARDWARE,
        fallback_p=p,
        accuracy=accuracy,
        log_p95=log_p95,
        pre_rate=pre_rate,
        pre_accuracy=accuracy + 0.05 * noise[0],
        pre_log_p95=log_p95 + 0.15 * noise[1],
        installed=np.zeros(shape, bool),
        failed=np.zeros(shape, bool),
        quiet=rng.random(shape) < OFFLINE,
        fallbacks=zeros.copy(),
        expected=zeros.copy(),
        accuracy_sum=zeros.copy(),
        latency_sum=zeros.copy(),
        windows=zeros.copy(),
    )


@dataclass(frozen=True)
class Plan:
    """The rollout every simulated one follows."""

    devices: int = 10_000
    waves: tuple[float, ...] = WAVES
    bake: int = 30  # ticks (minutes)
    max_bake: int = 360
    stop_at_wave: int | None = None  # end a rollout when it is promoted into this wave


def _evidence(
    fleet: _Fleet,
) -> tuple[
    dict[str, tuple[Array, Array]],
    dict[str, ArmRates],
    Array,
    Array,
    Array,
    Array,
    Array,
    Array,
]:
    """The comparisons, the fallback gate's rates per request, devices, requests, installs."""
    treated = fleet.installed & ~fleet.failed
    control = ~fleet.installed
    fallback = log_rate_ratio(
        RateSums.of(fleet.fallbacks, fleet.expected, treated),
        RateSums.of(fleet.fallbacks, fleet.expected, control),
    )
    rates = arm_rates(
        RateSums.of(fleet.fallbacks, fleet.expected, treated),
        RateSums.of(fleet.fallbacks, fleet.expected, control),
        np.where(treated, REQUESTS * fleet.windows, 0.0).sum(1),
    )
    seen = np.maximum(fleet.windows, 1.0)
    latency_change = fleet.latency_sum / seen - fleet.pre_log_p95
    accuracy_change = fleet.accuracy_sum / seen - fleet.pre_accuracy
    reporting = fleet.windows > 0
    latency = mean_difference(
        MeanSums.of(latency_change, treated & reporting),
        MeanSums.of(latency_change, control & reporting),
    )
    accuracy = mean_difference(
        MeanSums.of(accuracy_change, treated & reporting),
        MeanSums.of(accuracy_change, control & reporting),
    )
    n_t = (treated & reporting).sum(1)
    n_c = (control & reporting).sum(1)
    requests = REQUESTS * fleet.windows
    r_t = np.where(treated, requests, 0.0).sum(1)
    r_c = np.where(control, requests, 0.0).sum(1)
    installs = fleet.installed.sum(1)
    failures = (fleet.installed & fleet.failed).sum(1)
    comparisons = {FALLBACK_RATE: fallback, LATENCY_P95: latency, ACCURACY_ESTIMATED: accuracy}
    return comparisons, {FALLBACK_RATE: rates}, n_t, n_c, r_t, r_c, installs, failures


def _anytime(
    specs: dict[str, GateSpec],
    alphas: dict[str, float],
    betas: dict[str, float],
    comparisons: dict[str, tuple[Array, Array]],
    rates: dict[str, ArmRates],
    n_t: Array,
    n_c: Array,
    r_t: Array,
    r_c: Array,
    installs: Array,
    failures: Array,
) -> dict[str, npt.NDArray[np.str_]]:
    """Each gate's verdict per rollout, vectorised: the rules of :func:`gates.evaluate`."""
    out: dict[str, npt.NDArray[np.str_]] = {}
    for name, (estimate, se) in comparisons.items():
        spec = specs[name]
        harm, ni = comparison_log_e(spec, estimate, se, rates.get(name))
        usable = np.isfinite(estimate) & np.isfinite(se)
        if spec.allowed_extra is not None and name in rates:
            r = [np.asarray(x) for x in rates[name]]
            usable |= np.isfinite(r[0] + r[1] + r[2] + r[3]) & (r[1] + r[3] > 0)
        judged = (
            (np.minimum(n_t, n_c) >= spec.min_devices)
            & (np.minimum(r_t, r_c) >= spec.min_requests)
            & usable
        )
        verdict = np.where(
            harm >= math.log(1 / alphas[name]),
            "fail",
            np.where(ni >= math.log(1 / betas[name]), "pass", "inconclusive"),
        )
        out[name] = np.where(judged, verdict, "inconclusive")
    spec = specs[INSTALL_FAILURES]
    verdicts = []
    for k, n in zip(failures.tolist(), installs.tolist(), strict=True):
        harm_e, ni_e = install_log_e(spec, k, n)
        if n < spec.min_devices:
            verdicts.append("inconclusive")
        elif harm_e >= math.log(1 / alphas[INSTALL_FAILURES]):
            verdicts.append("fail")
        elif ni_e >= math.log(1 / betas[INSTALL_FAILURES]):
            verdicts.append("pass")
        else:
            verdicts.append("inconclusive")
    out[INSTALL_FAILURES] = np.asarray(verdicts)
    return out


def _fixed(
    specs: dict[str, GateSpec],
    comparisons: dict[str, tuple[Array, Array]],
    n_t: Array,
    n_c: Array,
    installs: Array,
    failures: Array,
    margins: bool,
) -> dict[str, npt.NDArray[np.str_]]:
    """Kayenta-style: a fixed-level z-test of harm per gate, at every tick; never a pass.

    Below a gate's minimum of devices it does not judge, as ours does not.
    """
    out: dict[str, npt.NDArray[np.str_]] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, (estimate, se) in comparisons.items():
            spec = specs[name]
            bound = spec.bounds[0] if margins else 0.0
            z = (estimate - bound) / se
            z = z if spec.direction == "higher_is_worse" else -z
            z = np.where(np.minimum(n_t, n_c) >= spec.min_devices, z, np.nan)
            out[name] = np.where(np.nan_to_num(z, nan=-np.inf) > _Z_FIXED, "fail", "inconclusive")
        allowed = specs[INSTALL_FAILURES].bounds[0]
        z = (failures / installs - allowed) / np.sqrt(allowed * (1 - allowed) / installs)
        z = np.where(installs >= 10, z, -np.inf)
    out[INSTALL_FAILURES] = np.where(z > _Z_FIXED, "fail", "inconclusive")
    return out


def simulate(
    scenario: Scenario,
    rollouts: int,
    seed: int,
    plan: Plan = Plan(),
    policy: str = "anytime",
    batch: int = 100,
    cross_check: bool = False,
) -> Outcomes:
    """Run ``rollouts`` rollouts of ``scenario`` to their ends, ``batch`` at a time, seeded.

    ``cross_check``: also judge each live rollout with :func:`gates.evaluate`
    at every tick and assert it says what the vectorised rules say.
    """
    rng = np.random.default_rng(seed)
    outcomes = Outcomes()
    for start in range(0, rollouts, batch):
        _run_batch(scenario, min(batch, rollouts - start), rng, plan, policy, cross_check, outcomes)
    return outcomes


def _run_batch(
    scenario: Scenario,
    rollouts: int,
    rng: np.random.Generator,
    plan: Plan,
    policy: str,
    cross_check: bool,
    outcomes: Outcomes,
) -> None:
    specs_list = gate_specs()
    specs = {s.name: s for s in specs_list}
    alphas, betas = split(ALPHA, specs_list), split(BETA, specs_list)
    fleet = _fleet(rng, rollouts, plan.devices, plan.waves)
    ids = np.arange(rollouts)
    wave = np.zeros(rollouts, np.intp)
    wave_start = np.zeros(rollouts, np.intp)
    ending = [""] * rollouts
    tick_of = [-1] * rollouts
    wave_of = [-1] * rollouts
    reason = [""] * rollouts
    tick = 0
    while ids.size:
        joins = (fleet.wave_of <= wave[:, None]) & ~fleet.installed
        if joins.any():
            fail_p = np.full(fleet.installed.shape, scenario.install_failure)
            if scenario.crash_hardware is not None:
                fail_p[fleet.hardware == scenario.crash_hardware] = 1.0
            fleet.failed |= joins & (rng.random(fail_p.shape) < fail_p)
            if scenario.silent_share:
                fleet.quiet |= joins & (rng.random(fail_p.shape) < scenario.silent_share)
            fleet.installed |= joins
            for sums in (fleet.fallbacks, fleet.expected, fleet.accuracy_sum, fleet.latency_sum):
                sums[joins] = 0.0
            fleet.windows[joins] = 0.0
        treated = fleet.installed & ~fleet.failed
        sending = (treated | ~fleet.installed) & ~fleet.quiet
        p = fleet.fallback_p * np.where(treated, scenario.fallback_factor, 1.0)
        noise = rng.standard_normal((2, *p.shape))
        fleet.fallbacks += np.where(sending, rng.poisson(REQUESTS * p), 0.0)
        fleet.expected += np.where(sending, REQUESTS * fleet.pre_rate, 0.0)
        shift = np.where(treated, scenario.accuracy_shift, 0.0)
        fleet.accuracy_sum += np.where(sending, fleet.accuracy + shift + 0.05 * noise[0], 0.0)
        fleet.latency_sum += np.where(sending, fleet.log_p95 + 0.15 * noise[1], 0.0)
        fleet.windows += sending

        comparisons, rates, n_t, n_c, r_t, r_c, installs, failures = _evidence(fleet)
        if policy == "anytime":
            verdicts = _anytime(
                specs,
                alphas,
                betas,
                comparisons,
                rates,
                n_t,
                n_c,
                r_t,
                r_c,
                installs,
                failures,
            )
        else:
            verdicts = _fixed(
                specs, comparisons, n_t, n_c, installs, failures, margins=policy == "fixed"
            )
        if cross_check:
            _cross_check(
                specs_list,
                alphas,
                betas,
                verdicts,
                comparisons,
                rates,
                (n_t, n_c, r_t, r_c),
                (installs, failures),
            )

        srm = _srm(fleet) if policy == "anytime" else np.full(ids.size, -np.inf)
        live = np.ones(ids.size, bool)
        for row, rollout in enumerate(ids.tolist()):
            failing = [name for name, v in verdicts.items() if v[row] == "fail"]
            if failing:
                live[row] = False
                ending[rollout], tick_of[rollout] = "fail", tick
                wave_of[rollout], reason[rollout] = int(wave[row]), failing[0]
                continue
            if srm[row] >= SRM_THRESHOLD:
                live[row] = False
                ending[rollout], tick_of[rollout] = "paused", tick
                wave_of[rollout], reason[rollout] = int(wave[row]), SRM_PAUSE
                continue
            if tick - wave_start[row] + 1 < plan.bake:
                continue
            needed = required(specs_list, int(wave[row]) + 1, len(plan.waves))
            missing = [n for n in needed if verdicts[n][row] != "pass"]
            if not missing or policy != "anytime":
                if wave[row] + 1 == len(plan.waves):
                    live[row] = False
                    ending[rollout], tick_of[rollout], wave_of[rollout] = (
                        "completed",
                        tick,
                        len(plan.waves),
                    )
                    continue
                wave[row] += 1
                wave_start[row] = tick + 1
                if plan.stop_at_wave is not None and wave[row] >= plan.stop_at_wave:
                    live[row] = False
                    ending[rollout], tick_of[rollout] = "reached", tick
                    wave_of[rollout] = int(wave[row])
            elif tick - wave_start[row] + 1 >= plan.max_bake:
                live[row] = False
                ending[rollout], tick_of[rollout] = "paused", tick
                wave_of[rollout], reason[rollout] = int(wave[row]), ",".join(missing)
        if not live.all():
            ids, wave, wave_start = ids[live], wave[live], wave_start[live]
            fleet.keep(live)
        tick += 1
    outcomes.ending += ending
    outcomes.tick += tick_of
    outcomes.wave += wave_of
    outcomes.reason += reason


def _srm(fleet: _Fleet) -> Array:
    """Each rollout's SRM log e-value: devices reporting per arm against the arms' shares
    of the devices assigned (``-inf`` while an arm is empty), as the service computes it."""
    treated = fleet.installed & ~fleet.failed
    control = ~fleet.installed
    reporting = fleet.windows > 0
    out = np.full(treated.shape[0], -np.inf)
    assigned_t, assigned_c = treated.sum(1), control.sum(1)
    seen_t, seen_c = (treated & reporting).sum(1), (control & reporting).sum(1)
    for row in range(out.size):
        a_t, a_c = int(assigned_t[row]), int(assigned_c[row])
        if a_t and a_c:
            shares = [a_t / (a_t + a_c), a_c / (a_t + a_c)]
            out[row] = srm_log_e([int(seen_t[row]), int(seen_c[row])], shares)
    return out


def _cross_check(
    specs: Sequence[GateSpec],
    alphas: dict[str, float],
    betas: dict[str, float],
    verdicts: dict[str, npt.NDArray[np.str_]],
    comparisons: dict[str, tuple[Array, Array]],
    rates: dict[str, ArmRates],
    counts: tuple[Array, Array, Array, Array],
    tally: tuple[Array, Array],
) -> None:
    n_t, n_c, r_t, r_c = counts
    for spec in specs:
        if spec.name not in verdicts:
            continue
        for row in range(n_t.size):
            evidence: Evidence
            if spec.name == INSTALL_FAILURES:
                evidence = InstallTally(int(tally[1][row]), int(tally[0][row]))
            else:
                estimate, se = (float(a[row]) for a in comparisons[spec.name])
                ok = math.isfinite(estimate) and math.isfinite(se) and se > 0
                arms = (
                    ArmRates(*(float(np.asarray(a)[row]) for a in rates[spec.name]))
                    if spec.name in rates
                    else None
                )
                evidence = Comparison(
                    estimate if ok else math.nan,
                    se if ok else math.nan,
                    int(n_t[row]),
                    int(n_c[row]),
                    int(r_t[row]),
                    int(r_c[row]),
                    arms,
                )
            said = evaluate(spec, evidence, alphas[spec.name], betas[spec.name]).decision
            assert said == verdicts[spec.name][row], (spec.name, evidence, said)


def _summary(label: str, result: Outcomes, seconds: float, bad: bool) -> str:
    stops = result.minutes_to_stop()
    line = f"  {label:38} n={len(result.ending):4d} "
    if bad:
        line += f"stopped before half {result.share('fail', HALF_WAVE):6.1%}"
    else:
        line += (
            f"false stop {result.share('fail'):6.1%}  completed {result.share('completed'):6.1%}"
            f"  paused {result.share('paused'):6.1%}"
            f" (of which SRM {result.share_paused_by(SRM_PAUSE):6.1%})"
        )
    if stops:
        line += f"  min to stop median {np.median(stops):.0f} p90 {np.quantile(stops, 0.9):.0f}"
        by: dict[str, int] = {}
        for e, r in zip(result.ending, result.reason, strict=True):
            if e == "fail":
                by[r] = by.get(r, 0) + 1
        line += " by " + ",".join(f"{k}:{v}" for k, v in sorted(by.items()))
    return line + f"  ({seconds:.0f} s)"


POLICIES = ("anytime", "fixed", "fixed0")


def main(rollouts: int = 100, policies: Sequence[str] = POLICIES, only: str | None = None) -> None:
    """Print false stops (A/A) and stops before the half-fleet wave (bad versions) per policy.

    ``rollouts`` per scenario; ``only``: ``"aa"`` or ``"bad"``. Also 100 A/A
    rollouts over 200 devices, whose first wave holds 2: a policy that
    promotes them promotes on no evidence.
    """
    print(
        f"10,000 devices, waves {','.join(f'{w:.0%}' for w in WAVES)} (5 % holdback), "
        f"bake 30 min, max bake 6 h, one window of {REQUESTS} requests a device a minute; "
        f"{rollouts} rollouts per scenario"
    )
    for policy in policies:
        print(f" policy {policy}")
        if only in (None, "aa"):
            started = time.perf_counter()
            result = simulate(AA, rollouts, seed=1, policy=policy)
            print(_summary(AA.name, result, time.perf_counter() - started, bad=False))
            started = time.perf_counter()
            result = simulate(AA, 100, seed=7, plan=Plan(devices=200), policy=policy)
            seconds = time.perf_counter() - started
            print(_summary("A/A, 200 devices (too few)", result, seconds, bad=False))
        if only in (None, "bad"):
            for index, scenario in enumerate(BAD):
                started = time.perf_counter()
                result = simulate(
                    scenario,
                    rollouts,
                    seed=100 + index,
                    plan=Plan(stop_at_wave=HALF_WAVE),
                    policy=policy,
                )
                print(_summary(scenario.name, result, time.perf_counter() - started, bad=True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=100, help="per scenario (default 100)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--only", choices=("aa", "bad"))
    args = parser.parse_args()
    main(args.rollouts, args.policies.split(","), args.only)
