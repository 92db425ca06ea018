"""The installer: carries out the journal's state machine with real files and models.

One install, step by step (each step journaled before the next begins):
ask the director (in a child process; a standalone device asks the image
repository for the newest release of its bundle), download and verify (child process),
stage into the inactive slot, self-test in this process, switch, watch the new
model's first requests, commit after the health period — or refuse, or roll
back, saying why. :meth:`Installer.recover` picks up whatever a crash left.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.ota.errors import SelfTestFailed, UpdateRefused
from agent.ota.faults import Faults
from agent.ota.journal import (
    InstallTarget,
    Journal,
    JournalError,
    JournalStore,
    Phase,
    recovery_action,
)
from agent.ota.selftest import self_test
from agent.ota.slots import SlotError, Slots
from agent.ota.watchdog import Watchdog
from model_runtime import LoadedModel, ModelLoadError, Runtime
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

# An install refused for something other than the bundle (bytes garbled on the way,
# storage failing) is retried after the poll interval, doubling per refusal, up to this.
MAX_RETRY_DELAY_S = 3600.0


@dataclass(frozen=True)
class SlotModel:
    """A model loaded from a slot, ready to serve."""

    slot: str
    manifest: Manifest
    model: LoadedModel


Publish = Callable[[SlotModel | None, SlotModel | None], None]
# Told every recorded event ({"at", "event", **details}) on the event loop, after the
# journal and the slots took their new state; it must not block.
EventListener = Callable[[dict[str, object]], None]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # PR_SET_PDEATHSIG: if the agent is killed, its fetcher dies with it.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Installer:
    """Installs what the director assigns (or, standalone, the newest release), safely.

    Serves models through ``publish``.
    """

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path,
        runtime: Runtime,
        publish: Publish,
        clock: Callable[[], float] = time.time,
        on_event: EventListener | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.runtime = runtime
        self.publish = publish
        self.clock = clock
        self.on_event = on_event
        self.faults = Faults(config.faults.hold_at)
        self.slots = Slots(config.data_dir / "slots")
        self.store = JournalStore(config.data_dir)
        self.journal = self.store.load()
        self.active: SlotModel | None = None
        self.previous: SlotModel | None = None
        self.watchdog: Watchdog | None = None
        self._lock = asyncio.Lock()
        # bundle id -> (refusals in a row, not before): installs refused for something
        # other than the bundle itself are retried with exponential backoff.
        self._backoff: dict[str, tuple[int, float]] = {}
        self._last_check: tuple[object, ...] | None = None  # what the last check reported

    # -- persistence -------------------------------------------------------

    def _save(self, journal: Journal, event: str, **fields: object) -> None:
        self.store.save(journal)
        self.journal = journal
        target = journal.target or (journal.last_outcome.target if journal.last_outcome else None)
        self._event(
            event,
            phase=str(journal.phase),
            bundle=f"{target.name} {target.version}" if target else None,
            **fields,
        )
        log.info("install: %s %s", event, fields or "")

    def _event(self, kind: str, **fields: object) -> None:
        at = self.clock()
        self.store.event(at, kind, **fields)
        if self.on_event is not None:
            try:
                self.on_event({"at": at, "event": kind, **fields})
            except Exception:  # a listener must never break an install
                log.exception("event listener failed on %s", kind)

    # -- serving models ------------------------------------------------------

    def _load_slot(self, slot: str | None) -> SlotModel | None:
        if slot is None:
            return None
        try:
            manifest = self.slots.manifest(slot)
            return SlotModel(
                slot, manifest, self.runtime.load(self.slots.path(slot) / manifest.model_file)
            )
        except (SlotError, ModelLoadError) as exc:
            log.error("slot %s cannot serve: %s", slot, exc)
            return None

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

    # -- recovery --------------------------------------------------------------

    async def recover(self) -> None:
        """Continue or undo the install a restart interrupted, then load the models."""
        action = recovery_action(self.journal, self.config.update.max_trial_boots)
        self.slots.discard_staging()
        if action == "roll_back":
            self.load_serving_models()
            self._roll_back(
                "crash-loop",
                f"the agent restarted {self.journal.trial_boots + 1} times during the "
                "health period",
            )
            return
        if action == "resume_trial":
            clean = self.journal.clean_shutdown
            journal = self.journal.rebooted_in_trial()
            self._save(journal, "restarted-in-trial", boots=journal.trial_boots, clean=clean)
            self.load_serving_models()
            self.watchdog = self._new_watchdog()
            return
        self.load_serving_models()
        if action == "restage":
            # A slot write may be torn: start it over from the verified bundle.
            self._save(self.journal.model_copy(update={"phase": Phase.VERIFIED}), "restaging")
            await self._stage_and_switch()
        elif action == "self_test":
            await self._test_and_switch()
        # "resume_download" continues on the next poll, from the partial file.

    # -- one poll --------------------------------------------------------------

    async def poll(self) -> str:
        """Ask the director and install what it assigns; returns what happened."""
        async with self._lock:
            if self.journal.phase is Phase.TRIAL:
                return "trial in progress"
            if self.journal.phase is Phase.IDLE:
                answer = await self._worker("check")
                if answer["status"] != "assigned":
                    return self._report_unassigned(answer)
                self._last_check = None
                target = InstallTarget.model_validate(_target_fields(answer["target"]))
                if self.journal.installed and self.journal.installed.same_bundle(target):
                    return "up to date"
                if self.journal.rejection(target) is not None:
                    return f"not retrying {target.name} {target.version}: rejected before"
                _, not_before = self._backoff.get(target.bundle_id, (0, 0.0))
                if self.clock() < not_before:
                    wait = not_before - self.clock()
                    return f"retrying {target.name} {target.version} in {wait:.0f} s"
                self._save(self.journal.start_download(target), "download-started")
            if self.journal.phase is Phase.DOWNLOADING:
                stopped = await self._download()
                if stopped is not None:
                    return stopped
                self.faults.hold("verified")
            if self.journal.phase is Phase.VERIFIED:
                await self._stage_and_switch()
            return str(self.journal.last_outcome.result if self.journal.last_outcome else "idle")

    async def _download(self) -> str | None:
        """Download the journal's bundle; ``None`` once it is verified, else what happened.

        The fetcher asks the director again first. What it refuses there is the
        director's answer, not the bundle being downloaded: the download is
        given up and reported, and the bundle stays eligible. Only a refusal that
        condemns the bundle itself (its signed bytes are unusable) remembers it.
        """
        target = self.journal.target
        assert target is not None
        answer = await self._worker("download", expect=target.bundle_id)
        status = answer["status"]
        if status == "unavailable":
            self._event("download-paused", message=answer["message"])
            return f"download paused: {answer['message']}"
        if status == "refused" and answer.get("about") == "download":
            condemned = bool(answer.get("condemns_bundle"))
            self._refuse(answer["reason"], answer["message"], condemned=condemned)
            return f"refused: {answer['message']}"
        if status == "refused":
            self._give_up("assignment-refused", reason=answer["reason"], message=answer["message"])
            return f"assignment refused: {answer['message']}"
        if status != "downloaded" or not target.same_bundle(
            InstallTarget.model_validate(_target_fields(answer["target"]))
        ):
            self._give_up("assignment-changed")
            return "the assignment changed; starting over on the next poll"
        self._backoff.pop(target.bundle_id, None)
        self._save(self.journal.verified(), "verified")
        return None

    def _give_up(self, event: str, **fields: object) -> None:
        """Abandon the download without an outcome: nothing is known against its bundle."""
        target = self.journal.target
        assert target is not None
        journal = self.journal.abandoned()
        self.store.save(journal)
        self.journal = journal
        # Named "abandoned", not "bundle": the event is not about that bundle's merits.
        self._event(
            event,
            phase=str(journal.phase),
            abandoned=f"{target.name} {target.version}",
            abandoned_id=target.bundle_id,
            **fields,
        )
        log.info("install: %s, gave up %s %s %s", event, target.name, target.version, fields)

    def _report_unassigned(self, answer: dict[str, Any]) -> str:
        report = (answer["status"], answer.get("reason"), answer.get("message"))
        repeated, self._last_check = report == self._last_check, report
        if answer["status"] == "none":
            return "nothing assigned"
        if not repeated:  # the same refusal on every poll is recorded (and sent) once
            self._event(
                f"check-{answer['status']}",
                reason=answer.get("reason"),
                message=answer.get("message"),
            )
        return f"{answer['status']}: {answer.get('message')}"

    async def _worker(self, command: str, expect: str | None = None) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.ota.fetch_worker",
            command,
            "--config",
            str(self.config_path),
            "--installed-counter",
            str(self.journal.installed_counter),
            *(["--expect", expect] if expect else []),
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        out, _ = await process.communicate()
        try:
            answer: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {
                "status": "unavailable",
                "reason": "fetcher-failed",
                "message": f"the update fetcher exited with status {process.returncode}",
            }
        return answer

    def _bundle_path(self, journal: Journal | None = None) -> Path:
        """Where the fetcher put the bundle of ``journal``'s install (default: the current)."""
        target = (journal or self.journal).target
        assert target is not None
        return self.config.data_dir / "downloads" / target.path.rpartition("/")[2]

    # -- staging, self-test, switch ------------------------------------------------

    async def _stage_and_switch(self) -> None:
        slot = self.slots.inactive()
        if self.previous is not None and self.previous.slot == slot:
            self.previous = None
            self.publish(self.active, None)
        self._save(self.journal.start_staging(slot), "staging", slot=slot)
        try:
            await asyncio.to_thread(
                self.slots.stage,
                slot,
                self._bundle_path(),
                lambda: self.faults.hold("staging"),
            )
        except SlotError as exc:
            self._refuse("invalid-bundle", f"cannot stage the bundle: {exc}")
            return
        except OSError as exc:
            # The device's storage failed, not the bundle: report it, keep the bundle eligible.
            self._refuse("staging-failed", f"cannot stage the bundle: {exc}", condemned=False)
            return
        self._save(self.journal.staged(), "staged", slot=slot)
        self.faults.hold("staged")
        await self._test_and_switch()

    async def _test_and_switch(self) -> None:
        slot = self.journal.slot
        assert slot is not None
        try:
            manifest = self.slots.manifest(slot)
            model, report = await asyncio.to_thread(
                self_test, self.runtime, self.slots.path(slot), manifest
            )
        except (SelfTestFailed, SlotError) as exc:
            if isinstance(exc, UpdateRefused):
                self._refuse(exc.reason, exc.detail)
            else:
                self._refuse("invalid-bundle", str(exc))
            return
        self._event(
            "self-test-passed",
            latency_p95_ms=report.latency_p95_ms,
            memory_mb=round(report.memory_mb, 1),
        )
        if self.slots.pointer().active != slot:  # a crash may have come right after the switch
            self.slots.switch(slot)
        new = SlotModel(slot, manifest, model)
        old = self.active if self.active is not None and self.active.slot != slot else None
        self.active, self.previous = new, old
        self.publish(new, old)
        self.watchdog = self._new_watchdog()
        self._save(self.journal.switched(self.clock()), "switched", slot=slot)
        self.faults.hold("trial")

    def _new_watchdog(self) -> Watchdog:
        w = self.config.update.watchdog
        return Watchdog(
            window=w.window,
            max_failures=w.max_failures,
            max_failure_rate=w.max_failure_rate,
            min_requests=w.min_requests,
        )

    # -- trial: watchdog and health period -----------------------------------------

    def observe(self, stage: str, model_version: str | None, ok: bool, reason: str | None) -> None:
        """The serving chain's report of one stage attempt (the watchdog's input)."""
        if self.journal.phase is not Phase.TRIAL or self.watchdog is None or stage != "active":
            return
        if self.active is None or model_version != self.active.manifest.version:
            return
        verdict = self.watchdog.observe(ok, reason)
        if verdict is not None:
            self._roll_back("watchdog", verdict)

    @property
    def in_trial(self) -> bool:
        return self.journal.phase is Phase.TRIAL

    def shutting_down_cleanly(self) -> None:
        """Record that this stop is deliberate, so the next start is not counted as a crash."""
        if self.journal.phase is Phase.TRIAL:
            self.store.save(self.journal.model_copy(update={"clean_shutdown": True}))

    def tick(self) -> None:
        """Commit the trial once its health period has passed without a rollback."""
        journal = self.journal
        if journal.phase is not Phase.TRIAL or journal.trial_started_at is None:
            return
        if self.clock() - journal.trial_started_at >= self.config.update.health_period_s:
            self._save(journal.committed(self.clock()), "committed")
            self.watchdog = None
            self._bundle_path(journal).unlink(missing_ok=True)

    def _roll_back(self, reason: str, message: str) -> None:
        try:
            self.slots.roll_back()
        except SlotError as exc:
            log.error("cannot roll back: %s", exc)
            return
        self.active, self.previous = self.previous, None
        if self.active is None:
            self.active = self._load_slot(self.slots.pointer().active)
        self.publish(self.active, None)
        self.watchdog = None
        bundle = self._bundle_path()
        self._save(
            self.journal.rolled_back(reason, message, self.clock()),
            "rolled-back",
            reason=reason,
            message=message,
        )
        bundle.unlink(missing_ok=True)

    def _refuse(self, reason: str, message: str, *, condemned: bool = True) -> None:
        """End the install as refused.

        ``condemned``: the bundle itself is bad and is never retried. Otherwise it
        is tried again after a backoff (the poll interval, doubling per refusal in
        a row, at most ``MAX_RETRY_DELAY_S``).
        """
        target = self.journal.target
        try:
            journal = self.journal.refused(reason, message, self.clock(), condemned=condemned)
        except JournalError:
            return
        if not condemned and target is not None:
            tries, _ = self._backoff.get(target.bundle_id, (0, 0.0))
            delay = min(self.config.update.poll_interval_s * 2**tries, MAX_RETRY_DELAY_S)
            self._backoff[target.bundle_id] = (tries + 1, self.clock() + delay)
        bundle = self._bundle_path()
        self._save(journal, "refused", reason=reason, message=message, remembered=condemned)
        bundle.unlink(missing_ok=True)


def _target_fields(target: dict[str, Any]) -> dict[str, Any]:
    """The fetcher's bundle target, cut to what the journal keeps."""
    return {k: target[k] for k in InstallTarget.model_fields}
