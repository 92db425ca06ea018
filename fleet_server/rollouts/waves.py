"""Which devices a rollout has reached: consistent hashing, stratified, stable as the fleet changes.

The rules, over plain data (no database, no clock):

1. Each (rollout, device) pair has a *bucket* in [0, 1): the first 53 bits of
   ``blake2b(rollout_id NUL device_id)`` over 2^53. It is fixed for the pair,
   uniform, and independent of anything else the device is, so the order in
   which a rollout reaches devices is random with respect to them; another
   rollout orders them afresh.
2. The devices the selector matches (:func:`matches`) fall into *strata*, one
   per (hardware id, region). The spec's stages (:attr:`RolloutSpec.shares`:
   the waves, capped at ``1 - holdback``, then the holdback's release) are
   cumulative shares S_1 < … < S_K, and each stratum follows them on its own,
   so every wave holds each hardware id and region in proportion.
3. When stage k starts (:func:`fix_cutoffs`), each stratum's *cutoff* for it
   is fixed over the devices matching at that moment, n of them: the cutoff
   reaches ``ceil(S_k × n)`` of them, those of the lowest buckets (more only
   if devices that joined since the previous stage sit below its cutoff). Of
   the values that reach exactly that many, the one nearest S_k is kept, so a
   device that joins the stratum later is reached with a probability as near
   S_k as the stratum's devices allow.
4. Small strata: ``ceil`` gives a stratum of 7 devices one device in a 1 %
   wave. A stratum is never missing from the first wave (a crash loop on one
   hardware id shows in wave 1), at the price of wave 1 holding up to one
   device per stratum more than its share. That device is the stratum's
   *canary*, named in the plan (its lowest bucket when the stratum was first
   seen) rather than let in by the cutoff: a cutoff raised to reach it would
   let every later device of the stratum below that bucket in as well, far
   more than the share when the stratum grows. Should every device of a
   stratum the rollout reached leave, the lowest of those left becomes a
   canary too.
5. A device is reached at stage k if it is a canary of its stratum, or its
   bucket is at or below the stratum's cutoff for stage k; its *wave* is the
   first stage that reaches it. Cutoffs, once fixed, never change, later
   stages' cutoffs are at least the earlier ones', and canaries are only ever
   added. So a device's wave depends on its bucket and its stratum's plan
   alone: once reached it stays reached, in the same wave, whoever joins or
   leaves — itself included, if it leaves and comes back. (A device that
   moves to another stratum, a new region say, leaves one and joins another.)
6. A device matching later (a new device, a device given the tag) joins at the
   current stage: it is reached if its bucket is within the stratum's cutoff
   now. A stratum first seen mid-rollout has its cutoffs fixed the first time
   :func:`fix_cutoffs` sees it, for every stage started, over its devices then.
   Counts stay exact at the moment each stage starts; between starts, joiners
   keep each stratum's share in expectation.
7. The *control* is the matching devices not reached yet: randomised by the
   bucket, on the current version, in the same field conditions. After the
   last wave it is the holdback, the last ``holdback`` share of each stratum's
   ranking (``floor(holdback × n)`` devices), until its own stage releases it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from protocol.api.rollouts import Selector

Stratum = tuple[str, str | None]
# The largest bucket: every bucket is at or below it, so a cutoff there reaches all.
EVERY_BUCKET = 1.0 - 2.0**-53
_BUCKET_SCALE = 2.0**-53


class DeviceLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def hardware_id(self) -> str: ...
    @property
    def region(self) -> str | None: ...
    @property
    def tags(self) -> Iterable[str]: ...


@dataclass(frozen=True)
class DeviceFacts:
    """A device as a rollout sees it: its id and what a selector and a stratum read."""

    id: str
    hardware_id: str
    region: str | None = None
    tags: frozenset[str] = frozenset()


def bucket(rollout_id: str, device_id: str) -> float:
    """The device's place in [0, 1) for this rollout: fixed for the pair, uniform."""
    digest = hashlib.blake2b(
        rollout_id.encode() + b"\0" + device_id.encode(), digest_size=8
    ).digest()
    # The top 53 bits: a float holds them exactly, so no bucket rounds up to 1.0.
    return (int.from_bytes(digest, "big") >> 11) * _BUCKET_SCALE


def buckets(rollout_id: str, device_ids: Sequence[str]) -> npt.NDArray[np.float64]:
    """:func:`bucket` of each device, as one array (the same values, hashed once each)."""
    prefix = hashlib.blake2b(rollout_id.encode() + b"\0", digest_size=8)

    def digest(device_id: str) -> bytes:
        h = prefix.copy()
        h.update(device_id.encode())
        return h.digest()

    raw = b"".join([digest(d) for d in device_ids])
    words = np.frombuffer(raw, dtype=">u8").astype(np.uint64) >> np.uint64(11)
    return words.astype(np.float64) * _BUCKET_SCALE


def matches(selector: Selector, device: DeviceLike) -> bool:
    """Whether ``device`` is one the selector's rule names now.

    Values of one key are alternatives; every key given must match. A device
    with no region matches no ``region=`` term.
    """
    if selector.hardware and device.hardware_id not in selector.hardware:
        return False
    if selector.region and device.region not in selector.region:
        return False
    return not selector.tag or not set(selector.tag).isdisjoint(device.tags)


def stratum_of(device: DeviceLike) -> Stratum:
    """The stratum a device counts in: its hardware id and region."""
    return (device.hardware_id, device.region)


@dataclass(frozen=True)
class StratumPlan:
    """One stratum's fixed part of a plan.

    ``cutoffs[k-1]``: a device whose bucket is at or below it is reached at
    stage k; ``canaries``: devices reached from the first stage on whatever
    their bucket (a stratum is never missing from wave 1).
    """

    cutoffs: tuple[float, ...] = ()
    canaries: tuple[str, ...] = ()


@dataclass(frozen=True)
class WavePlan:
    """What a rollout has fixed of its waves: the stage reached, each stratum's cutoffs.

    A plan is data the controller stores; it changes only through
    :func:`fix_cutoffs`, which adds and never alters.
    """

    stage: int = 0
    strata: Mapping[Stratum, StratumPlan] = field(default_factory=dict)


@dataclass(frozen=True)
class Population:
    """The devices a selector matches now, as columns: id, stratum, bucket.

    Built once per evaluation (:meth:`of` from device rows, :meth:`of_columns`
    from a query's columns); the plan's functions read it without hashing again.
    """

    ids: Sequence[str]
    strata: tuple[Stratum, ...]
    stratum: npt.NDArray[np.intp]
    bucket: npt.NDArray[np.float64]

    @classmethod
    def of(cls, rollout_id: str, devices: Sequence[DeviceLike]) -> Population:
        return cls.of_columns(
            rollout_id,
            [d.id for d in devices],
            [d.hardware_id for d in devices],
            [d.region for d in devices],
        )

    @classmethod
    def of_columns(
        cls,
        rollout_id: str,
        ids: Sequence[str],
        hardware_ids: Sequence[str],
        regions: Sequence[str | None],
    ) -> Population:
        index: dict[Stratum, int] = {}
        codes = np.fromiter(
            (index.setdefault(s, len(index)) for s in zip(hardware_ids, regions, strict=True)),
            dtype=np.intp,
            count=len(ids),
        )
        return cls(ids, tuple(index), codes, buckets(rollout_id, ids))

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def members(self) -> list[npt.NDArray[np.intp]]:
        """For each stratum (in the order of :attr:`strata`), the positions of its devices."""
        order = np.argsort(self.stratum, kind="stable")
        bounds = np.searchsorted(self.stratum[order], np.arange(len(self.strata) + 1))
        return [order[bounds[s] : bounds[s + 1]] for s in range(len(self.strata))]


def fix_cutoffs(
    plan: WavePlan, population: Population, shares: Sequence[Fraction], stage: int | None = None
) -> WavePlan:
    """The plan with every stratum of ``population`` fixed for the stages up to ``stage``.

    ``stage``: the stage starting, or (``None``) the plan's own, at a tick.

    Stages already fixed for a stratum keep their cutoffs; a stratum seen for
    the first time gets a canary and all of them. Idempotent: fixing the same
    stage again over any population changes nothing already fixed. Call it
    when a stage starts and at every tick (for strata that appear).
    """
    stage = plan.stage if stage is None else stage
    if not 0 <= stage <= len(shares):
        raise ValueError(f"stage {stage} is not between 0 and {len(shares)}")
    strata = dict(plan.strata)
    if stage == 0:
        return WavePlan(max(plan.stage, stage), strata)
    wanted = {c for p in strata.values() for c in p.canaries}
    position = {population.ids[i]: i for i in _positions(population.ids, wanted)}
    for s, members in enumerate(population.members):
        key = population.strata[s]
        before = strata.get(key, StratumPlan())
        present = [
            position[c]
            for c in before.canaries
            if c in position and population.stratum[position[c]] == s
        ]
        canaries = before.canaries
        by_cutoff = bool(before.cutoffs) and bool(
            np.any(population.bucket[members] <= before.cutoffs[-1])
        )
        if not present and not by_cutoff:  # first seen, or none of it reached is left
            lowest = int(members[np.argmin(population.bucket[members])])
            present = [lowest]
            canaries = (*canaries, population.ids[lowest])
        elif len(before.cutoffs) >= stage:
            continue  # fixed already, and reached: a tick has nothing to do here
        others = np.sort(population.bucket[np.setdiff1d(members, present, assume_unique=True)])
        cutoffs = list(before.cutoffs)
        for k in range(len(cutoffs), stage):
            floor = cutoffs[-1] if cutoffs else -1.0
            cutoffs.append(_cutoff(others, shares[k], len(members), len(present), floor))
        strata[key] = StratumPlan(tuple(cutoffs), canaries)
    return WavePlan(max(plan.stage, stage), strata)


def _positions(ids: Sequence[str], wanted: set[str]) -> list[int]:
    if not wanted:
        return []
    return [i for i, device_id in enumerate(ids) if device_id in wanted]


def _cutoff(
    others: npt.NDArray[np.float64], share: Fraction, n: int, canaries: int, floor: float
) -> float:
    """The cutoff reaching ``ceil(share × n)`` of a stratum (its canaries count), nearest ``share``.

    ``others``: the sorted buckets of its devices but the canaries. Never
    below ``floor`` (the previous stage's cutoff), so no device reached leaves.
    """
    already = int(np.searchsorted(others, floor, side="right"))
    count = min(max(math.ceil(share * n) - canaries, already, 0), len(others))
    low = float(others[count - 1]) if count > 0 else 0.0
    high = float(np.nextafter(others[count], 0.0)) if count < len(others) else EVERY_BUCKET
    return max(min(max(float(share), low), high), low, floor)


def waves(plan: WavePlan, population: Population) -> npt.NDArray[np.intp]:
    """Each device's wave: the first stage that reaches it (1…), 0 if none has yet."""
    result = np.zeros(len(population), dtype=np.intp)
    canaries: dict[str, Stratum] = {}
    for s, members in enumerate(population.members):
        fixed = plan.strata.get(population.strata[s])
        if fixed is None or not fixed.cutoffs:
            continue  # a stratum no stage has fixed yet: none of it is reached
        cutoffs = np.asarray(fixed.cutoffs)
        first = np.searchsorted(cutoffs, population.bucket[members], side="left") + 1
        result[members] = np.where(first <= len(cutoffs), first, 0)
        canaries.update(dict.fromkeys(fixed.canaries, population.strata[s]))
    for i in _positions(population.ids, set(canaries)):
        if canaries[population.ids[i]] == population.strata[population.stratum[i]]:
            result[i] = 1
    return result


def reached(plan: WavePlan, population: Population) -> list[str]:
    """The devices the rollout has reached: on the new version, or to be."""
    return [population.ids[i] for i in np.flatnonzero(waves(plan, population))]


def control(plan: WavePlan, population: Population) -> list[str]:
    """The devices not reached yet: the control group (after the last wave, the holdback)."""
    return [population.ids[i] for i in np.flatnonzero(waves(plan, population) == 0)]


def wave_counts(plan: WavePlan, population: Population) -> dict[Stratum, list[int]]:
    """Per stratum, how many of its devices each stage reaches (cumulative)."""
    assigned = waves(plan, population)
    counts = {}
    for s, members in enumerate(population.members):
        mine = assigned[members]
        counts[population.strata[s]] = [
            int(np.count_nonzero((mine > 0) & (mine <= k))) for k in range(1, plan.stage + 1)
        ]
    return counts


def preview(
    rollout_id: str, devices: Sequence[DeviceLike], shares: Sequence[Fraction]
) -> list[int]:
    """How many of ``devices`` each stage would reach (cumulative) if every stage started now."""
    population = Population.of(rollout_id, devices)
    plan = fix_cutoffs(WavePlan(), population, shares, len(shares))
    assigned = waves(plan, population)
    return [
        int(np.count_nonzero((assigned > 0) & (assigned <= k))) for k in range(1, len(shares) + 1)
    ]


def plan_to_json(plan: WavePlan) -> dict[str, Any]:
    """The plan as JSON data: each stratum, its cutoffs and canaries (see :func:`plan_from_json`).

    Cutoffs are floats, which JSON writes in their shortest exact form, so the
    plan read back equals the plan written.
    """
    return {
        "stage": plan.stage,
        "strata": [
            {
                "hardware_id": hardware_id,
                "region": region,
                "cutoffs": list(fixed.cutoffs),
                "canaries": list(fixed.canaries),
            }
            for (hardware_id, region), fixed in plan.strata.items()
        ],
    }


def plan_from_json(data: Mapping[str, Any]) -> WavePlan:
    """The plan :func:`plan_to_json` wrote; ``ValueError`` if ``data`` is not one."""
    try:
        strata = {
            (str(s["hardware_id"]), None if s["region"] is None else str(s["region"])): StratumPlan(
                tuple(float(c) for c in s["cutoffs"]), tuple(str(c) for c in s["canaries"])
            )
            for s in data["strata"]
        }
        return WavePlan(int(data["stage"]), strata)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a wave plan: {exc!r}") from None
