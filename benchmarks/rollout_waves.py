"""Wave membership for 1,000,000 devices, against hashing their ids alone, in one run.

What is measured, over ``DEVICES`` device rows as a query returns them (id,
hardware id of 5, region of 4; made once, untimed):

- *membership*: what a rollout does when it starts: :meth:`Population.of_columns`
  (each device's bucket, each device's stratum), :func:`fix_cutoffs` for every
  stage of ``1%,10%,50%,100%`` with a 5 % holdback from an empty plan, and
  :func:`waves`, each device's wave;
- *tick*: what a controller tick does over the same rows once the plan is
  fixed: the population again, :func:`fix_cutoffs` (nothing new to fix) and
  :func:`waves`;
- the parts of *membership* on their own;
- floors: *hashing alone*, :func:`buckets` (blake2b of every id, the
  rollout's prefix hashed once and its state copied per id), the least the
  hashing costs, which every membership rule that is random with respect to
  the device pays; *blake2b, plain loop*, the same hash written the plain way
  (``hashlib.blake2b(prefix + id, digest_size=8)`` in a list comprehension);
  *sort*, ``numpy.sort`` of 1M float64, the least a ranking of the buckets
  costs.

``ROUNDS`` rounds after a warm-up, the measurements in an order rotating
from round to round so all see the same machine state; medians, and each
figure's ratio to hashing alone.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable

import numpy as np

from fleet_server.rollouts.waves import Population, WavePlan, buckets, fix_cutoffs, waves
from protocol.api.rollouts import RolloutSpec

DEVICES = 1_000_000
ROUNDS = 7
GOAL_S = 2.0
ROLLOUT = "rollout-42"
HARDWARE = ("rpi4-arm64", "rpi5-arm64", "jetson-orin", "imx8mp", "esp32-s3")
REGIONS = ("eu-west", "us-east", "ap-south", "sa-east")
SPEC = RolloutSpec.model_validate(
    {
        "release": "pump-health@1.1.0",
        "select": "tag=pumps",
        "waves": "1%,10%,50%,100%",
        "bake": "30m",
    }
)


def rows() -> tuple[list[str], list[str], list[str]]:
    """The devices' ids, hardware ids and regions, as columns."""
    rng = np.random.default_rng(0)
    ids = [f"dev-{i:07d}" for i in range(DEVICES)]
    hardware = np.array(HARDWARE)[rng.integers(0, len(HARDWARE), DEVICES)].tolist()
    regions = np.array(REGIONS)[rng.integers(0, len(REGIONS), DEVICES)].tolist()
    return ids, hardware, regions


def run() -> dict[str, float]:
    """Measure and return the medians (seconds)."""
    ids, hardware, regions = rows()
    shares = SPEC.shares
    fixed: WavePlan = WavePlan()
    prefix = ROLLOUT.encode() + b"\0"

    def membership() -> None:
        nonlocal fixed
        population = Population.of_columns(ROLLOUT, ids, hardware, regions)
        fixed = fix_cutoffs(WavePlan(), population, shares, len(shares))
        waves(fixed, population)

    def tick() -> None:
        population = Population.of_columns(ROLLOUT, ids, hardware, regions)
        assert fix_cutoffs(fixed, population, shares) == fixed
        waves(fixed, population)

    def hashing_alone() -> None:
        buckets(ROLLOUT, ids)

    def blake2b_alone() -> None:
        b"".join([hashlib.blake2b(prefix + i.encode(), digest_size=8).digest() for i in ids])

    population = Population.of_columns(ROLLOUT, ids, hardware, regions)
    plan = fix_cutoffs(WavePlan(), population, shares, len(shares))
    unsorted = population.bucket.copy()

    def population_alone() -> None:
        Population.of_columns(ROLLOUT, ids, hardware, regions)

    def fix_alone() -> None:
        # A fresh population each time: its strata are cached once computed.
        fresh = Population(population.ids, population.strata, population.stratum, unsorted)
        fix_cutoffs(WavePlan(), fresh, shares, len(shares))

    def waves_alone() -> None:
        waves(plan, Population(population.ids, population.strata, population.stratum, unsorted))

    def sort_alone() -> None:
        np.sort(unsorted)

    measured: dict[str, Callable[[], None]] = {
        "membership": membership,
        "tick": tick,
        "population": population_alone,
        "fix_cutoffs": fix_alone,
        "waves": waves_alone,
        "hashing": hashing_alone,
        "blake2b": blake2b_alone,
        "sort": sort_alone,
    }
    times: dict[str, list[float]] = {name: [] for name in measured}
    for round_ in range(ROUNDS + 1):
        names = list(measured)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            started = time.perf_counter()
            measured[name]()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    result = {name: statistics.median(values) for name, values in times.items()}
    result.update({f"{name}_max": max(values) for name, values in times.items()})
    counts = np.bincount(waves(fixed, population), minlength=len(shares) + 1)
    result.update({f"wave_{k}": float(c) for k, c in enumerate(counts)})
    return result


def main() -> None:
    r = run()
    floor = r["hashing"]
    print(
        f"{DEVICES:,} devices, {len(HARDWARE)} hardware ids x {len(REGIONS)} regions, "
        f"waves {','.join(f'{w:g}%' for w in SPEC.waves)} + {SPEC.holdback:g}% holdback; "
        f"median of {ROUNDS} rounds, ratio to hashing alone"
    )
    rows_ = [
        ("membership (population, fix_cutoffs, waves)", "membership"),
        ("tick (population, nothing to fix, waves)", "tick"),
        ("  population: buckets and strata", "population"),
        ("  fix_cutoffs, every stage", "fix_cutoffs"),
        ("  waves", "waves"),
        ("hashing alone: buckets() (floor)", "hashing"),
        ("blake2b, a plain loop", "blake2b"),
        ("numpy.sort of 1M float64", "sort"),
    ]
    for label, key in rows_:
        print(
            f"  {label:46} {r[key] * 1000:7.0f} ms  {r[key] / floor:5.2f}x  "
            f"(slowest {r[f'{key}_max'] * 1000:.0f} ms)"
        )
    verdict = "met" if r["membership"] <= GOAL_S else "NOT met"
    print(f"  goal: membership <= {GOAL_S:g} s: {verdict}")
    sizes = [int(r[f"wave_{k}"]) for k in range(1, len(SPEC.shares) + 1)]
    print(f"  devices per wave (holdback last): {sizes}")


if __name__ == "__main__":
    main()
