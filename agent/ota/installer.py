"""The installer: carries out the install step function's effects with its parts.

One install, step by step (each step journaled before the next begins):
ask the director (through the fetcher; a standalone device asks the image
repository for the newest release of its bundle), download and verify, stage
into the inactive slot, self-test, switch, watch the new model's first
requests, commit after the health period — or refuse, or roll back, saying
why. A fleet rollback switches back to the other slot without a download,
once its files check out against their manifest and its model passes the
self-test again. Which step follows which is :func:`agent.ota.steps.decide`; this module
only does the I/O it asks for and feeds back what happened. :meth:`Installer.recover`
picks up whatever a crash left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.config import AgentConfig, UpdateConfig
from agent.ota import step_events as ev
from agent.ota.errors import SelfTestFailed, UpdateRefused
from agent.ota.faults import Faults
from agent.ota.journal import InstallTarget, Journal, Phase
from agent.ota.journal_store import JournalStore
from agent.ota.parts import (
    FaultPoints,
    Fetcher,
    JournalKeeper,
    ProcessFetcher,
    RuntimeSlotModels,
    SlotModel,
    SlotModels,
    SlotStore,
)
from agent.ota.poll_gate import PollGate
from agent.ota.slots import SlotError, Slots
from agent.ota.steps import InstallerState, Policy, decide
from agent.ota.watchdog import Watchdog
from model_runtime import ModelLoadError, Runtime

log = logging.getLogger(__name__)

Publish = Callable[[SlotModel | None, SlotModel | None], None]
# Told every recorded event ({"at", "event", **details}) on the event loop, after the
# journal and the slots took their new state; it must not block.
EventListener = Callable[[dict[str, object]], None]

# Effects that wait on I/O; each is the last of its step and its outcome the next event.
_AWAITED = (ev.Check, ev.Download, ev.WriteSlot, ev.SelfTest, ev.ReturnToSlot)


class Installer:
    """Installs what the director assigns (or, standalone, the newest release), safely.

    Serves models through ``publish``. Its parts are passed in; a device builds
    the real ones with :meth:`from_config`.
    """

    def __init__(
        self,
        *,
        slots: SlotStore,
        models: SlotModels,
        store: JournalKeeper,
        fetcher: Fetcher,
        update: UpdateConfig,
        publish: Publish,
        clock: Callable[[], float] = time.time,
        faults: FaultPoints | None = None,
        on_event: EventListener | None = None,
    ) -> None:
        self.slots = slots
        self.models = models
        self.store = store
        self.fetcher = fetcher
        self.policy = Policy(update.poll_interval_s, update.health_period_s, update.max_trial_boots)
        self.watchdog_config = update.watchdog
        self.publish = publish
        self.clock = clock
        self.faults: FaultPoints = faults or Faults()
        self.on_event = on_event
        self.state = InstallerState(store.load())
        self.active: SlotModel | None = None
        self.previous: SlotModel | None = None
        self.watchdog: Watchdog | None = None
        self._tested: SlotModel | None = None  # the model the last self-test loaded
        self._said: str | None = None  # what the step under way says happened
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(
        cls,
        config: AgentConfig,
        config_path: Path,
        runtime: Runtime,
        publish: Publish,
        clock: Callable[[], float] = time.time,
        on_event: EventListener | None = None,
        fetcher: Fetcher | None = None,
    ) -> Installer:
        """The installer of a device: its slots, journal and fetcher under ``config.data_dir``.

        ``fetcher`` by default: the child process behind the poll gate
        (:class:`~agent.ota.poll_gate.PollGate`).
        """
        slots = Slots(config.data_dir / "slots")
        return cls(
            slots=slots,
            models=RuntimeSlotModels(slots, runtime),
            store=JournalStore(config.data_dir),
            fetcher=fetcher or PollGate(ProcessFetcher(config_path), config),
            update=config.update,
            publish=publish,
            clock=clock,
            faults=Faults(config.faults.hold_at),
            on_event=on_event,
        )

    @property
    def journal(self) -> Journal:
        """The journal as last saved."""
        return self.state.journal

    @property
    def in_trial(self) -> bool:
        return self.journal.phase is Phase.TRIAL

    # -- what the agent calls --------------------------------------------------------

    async def recover(self) -> None:
        """Continue or undo the install a restart interrupted, then load the models."""
        await self._handle(ev.Started())

    async def poll(self) -> str:
        """Ask the director and install what it assigns; returns what happened."""
        async with self._lock:
            said = await self._handle(ev.Poll())
        if said is not None:
            return said
        outcome = self.journal.last_outcome
        return str(outcome.result if outcome else "idle")

    def tick(self) -> None:
        """Commit the trial once its health period has passed without a rollback."""
        self._handle_now(ev.Tick())

    def shutting_down_cleanly(self) -> None:
        """Record that this stop is deliberate, so the next start is not counted as a crash."""
        self._handle_now(ev.Stopping())

    def observe(self, stage: str, model_version: str | None, ok: bool, reason: str | None) -> None:
        """The serving chain's report of one stage attempt (the watchdog's input)."""
        if self.journal.phase is not Phase.TRIAL or self.watchdog is None or stage != "active":
            return
        if self.active is None or model_version != self.active.manifest.version:
            return
        verdict = self.watchdog.observe(ok, reason)
        if verdict is not None:
            self._handle_now(ev.WatchdogTripped(verdict))

    def record_event(self, kind: str, details: dict[str, object]) -> None:
        """Record an event that is no step of an install (the shadow's, the hybrid plan's)
        like the installer's."""
        self._event(kind, **details)
        log.info("event: %s %s", kind, details)

    def load_serving_models(self) -> None:
        """Load the active and previous slots and hand them to the server."""
        pointer = self.slots.pointer()
        self.active = self._load_slot(pointer.active)
        self.previous = self._load_slot(pointer.previous)
        if self.active is None and self.previous is not None:
            # Never serve nothing while a working model is on disk.
            self.slots.roll_back()
            self.active, self.previous = self.previous, None
        self.publish(self.active, self.previous)

    # -- the step loop -----------------------------------------------------------------

    async def _handle(self, event: ev.Event | None) -> str | None:
        """Decide on ``event``, carry out the effects in order, then what they lead to.

        Returns what a poll says happened, when a step said it.
        """
        self._said = None
        while event is not None:
            effects = self._decide(event)
            event = None
            for effect in effects:
                assert event is None, "only the last effect of a step leads to an event"
                if isinstance(effect, _AWAITED):
                    event = await self._awaited(effect)
                else:
                    event = self._do(effect)
        return self._said

    def _handle_now(self, event: ev.Event | None) -> None:
        """:meth:`_handle` for events whose effects never wait (the clock, the watchdog)."""
        while event is not None:
            effects = self._decide(event)
            event = None
            for effect in effects:
                assert event is None and not isinstance(effect, _AWAITED), effect
                event = self._do(effect)

    def _decide(self, event: ev.Event) -> list[ev.Effect]:
        # The journal part of the state moves on only as each journal is saved.
        after, effects = decide(self.state, event, self.clock(), self.policy)
        self.state = replace(self.state, retries=after.retries, last_check=after.last_check)
        return effects

    def _do(self, effect: ev.Effect) -> ev.Event | None:
        match effect:
            case ev.SaveJournal():
                self._save(effect)
            case ev.Report():
                self._event(effect.event, **effect.details)
            case ev.PollResult():
                self._said = effect.text
            case ev.Hold():
                self.faults.hold(effect.step)
            case ev.ChooseSlot():
                return ev.SlotChosen(self.slots.inactive())
            case ev.Switch():
                self._switch(effect.slot)
            case ev.WatchTrial():
                w = self.watchdog_config
                self.watchdog = Watchdog(
                    window=w.window,
                    max_failures=w.max_failures,
                    max_failure_rate=w.max_failure_rate,
                    min_requests=w.min_requests,
                )
            case ev.EndTrial():
                self.watchdog = None
            case ev.RollBack():
                return self._roll_back(effect)
            case ev.DeleteBundle():
                Path(effect.path).unlink(missing_ok=True)
            case ev.DiscardStaging():
                self.slots.discard_staging()
            case ev.LoadModels():
                self.load_serving_models()
            case _:  # pragma: no cover - a new effect without its I/O
                raise AssertionError(f"no I/O for {effect}")
        return None

    async def _awaited(self, effect: ev.Effect) -> ev.Event:
        counter = self.journal.installed_counter
        match effect:
            case ev.Check():
                return await self.fetcher.check(counter)
            case ev.Download():
                return await self.fetcher.download(counter, effect.expect)
            case ev.WriteSlot():
                return await self._write_slot(effect.slot, Path(effect.bundle_file))
            case ev.SelfTest():
                return await self._self_test(effect.slot)
            case ev.ReturnToSlot():
                return await self._return_to(effect.slot, effect.expect)
        raise AssertionError(f"{effect} is not awaited")  # pragma: no cover

    # -- persistence ---------------------------------------------------------------------

    def _save(self, effect: ev.SaveJournal) -> None:
        journal = effect.journal
        self.store.save(journal)
        self.state = replace(self.state, journal=journal)
        if effect.event is None:
            return
        if effect.abandoned:  # the event is not about the abandoned bundle's merits
            self._event(effect.event, phase=str(journal.phase), **effect.details)
        else:
            target = journal.target or (
                journal.last_outcome.target if journal.last_outcome else None
            )
            bundle = f"{target.name} {target.version}" if target else None
            self._event(effect.event, phase=str(journal.phase), bundle=bundle, **effect.details)
        log.info("install: %s %s", effect.event, dict(effect.details) or "")

    def _event(self, kind: str, **fields: object) -> None:
        at = self.clock()
        self.store.event(at, kind, **fields)
        if self.on_event is not None:
            try:
                self.on_event({"at": at, "event": kind, **fields})
            except Exception:  # a listener must never break an install
                log.exception("event listener failed on %s", kind)

    # -- slots and models ----------------------------------------------------------------

    def _load_slot(self, slot: str | None) -> SlotModel | None:
        if slot is None:
            return None
        try:
            return self.models.load(slot)
        except (SlotError, ModelLoadError) as exc:
            log.error("slot %s cannot serve: %s", slot, exc)
            return None

    async def _write_slot(self, slot: str, bundle: Path) -> ev.Event:
        if self.previous is not None and self.previous.slot == slot:
            # The fallback model's slot is about to be overwritten: stop serving it.
            self.previous = None
            self.publish(self.active, None)
        try:
            await asyncio.to_thread(
                self.slots.stage, slot, bundle, lambda: self.faults.hold("staging")
            )
        except SlotError as exc:
            return ev.StagingFailed("invalid-bundle", f"cannot stage the bundle: {exc}", True)
        except OSError as exc:
            # The device's storage failed, not the bundle: report it, keep the bundle eligible.
            return ev.StagingFailed("staging-failed", f"cannot stage the bundle: {exc}", False)
        return ev.SlotWritten()

    async def _self_test(self, slot: str) -> ev.Event:
        try:
            self._tested, report = await asyncio.to_thread(self.models.self_test, slot)
        except (SelfTestFailed, SlotError) as exc:
            if isinstance(exc, UpdateRefused):
                return ev.SelfTestRefused(exc.reason, exc.detail)
            return ev.SelfTestRefused("invalid-bundle", str(exc))
        return ev.SelfTestPassed(report.latency_p95_ms, report.memory_mb)

    async def _return_to(self, slot: str, expect: InstallTarget) -> ev.Event:
        """Serve ``slot`` again if it still holds ``expect`` whole and its model passes."""
        try:
            manifest = await asyncio.to_thread(self.slots.verify, slot)
            signed = (expect.name, expect.version, expect.release_counter)
            held = (manifest.name, manifest.version, manifest.release_counter)
            if held != signed:
                raise SlotError(f"slot {slot} holds {held}, not the previous bundle {signed}")
            model, _ = await asyncio.to_thread(self.models.self_test, slot)
        except (SelfTestFailed, SlotError, OSError) as exc:
            what = f"{expect.name} {expect.version} ({expect.bundle_id})"
            return ev.ReturnRefused("invalid-bundle", f"cannot roll back to {what}: {exc}")
        self.slots.return_to(slot)
        self.active, self.previous = model, None
        self.publish(model, None)
        self.watchdog = None
        return ev.ReturnedToSlot()

    def _switch(self, slot: str) -> None:
        new, self._tested = self._tested, None
        assert new is not None and new.slot == slot
        if self.slots.pointer().active != slot:  # a crash may have come right after the switch
            self.slots.switch(slot)
        old = self.active if self.active is not None and self.active.slot != slot else None
        self.active, self.previous = new, old
        self.publish(new, old)

    def _roll_back(self, effect: ev.RollBack) -> ev.Event | None:
        try:
            self.slots.roll_back()
        except SlotError as exc:
            log.error("cannot roll back: %s", exc)
            return None
        self.active, self.previous = self.previous, None
        if self.active is None:
            self.active = self._load_slot(self.slots.pointer().active)
        self.publish(self.active, None)
        self.watchdog = None
        return ev.SlotsRolledBack(effect.reason, effect.message)
