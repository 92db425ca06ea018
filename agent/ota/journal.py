"""The install journal: a persisted state machine, one fsynced step at a time.

Phases of one install, in order::

    idle -> downloading -> verified -> staging -> staged -> trial -> idle (committed)

and from any of them back to ``idle`` as *refused* (the bundle never became
active) or *rolled back* (it was active, and the previous model is again).
The rules:

- every transition is written (atomically, fsynced) before the work of the
  next phase starts, so after a crash the journal says what may be half done;
- a bundle that itself proved bad (its signed bytes are unusable, its model
  failed the self-test, or it was rolled back) is remembered by its identity
  (:func:`bundle_id`) and never retried automatically (a bad model must not
  install in a loop); a refusal of an *answer* (forged director metadata,
  garbled bytes on the wire) is reported but not remembered, so it can never
  block the genuine bundle;
- the installed release counter only grows, and only on commit;
- one step back, and only one: the bundle committed before the installed one
  is remembered while the other A/B slot still holds it (:attr:`Journal.previous`).
  A director may name exactly that bundle below the counter, marked as a
  rollback of the installed one (:meth:`Journal.rollback_refusal`); the device
  then switches back to that slot without downloading anything
  (:meth:`Journal.went_back`), remembers the bundle it left as never to retry,
  and keeps its counter: the floor for any other bundle stays the highest
  counter it ever committed. After that step the other slot holds the newer
  bundle, so nothing older can follow: a compromised director can undo one
  step, never install an arbitrary old release.

:class:`Journal` is pure data and pure transitions (no I/O, no clock: callers
pass ``now``); :class:`~agent.ota.journal_store.JournalStore` persists it.
Recovery after a restart is :func:`recovery_action`, a pure decision; the
installer's step function (:mod:`agent.ota.steps`) drives these transitions.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from agent.ota.errors import answer_refusal_codes
from agent.ota.identity import bundle_id, same_hashes
from agent.ota.slots import SLOT_NAMES

_BARE_SHA256 = re.compile(r"[0-9a-f]{64}")


class Phase(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGING = "staging"
    STAGED = "staged"
    TRIAL = "trial"


class JournalError(Exception):
    """A transition the state machine does not allow (a bug, or a corrupt journal)."""


class InstallTarget(BaseModel):
    """The bundle an install is about, as the signed metadata described it."""

    model_config = ConfigDict(frozen=True)

    path: str
    name: str
    version: str
    release_counter: int
    hashes: dict[str, str]
    length: int

    @model_validator(mode="before")
    @classmethod
    def _from_sha256(cls, data: Any) -> Any:
        # Journals written before targets kept every signed hash had only "sha256".
        if isinstance(data, dict) and "hashes" not in data and "sha256" in data:
            data = {k: v for k, v in data.items() if k != "sha256"} | {
                "hashes": {"sha256": data["sha256"]}
            }
        return data

    @property
    def bundle_id(self) -> str:
        """This bundle's identity (:func:`bundle_id`)."""
        return bundle_id(self.hashes)

    @property
    def sha256(self) -> str | None:
        """The signed sha256, when the repository signed one."""
        return self.hashes.get("sha256")

    def same_bundle(self, other: InstallTarget) -> bool:
        return same_hashes(self.hashes, other.hashes)

    def matching_ids(self) -> set[str]:
        """Every ``ALGORITHM:HEX`` that names this bundle (one per signed hash)."""
        return {f"{a}:{h}" for a, h in self.hashes.items()}


class Outcome(BaseModel):
    """How the last install ended."""

    model_config = ConfigDict(frozen=True)

    result: Literal["committed", "refused", "rolled_back"]
    target: InstallTarget
    reason: str | None = None
    message: str | None = None
    at: float


class HeldBundle(BaseModel):
    """A bundle committed before, still whole in the A/B slot that is not active."""

    model_config = ConfigDict(frozen=True)

    slot: str
    target: InstallTarget


# The reason codes of a fleet rollback refused by the journal's rule.
DOWNGRADE = "release-counter-downgrade"
ROLLBACK_REFUSED = "rollback-refused"
# The reason recorded for a bundle the fleet rolled back (never retried).
FLEET_ROLLBACK = "fleet-rollback"


def other_slot(slot: str) -> str:
    """The A/B slot that is not ``slot``."""
    return next(s for s in SLOT_NAMES if s != slot)


_NEXT: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.DOWNLOADING},
    Phase.DOWNLOADING: {Phase.VERIFIED},
    Phase.VERIFIED: {Phase.STAGING},
    Phase.STAGING: {Phase.STAGED},
    Phase.STAGED: {Phase.TRIAL},
    Phase.TRIAL: set(),
}


class Journal(BaseModel):
    """The persisted state of the installer."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    phase: Phase = Phase.IDLE
    target: InstallTarget | None = None
    slot: str | None = None  # the slot being staged, or the new active slot in trial
    # The verified bundle file, as the fetcher named it; deleted once the install ends.
    bundle_file: str | None = None
    trial_started_at: float | None = None
    trial_boots: int = 0
    clean_shutdown: bool = False  # the agent was stopped on purpose during the trial
    installed: InstallTarget | None = None
    installed_counter: int = 0
    # The bundle committed before ``installed``, while the other slot still holds it:
    # the one bundle a fleet rollback may return to (below the counter).
    previous: HeldBundle | None = None
    # A fleet rollback to ``previous`` is under way: its slot may be switched to or not yet.
    returning: bool = False
    # Bundles never to retry, by identity (bundle_id), with the reason they proved bad.
    rejected: dict[str, str] = {}
    last_outcome: Outcome | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_without_bundle_file(cls, data: Any) -> Any:
        # Journals written before the fetcher's path was kept: a verified bundle not yet
        # staged is fetched again (resumed), which names its file.
        if (
            isinstance(data, dict)
            and data.get("phase") in (Phase.VERIFIED, Phase.STAGING)
            and data.get("bundle_file") is None
        ):
            return {**data, "phase": Phase.DOWNLOADING, "slot": None}
        return data

    @field_validator("rejected", mode="before")
    @classmethod
    def _legacy_rejected_keys(cls, value: Any) -> Any:
        # Older journals keyed rejected bundles by their bare sha256, and remembered every
        # refusal, also those about a forged or garbled answer; only the entries that
        # condemn the bundle itself are kept, so a genuine bundle installs again.
        if not isinstance(value, dict):
            return value
        kept: dict[Any, Any] = {}
        answers = answer_refusal_codes()
        for key, why in value.items():
            if isinstance(key, str) and _BARE_SHA256.fullmatch(key):
                if isinstance(why, str) and why.partition(":")[0] in answers:
                    continue
                key = f"sha256:{key}"
            kept[key] = why
        return kept

    def rejection(self, target: InstallTarget) -> str | None:
        """Why ``target`` was rejected before, or ``None`` if it never was.

        Any of its signed hashes matches, so a bundle stays rejected whichever
        of its hashes was the strongest when it was remembered.
        """
        for key in sorted(target.matching_ids()):
            if key in self.rejected:
                return self.rejected[key]
        return None

    # -- transitions -------------------------------------------------------

    def _to(self, phase: Phase, **changes: object) -> Journal:
        if phase not in _NEXT[self.phase]:
            raise JournalError(f"cannot go from {self.phase} to {phase}")
        return self.model_copy(update={"phase": phase, **changes})

    def start_download(self, target: InstallTarget) -> Journal:
        why = self.rejection(target)
        if why is not None:
            raise JournalError(f"{target.path} was rejected before: {why}")
        return self._to(Phase.DOWNLOADING, target=target, slot=None, bundle_file=None)

    def verified(self, bundle_file: str | None = None) -> Journal:
        """The bundle is downloaded and verified, in ``bundle_file``."""
        return self._to(Phase.VERIFIED, bundle_file=bundle_file)

    def start_staging(self, slot: str) -> Journal:
        # The slot about to be written no longer holds the bundle committed before.
        previous = None if self.previous is None or self.previous.slot == slot else self.previous
        return self._to(Phase.STAGING, slot=slot, previous=previous)

    def staged(self) -> Journal:
        return self._to(Phase.STAGED)

    def switched(self, now: float) -> Journal:
        """The new slot is active; its health period starts."""
        return self._to(Phase.TRIAL, trial_started_at=now, trial_boots=0)

    def rebooted_in_trial(self) -> Journal:
        """A restart during the trial; counted unless the agent was stopped on purpose."""
        if self.phase is not Phase.TRIAL:
            raise JournalError("only a trial counts restarts")
        boots = self.trial_boots if self.clean_shutdown else self.trial_boots + 1
        return self.model_copy(update={"trial_boots": boots, "clean_shutdown": False})

    def committed(self, now: float) -> Journal:
        if self.phase is not Phase.TRIAL or self.target is None:
            raise JournalError(f"cannot commit from {self.phase}")
        previous = None
        if self.installed is not None and self.slot is not None:
            # The install went into the slot that was not active: the other still
            # holds the bundle committed until now.
            previous = HeldBundle(slot=other_slot(self.slot), target=self.installed)
        return self._idle(
            Outcome(result="committed", target=self.target, at=now),
            installed=self.target,
            installed_counter=max(self.installed_counter, self.target.release_counter),
            previous=previous,
        )

    def rollback_refusal(self, target: InstallTarget, rollback_of: str) -> tuple[str, str] | None:
        """Why a fleet rollback to ``target``, replacing ``rollback_of``, is refused; or ``None``.

        Accepted only when ``target`` is exactly the bundle committed before the
        installed one and still held whole by the other slot, and ``rollback_of``
        names the installed bundle (``ALGORITHM:HEX``), with no install under way.
        A refusal of a target below the installed counter is a
        release-counter downgrade, as for any other lower bundle.
        """
        name = f"{target.name} {target.version} ({target.bundle_id})"
        reason = DOWNGRADE if target.release_counter < self.installed_counter else ROLLBACK_REFUSED
        if self.phase is not Phase.IDLE:
            return reason, f"a rollback to {name} cannot start while an install is {self.phase}"
        held = self.previous
        if held is None or not held.target.same_bundle(target):
            holds = (
                f"{held.target.name} {held.target.version}"
                if held is not None
                else "no bundle committed before"
            )
            return reason, (
                f"a rollback to {name} (release counter {target.release_counter}, installed "
                f"counter {self.installed_counter}): the other slot holds {holds}; a rollback "
                "may only return to the bundle committed right before the installed one"
            )
        if self.installed is None or rollback_of not in self.installed.matching_ids():
            runs = self.installed.bundle_id if self.installed is not None else "nothing"
            return ROLLBACK_REFUSED, (
                f"a rollback to {name} replaces {rollback_of}, but the installed bundle is {runs}"
            )
        return None

    def start_return(self) -> Journal:
        """A fleet rollback to :attr:`previous` starts (written before its slot is switched to)."""
        if self.phase is not Phase.IDLE or self.previous is None or self.installed is None:
            raise JournalError(f"no fleet rollback from {self.phase} without a previous bundle")
        return self.model_copy(update={"returning": True})

    def went_back(self, now: float) -> Journal:
        """The fleet rolled back: the previous bundle is installed again, the left one rejected.

        The installed counter stays where it was (the highest ever committed), and
        no step back remains: the other slot now holds the bundle just left.
        """
        left, held = self.installed, self.previous
        if self.phase is not Phase.IDLE or left is None or held is None:
            raise JournalError(f"no fleet rollback from {self.phase} without a previous bundle")
        message = (
            f"the fleet rolled back from {left.name} {left.version} to "
            f"{held.target.name} {held.target.version}"
        )
        return self._idle(
            Outcome(
                result="rolled_back", target=left, reason=FLEET_ROLLBACK, message=message, at=now
            ),
            installed=held.target,
            previous=None,
            rejected={**self.rejected, left.bundle_id: f"{FLEET_ROLLBACK}: {message}"},
        )

    def forget_previous(self) -> Journal:
        """The other slot no longer holds the previous bundle whole: no step back remains."""
        return self.model_copy(update={"previous": None, "returning": False})

    def refused(self, reason: str, message: str, now: float, *, condemned: bool = True) -> Journal:
        """The bundle never became active.

        ``condemned``: the bundle itself proved bad, so it is remembered and never
        retried. Otherwise (bytes garbled on the way, no space to stage it) the
        refusal is reported and the bundle may be tried again.
        """
        if self.target is None or self.phase in (Phase.IDLE, Phase.TRIAL):
            raise JournalError(f"nothing to refuse in {self.phase}")
        outcome = Outcome(
            result="refused", target=self.target, reason=reason, message=message, at=now
        )
        if not condemned:
            return self._idle(outcome)
        return self._idle(
            outcome, rejected={**self.rejected, self.target.bundle_id: f"{reason}: {message}"}
        )

    def rolled_back(self, reason: str, message: str, now: float) -> Journal:
        """The previous slot is active again; the bundle is remembered as bad."""
        if self.phase is not Phase.TRIAL or self.target is None:
            raise JournalError(f"cannot roll back from {self.phase}")
        outcome = Outcome(
            result="rolled_back", target=self.target, reason=reason, message=message, at=now
        )
        return self._idle(
            outcome, rejected={**self.rejected, self.target.bundle_id: f"{reason}: {message}"}
        )

    def abandoned(self) -> Journal:
        """Give up an install that was not refused (e.g. the director changed its mind)."""
        if self.phase in (Phase.TRIAL, Phase.STAGED):
            raise JournalError(f"cannot abandon an install in {self.phase}")
        return self.model_copy(
            update={"phase": Phase.IDLE, "target": None, "slot": None, "bundle_file": None}
        )

    def _idle(self, outcome: Outcome, **changes: object) -> Journal:
        return self.model_copy(
            update={
                "phase": Phase.IDLE,
                "target": None,
                "slot": None,
                "bundle_file": None,
                "trial_started_at": None,
                "trial_boots": 0,
                "clean_shutdown": False,
                "returning": False,
                "last_outcome": outcome,
                **changes,
            }
        )


RecoveryAction = Literal[
    "none", "resume_download", "restage", "self_test", "resume_trial", "roll_back", "return"
]


def recovery_action(journal: Journal, max_trial_boots: int) -> RecoveryAction:
    """What to do with an install a restart interrupted.

    Downloads resume (the partial file is kept). A slot write may be half done,
    so staging starts over from the verified bundle. A staged slot is tested
    again before it is switched in. A restart during the trial counts: too many
    means the new model crashes the device, so it is rolled back. A fleet
    rollback under way is carried out again (checking and switching to the
    previous slot is idempotent).
    """
    match journal.phase:
        case Phase.IDLE if journal.returning:
            return "return"
        case Phase.IDLE:
            return "none"
        case Phase.DOWNLOADING | Phase.VERIFIED:
            return "resume_download"
        case Phase.STAGING:
            return "restage"
        case Phase.STAGED:
            return "self_test"
        case Phase.TRIAL if journal.clean_shutdown:
            return "resume_trial"
        case Phase.TRIAL:
            # This restart counts: the device rolls back on its max_trial_boots-th.
            restarts = journal.trial_boots + 1
            return "roll_back" if restarts >= max_trial_boots else "resume_trial"
