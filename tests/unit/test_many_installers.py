"""200 agents' installers in one process, on in-memory parts, driven by random event sequences.

Each agent is the real :class:`Installer` (step function and driver) given
in-memory slots, models, journal store, fetcher, clock and fault points. Its
director assigns a random series of releases: good ones, a corrupt bundle, a
model that fails its self-test, one the watchdog rolls back, one that crashes
the agent in its trial. In between, at random: polls, clock ticks, the
repositories unavailable, garbled downloads, forged assignments, restarts
(clean or not) and power cuts at every step the crash tests hold at. Each
agent must end where its events lead: phase, installed release and counter,
active and previous slot, remembered bundles, and the count of each outcome.
Then, where the last release was good and another good one came before it, the
director rolls the agent back (a marked rollback), with power cuts in the
slot switch too: it must end on the release before, its counter kept, the
release it left never retried, and refuse to step back again.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.config import UpdateConfig
from agent.ota.answers import (
    Assigned,
    Changed,
    Downloaded,
    FetchAnswer,
    Refused,
    RollbackAssigned,
    Unassigned,
    Unavailable,
)
from agent.ota.errors import SelfTestFailed
from agent.ota.installer import Installer
from agent.ota.journal import InstallTarget, Journal, Phase
from agent.ota.parts import SlotModel
from agent.ota.selftest import SelfTestReport
from agent.ota.slots import SlotError, SlotPointer
from protocol.manifest import Manifest

AGENTS = 200
RELEASES = 5
MAX_TRIAL_BOOTS = 3
KINDS = ("good", "corrupt", "bad-model", "watchdog", "crash-loop")


class PowerCut(Exception):
    """The power goes at a fault point: the installer stops mid-step."""


@dataclass(frozen=True)
class Release:
    target: InstallTarget
    kind: str


@dataclass
class World:
    """One device's surroundings: what the director assigns, and what goes wrong."""

    rng: random.Random
    assigned: Release | None = None
    bundles: dict[str, Release] = field(default_factory=dict)  # by file name
    power_cuts: int = 0
    rollback_of: str | None = None  # the assignment is a fleet rollback replacing this bundle

    def noise(self, chance: float) -> bool:
        return self.rng.random() < chance

    def cut(self, chance: float) -> None:
        if self.noise(chance):
            self.power_cuts += 1
            raise PowerCut


class MemoryStore:
    """The journal kept as the JSON a device writes; events in a list."""

    def __init__(self) -> None:
        self.saved = Journal().model_dump_json()
        self.log: list[dict[str, object]] = []

    def load(self) -> Journal:
        return Journal.model_validate_json(self.saved)

    def save(self, journal: Journal) -> None:
        self.saved = journal.model_dump_json()

    def event(self, at: float, kind: str, **fields: object) -> None:
        self.log.append({"at": at, "event": kind, **fields})

    def events(self, last: int = 20) -> list[dict[str, object]]:
        return self.log[-last:]


class MemorySlots:
    """A/B slots holding release names; a write cut halfway leaves the slot torn."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.current = SlotPointer()
        self.held: dict[str, Release | None] = {"a": None, "b": None}

    def pointer(self) -> SlotPointer:
        return self.current

    def inactive(self) -> str:
        return "b" if self.current.active == "a" else "a"

    def stage(self, slot: str, bundle: Path, on_half_written: object = None) -> Manifest:
        assert slot != self.current.active, "never overwrite the active slot"
        if slot == self.current.previous:
            self.current = SlotPointer(active=self.current.active, previous=None)
        release = self.world.bundles[bundle.name]
        self.held[slot] = None  # torn until the write completes
        if release.kind == "corrupt":
            raise SlotError(f"{bundle.name}: no manifest.json")
        assert callable(on_half_written)
        on_half_written()
        self.held[slot] = release
        return manifest_of(release)

    def discard_staging(self) -> None:
        pass

    def switch(self, slot: str) -> SlotPointer:
        assert self.held[slot] is not None, "never point at an empty slot"
        self.current = SlotPointer(active=slot, previous=self.current.active)
        return self.current

    def verify(self, slot: str) -> Manifest:
        release = self.held[slot]
        if release is None:
            raise SlotError(f"slot {slot} holds no bundle")
        self.world.cut(0.05)
        return manifest_of(release)

    def return_to(self, slot: str) -> SlotPointer:
        assert self.held[slot] is not None, "never point at an empty slot"
        self.current = SlotPointer(active=slot, previous=None)
        self.world.cut(0.1)  # switched, but the journal does not say so yet
        return self.current

    def roll_back(self) -> SlotPointer:
        if self.current.previous is None:
            raise SlotError("there is no previous slot to roll back to")
        self.current = SlotPointer(active=self.current.previous, previous=None)
        return self.current


def manifest_of(release: Release) -> Manifest:
    t = release.target
    return Manifest.model_construct(
        name=t.name, version=t.version, release_counter=t.release_counter
    )


class MemoryModels:
    def __init__(self, slots: MemorySlots) -> None:
        self.slots = slots

    def load(self, slot: str) -> SlotModel:
        release = self.slots.held[slot]
        if release is None:
            raise SlotError(f"slot {slot} holds no bundle")
        return SlotModel(slot, manifest_of(release), model=object())  # type: ignore[arg-type]

    def self_test(self, slot: str) -> tuple[SlotModel, SelfTestReport]:
        model = self.load(slot)
        release = self.slots.held[slot]
        assert release is not None
        if release.kind == "bad-model":
            raise SelfTestFailed("golden vector 3 differs")
        return model, SelfTestReport(latency_p95_ms=1.0, memory_mb=30.0, golden_max_error=0.0)


class MemoryFetcher:
    """The director and image repository, with outages, garbled bytes and forged answers."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def check(self, installed_counter: int) -> FetchAnswer:
        await asyncio.sleep(0)
        if self.world.noise(0.15):
            return Unavailable(reason="repository-unavailable", message="timed out")
        if self.world.assigned is None:
            return Unassigned()
        if self.world.rollback_of is not None:
            return RollbackAssigned(
                target=self.world.assigned.target, rollback_of=self.world.rollback_of
            )
        return Assigned(target=self.world.assigned.target)

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
        await asyncio.sleep(0)
        world = self.world
        if world.assigned is None:
            return Unassigned()
        if world.noise(0.1):
            return Unavailable(reason="repository-unavailable", message="timed out")
        if world.noise(0.05):
            return Refused(reason="bundle-not-found", message="forged", about="assignment")
        target = world.assigned.target
        if world.rollback_of is not None or expect not in target.matching_ids():
            return Changed(target=target)
        world.cut(0.05)  # power cut mid-download: the partial file stays
        if world.noise(0.1):
            return Refused(reason="tampered-bundle", message="garbled", about="download")
        return Downloaded(target=target, path=f"/downloads/{target.path.rpartition('/')[2]}")


class Faults:
    def __init__(self, world: World) -> None:
        self.world = world

    def hold(self, step: str) -> None:
        if step != "trial":  # restarts in the trial are counted; they are driven below
            self.world.cut(0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


UPDATE = UpdateConfig(poll_interval_s=60.0, health_period_s=30.0, max_trial_boots=MAX_TRIAL_BOOTS)


@dataclass
class Device:
    world: World
    slots: MemorySlots
    store: MemoryStore
    clock: Clock
    installer: Installer

    async def restart(self, clean: bool) -> None:
        if clean:
            self.installer.shutting_down_cleanly()
        self.installer = new_installer(self.world, self.slots, self.store, self.clock)
        await self.safely(self.installer.recover())

    async def safely(self, step: object) -> None:
        """Run one step; a power cut in it is followed by a restart, as on a device."""
        try:
            await step  # type: ignore[misc]
        except PowerCut:
            await self.restart(clean=False)


def new_installer(world: World, slots: MemorySlots, store: MemoryStore, clock: Clock) -> Installer:
    return Installer(
        slots=slots,
        models=MemoryModels(slots),
        store=store,
        fetcher=MemoryFetcher(world),
        update=UPDATE,
        publish=lambda active, previous: None,
        clock=clock,
        faults=Faults(world),
    )


def releases_for(rng: random.Random, device: int) -> list[Release]:
    kinds = ["good"] + [rng.choice(KINDS) for _ in range(RELEASES - 1)]
    out = []
    for i, kind in enumerate(kinds, start=1):
        digest = f"{device:04x}{i:02x}".ljust(64, "0")
        target = InstallTarget(
            path=f"m/m-{i}.0.0-{kind}.bundle",
            name="m",
            version=f"{i}.0.0",
            release_counter=i * 1000,
            hashes={"sha256": digest},
            length=100,
        )
        out.append(Release(target, kind))
    return out


def ended(journal: Journal, release: Release) -> bool:
    outcome = journal.last_outcome
    return (
        journal.phase is Phase.IDLE
        and outcome is not None
        and outcome.target.same_bundle(release.target)
        and outcome.result != "refused"
    ) or release.target.bundle_id in journal.rejected


async def run_device(seed: int) -> None:
    rng = random.Random(seed)
    world = World(rng)
    slots, store, clock = MemorySlots(world), MemoryStore(), Clock()
    device = Device(world, slots, store, clock, new_installer(world, slots, store, clock))
    await device.safely(device.installer.recover())
    releases = releases_for(rng, seed)
    crashes_in_trial = 0
    for release in releases:
        world.bundles[release.target.path.rpartition("/")[2]] = release
        world.assigned = release
        crashes_in_trial = 0
        for _ in range(5000):
            if ended(device.installer.journal, release):
                break
            installer = device.installer
            clock.now += rng.uniform(0.0, 40.0)
            if installer.in_trial and release.kind == "watchdog":
                for _ in range(UPDATE.watchdog.window):
                    installer.observe("active", release.target.version, False, "nan")
                continue
            if installer.in_trial and release.kind == "crash-loop":
                await device.restart(clean=False)
                continue
            action = rng.random()
            if action < 0.5:
                await device.safely(installer.poll())
            elif action < 0.85:
                installer.tick()
            elif action < 0.95 or crashes_in_trial >= MAX_TRIAL_BOOTS - 2:
                await device.restart(clean=True)
            else:
                crashes_in_trial += installer.in_trial
                await device.restart(clean=False)
        else:
            raise AssertionError(
                f"device {seed} never finished {release}: {device.installer.journal}"
            )
    check_device(seed, device, releases)
    good = [r for r in releases if r.kind == "good"]
    if releases[-1].kind == "good" and len(good) >= 2:
        await roll_back_device(seed, device, good[-2], good[-1])


async def roll_back_device(seed: int, device: Device, back: Release, left: Release) -> None:
    """The director rolls the device back from ``left`` to ``back``: one step, and no more."""
    world, clock, rng = device.world, device.clock, device.world.rng
    where = f"device {seed}: back from {left.target.version} to {back.target.version}"
    back_slot = "b" if device.slots.current.active == "a" else "a"
    assert device.slots.held[back_slot] == back, where
    world.assigned, world.rollback_of = back, left.target.bundle_id
    for _ in range(5000):
        journal = device.installer.journal
        if journal.installed == back.target:
            break
        clock.now += rng.uniform(0.0, 40.0)
        action = rng.random()
        if action < 0.6:
            await device.safely(device.installer.poll())
        elif action < 0.8:
            device.installer.tick()
        else:
            await device.restart(clean=action < 0.9)
    else:
        raise AssertionError(f"{where}: never went back: {device.installer.journal}")
    journal = device.installer.journal
    assert journal.phase is Phase.IDLE and journal.previous is None, where
    assert journal.installed_counter == left.target.release_counter, where
    assert journal.rejection(left.target) is not None, where
    assert device.slots.current == SlotPointer(active=back_slot, previous=None), where
    serving = device.installer.active
    assert serving is not None and serving.manifest.version == back.target.version, where
    events = [e["event"] for e in device.store.log]
    assert events.count("fleet-rolled-back") == 1, where
    # Named as a rollback in turn, the bundle left (in the other slot now) is refused.
    world.assigned, world.rollback_of = left, back.target.bundle_id
    for _ in range(20):
        await device.safely(device.installer.poll())
    assert device.installer.journal.installed == back.target, where
    assert device.slots.current.active == back_slot, where


def check_device(seed: int, device: Device, releases: list[Release]) -> None:
    """The device ended where its releases lead, whatever happened on the way."""
    journal = device.installer.journal
    good = [r for r in releases if r.kind == "good"]
    bad = [r for r in releases if r.kind != "good"]
    where = f"device {seed}: {[r.kind for r in releases]}"
    assert journal.phase is Phase.IDLE, where
    assert journal.installed == good[-1].target, where
    assert journal.installed_counter == good[-1].target.release_counter, where
    assert set(journal.rejected) == {r.target.bundle_id for r in bad}, where
    # The slots, by the A/B rule: a good release goes into the slot not active and
    # keeps the old one as previous; a bad one leaves no previous to fall back to.
    active: str | None = None
    previous: str | None = None
    for r in releases:
        if r.kind == "good":
            active, previous = ("b" if active == "a" else "a"), active
        else:
            previous = None
    assert device.slots.current == SlotPointer(active=active, previous=previous), where
    assert active is not None and device.slots.held[active] == good[-1], where
    serving = device.installer.active
    assert serving is not None and serving.manifest.version == good[-1].target.version, where
    events = [e["event"] for e in device.store.log]
    assert events.count("committed") == len(good), where
    assert events.count("rolled-back") == sum(r.kind in ("watchdog", "crash-loop") for r in bad)
    remembered = [e for e in device.store.log if e["event"] == "refused" and e["remembered"]]
    assert len(remembered) == sum(r.kind in ("corrupt", "bad-model") for r in bad), where
    reasons = {e["reason"] for e in device.store.log if e["event"] == "rolled-back"}
    assert reasons <= {"watchdog", "crash-loop"}, where


@pytest.mark.asyncio
async def test_two_hundred_agents_in_one_process_each_end_where_their_events_lead() -> None:
    await asyncio.gather(*(run_device(seed) for seed in range(AGENTS)))
