"""The named events the install step function takes, and the effects it returns.

Events say what happened (a poll is due, the fetcher answered, a slot was
written); effects say what the installer is to do next, in order. Both are
plain frozen data: :func:`agent.ota.steps.decide` maps one to the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.ota.answers import FetchAnswer
from agent.ota.journal import InstallTarget, Journal

# -- events: what happened -------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The agent started: continue or undo what a restart interrupted."""


@dataclass(frozen=True)
class Poll:
    """Time to ask for an update (or to go on with the one under way)."""


@dataclass(frozen=True)
class Tick:
    """The trial clock's tick: commit once the health period has passed."""


@dataclass(frozen=True)
class Stopping:
    """The agent is being stopped on purpose."""


@dataclass(frozen=True)
class SlotChosen:
    """The slot a verified bundle goes into (the one not active)."""

    slot: str


@dataclass(frozen=True)
class SlotWritten:
    """The bundle is written into its slot, complete and fsynced."""


@dataclass(frozen=True)
class StagingFailed:
    """The bundle could not be written into its slot.

    ``condemned``: the bundle itself is unusable; otherwise the device's storage failed.
    """

    reason: str
    message: str
    condemned: bool


@dataclass(frozen=True)
class SelfTestPassed:
    latency_p95_ms: float
    memory_mb: float


@dataclass(frozen=True)
class SelfTestRefused:
    reason: str
    message: str


@dataclass(frozen=True)
class WatchdogTripped:
    """The new model's first requests failed too often."""

    message: str


@dataclass(frozen=True)
class SlotsRolledBack:
    """The previous slot is active (and serving) again."""

    reason: str
    message: str


@dataclass(frozen=True)
class ReturnedToSlot:
    """The previous bundle's slot checked out and is active (and serving) again."""


@dataclass(frozen=True)
class ReturnRefused:
    """The previous bundle's slot does not hold it whole: nothing was switched."""

    reason: str
    message: str


Event = (
    Started
    | Poll
    | Tick
    | Stopping
    | SlotChosen
    | SlotWritten
    | StagingFailed
    | SelfTestPassed
    | SelfTestRefused
    | WatchdogTripped
    | SlotsRolledBack
    | ReturnedToSlot
    | ReturnRefused
    | FetchAnswer
)


# -- effects: what the installer is to do, in order ---------------------------------------


@dataclass(frozen=True)
class SaveJournal:
    """Persist ``journal`` (fsynced) and record ``event``, naming the install's bundle.

    With ``abandoned`` the event names the bundle given up under ``abandoned``
    instead (it is not about that bundle's merits). No ``event``: persist only.
    """

    journal: Journal
    event: str | None
    details: Mapping[str, object] = field(default_factory=dict)
    abandoned: bool = False


@dataclass(frozen=True)
class Report:
    """Record an event that changes no journal."""

    event: str
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PollResult:
    """What this poll says happened."""

    text: str


@dataclass(frozen=True)
class Hold:
    """A named step for crash tests (the installer blocks there when told to)."""

    step: str


@dataclass(frozen=True)
class Check:
    """Ask the fetcher what to install; its answer is the next event."""


@dataclass(frozen=True)
class Download:
    """Ask the fetcher to download the bundle ``expect`` names; its answer is the next event."""

    expect: str


@dataclass(frozen=True)
class ChooseSlot:
    """Find the slot not active; :class:`SlotChosen` is the next event."""


@dataclass(frozen=True)
class WriteSlot:
    """Stop serving from ``slot``, write the bundle file into it; next :class:`SlotWritten`."""

    slot: str
    bundle_file: str


@dataclass(frozen=True)
class SelfTest:
    """Load and test the slot's model; next :class:`SelfTestPassed` or :class:`SelfTestRefused`."""

    slot: str


@dataclass(frozen=True)
class Switch:
    """Make ``slot`` active and serve its tested model, with the old one as previous."""

    slot: str


@dataclass(frozen=True)
class WatchTrial:
    """Start a fresh watchdog on the new model's requests."""


@dataclass(frozen=True)
class EndTrial:
    """Stop watching: the trial is over."""


@dataclass(frozen=True)
class RollBack:
    """Make the previous slot active and serve it; next :class:`SlotsRolledBack`."""

    reason: str
    message: str


@dataclass(frozen=True)
class ReturnToSlot:
    """A fleet rollback: check ``slot``'s files against its manifest and that it holds
    ``expect``, self-test it, make it active and serve it (no fallback); next
    :class:`ReturnedToSlot` or :class:`ReturnRefused`."""

    slot: str
    expect: InstallTarget


@dataclass(frozen=True)
class DeleteBundle:
    """The install ended: its downloaded bundle file goes."""

    path: str


@dataclass(frozen=True)
class DiscardStaging:
    """Remove what a crash mid-write left in the slots' staging folders."""


@dataclass(frozen=True)
class LoadModels:
    """Load the active and previous slots and serve them."""


Effect = (
    SaveJournal
    | Report
    | PollResult
    | Hold
    | Check
    | Download
    | ChooseSlot
    | WriteSlot
    | SelfTest
    | Switch
    | WatchTrial
    | EndTrial
    | RollBack
    | ReturnToSlot
    | DeleteBundle
    | DiscardStaging
    | LoadModels
)
