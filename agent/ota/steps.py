"""The installer's rules as one step function: ``decide(state, event) -> (state, effects)``.

No I/O and no clock here (the caller passes ``now``): the
:class:`~agent.ota.installer.Installer` carries out the effects one after the
other and feeds what each one found back in as the next event. Every
transition is a row of :data:`TRANSITIONS` — the phase it starts in, the named
event, the phases it may end in — so the whole life of an install reads on one
screen; an event no row names for the current phase is refused
(:class:`InvalidEvent`).

A fleet rollback is three rows: the director names, marked as a rollback,
the bundle the other slot holds from before (:class:`RollbackAssigned`); the
journal's rule accepts exactly that one (:meth:`Journal.rollback_refusal`),
journals that the return is under way, and the slot is checked and switched
back to without a download (:class:`ReturnToSlot`, carried out again after a
restart); :class:`ReturnedToSlot` records the bundle left as rolled back by
the fleet, never retried, with the installed counter unchanged. Anything else
the rule refuses is reported, naming what was refused.

The crash-safety rule lives in the order of the effects: a :class:`SaveJournal`
comes before the work of the phase it enters, and the installer runs the next
effect only once the journal is fsynced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from agent.ota.answers import (
    Assigned,
    Changed,
    Downloaded,
    Refused,
    RollbackAssigned,
    Unassigned,
    Unavailable,
)
from agent.ota.journal import FLEET_ROLLBACK, Journal, JournalError, Phase, recovery_action
from agent.ota.step_events import (
    Check,
    ChooseSlot,
    DeleteBundle,
    DiscardStaging,
    Download,
    Effect,
    EndTrial,
    Event,
    Hold,
    LoadModels,
    Poll,
    PollResult,
    Report,
    ReturnedToSlot,
    ReturnRefused,
    ReturnToSlot,
    RollBack,
    SaveJournal,
    SelfTest,
    SelfTestPassed,
    SelfTestRefused,
    SlotChosen,
    SlotsRolledBack,
    SlotWritten,
    StagingFailed,
    Started,
    Stopping,
    Switch,
    Tick,
    WatchdogTripped,
    WatchTrial,
    WriteSlot,
)

# An install refused for something other than the bundle (bytes garbled on the way,
# storage failing) is retried after the poll interval, doubling per refusal, up to this.
MAX_RETRY_DELAY_S = 3600.0


def retry_delay(poll_interval_s: float, refusals: int) -> float:
    """The wait before the next try after a refusal that ``refusals`` others preceded in a row.

    The poll interval, doubling per refusal, at most :data:`MAX_RETRY_DELAY_S`.
    """
    return min(poll_interval_s * 2.0 ** min(refusals, 32), MAX_RETRY_DELAY_S)


# -- state -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The update settings the rules read."""

    poll_interval_s: float
    health_period_s: float
    max_trial_boots: int


@dataclass(frozen=True)
class Retry:
    """A bundle refused for something other than itself: tried again from ``not_before``."""

    refusals: int
    not_before: float


CheckReport = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class InstallerState:
    """The persisted journal, and what the installer keeps in memory only."""

    journal: Journal = field(default_factory=Journal)
    retries: Mapping[str, Retry] = field(default_factory=dict)  # by bundle id
    last_check: CheckReport | None = None  # what the last check reported (reported once)


class InvalidEvent(Exception):
    """An event the transition table does not allow in the current phase."""


Step = tuple[InstallerState, list[Effect]]
Rule = Callable[[InstallerState, Event, float, Policy], Step]


@dataclass(frozen=True)
class Transition:
    """One row: in ``phase``, ``event`` leads to one of ``to`` by ``rule``."""

    phase: Phase
    event: type
    to: frozenset[Phase]
    rule: Rule


def decide(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    """The next state and the effects to carry out, in order, for ``event`` at ``now``."""
    row = _TABLE.get((state.journal.phase, type(event)))
    if row is None:
        raise InvalidEvent(f"{type(event).__name__} is not expected in {state.journal.phase}")
    after, effects = row.rule(state, event, now, policy)
    if after.journal.phase not in row.to:  # pragma: no cover - a bug in a rule
        raise InvalidEvent(f"{row.phase} --{row.event.__name__}--> {after.journal.phase}")
    return after, effects


# -- the rules ---------------------------------------------------------------------


def _journal(state: InstallerState, journal: Journal) -> InstallerState:
    return replace(state, journal=journal)


def _stay(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    return state, []


def _recover(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    journal = state.journal
    action = recovery_action(journal, policy.max_trial_boots)
    effects: list[Effect] = [DiscardStaging()]
    if action == "roll_back":
        restarts = journal.trial_boots + 1
        message = f"the agent restarted {restarts} times during the health period"
        return state, [*effects, LoadModels(), RollBack("crash-loop", message)]
    if action == "return":
        assert journal.previous is not None
        held = journal.previous
        return state, [*effects, LoadModels(), ReturnToSlot(held.slot, held.target)]
    if action == "resume_trial":
        after = journal.rebooted_in_trial()
        saved = SaveJournal(
            after,
            "restarted-in-trial",
            {"boots": after.trial_boots, "clean": journal.clean_shutdown},
        )
        # Counted before the models load: a model that crashes the agent as it loads
        # still counts as a restart in the trial.
        return _journal(state, after), [*effects, saved, LoadModels(), WatchTrial()]
    effects.append(LoadModels())
    if action == "restage":
        # A slot write may be torn: start it over from the verified bundle.
        after = journal.model_copy(update={"phase": Phase.VERIFIED})
        return _journal(state, after), [*effects, SaveJournal(after, "restaging"), ChooseSlot()]
    if action == "self_test":
        assert journal.slot is not None
        return state, [*effects, SelfTest(journal.slot)]
    return state, effects  # a download resumes on the next poll, from the partial file


def _check(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    return state, [Check()]


def _download(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert state.journal.target is not None
    return state, [Download(state.journal.target.bundle_id)]


def _choose_slot(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    return state, [ChooseSlot()]


def _trial_in_progress(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    return state, [PollResult("trial in progress")]


def _assigned(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, Assigned)
    state = replace(state, last_check=None)
    target, journal = event.target, state.journal
    if journal.installed and journal.installed.same_bundle(target):
        return state, [PollResult("up to date")]
    if journal.rejection(target) is not None:
        return state, [PollResult(f"not retrying {target.name} {target.version}: rejected before")]
    retry = state.retries.get(target.bundle_id)
    if retry is not None and now < retry.not_before:
        wait = retry.not_before - now
        return state, [PollResult(f"retrying {target.name} {target.version} in {wait:.0f} s")]
    after = journal.start_download(target)
    return _journal(state, after), [
        SaveJournal(after, "download-started"),
        Download(target.bundle_id),
    ]


def _not_assigned(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, Unassigned | Refused | Unavailable)
    if isinstance(event, Unassigned):
        return replace(state, last_check=("none", None, None)), [PollResult("nothing assigned")]
    return _report_check(state, (event.status, event.reason, event.message))


def _report_check(state: InstallerState, report: CheckReport) -> Step:
    """Report what a check found; the same refusal on every poll is recorded (and sent) once."""
    status, reason, message = report
    effects: list[Effect] = []
    if report != state.last_check:
        effects.append(Report(f"check-{status}", {"reason": reason, "message": message}))
    effects.append(PollResult(f"{status}: {message}"))
    return replace(state, last_check=report), effects


def _rollback_assigned(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, RollbackAssigned)
    target, journal = event.target, state.journal
    if journal.installed and journal.installed.same_bundle(target):
        return replace(state, last_check=None), [PollResult("up to date")]
    refusal = journal.rollback_refusal(target, event.rollback_of)
    if refusal is not None:
        return _report_check(state, ("refused", *refusal))
    # Journaled before the slot is switched to: a restart in between carries it out again.
    after = journal.start_return()
    assert after.previous is not None
    return replace(_journal(state, after), last_check=None), [
        SaveJournal(after, None),
        ReturnToSlot(after.previous.slot, target),
    ]


def _went_back(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    journal = state.journal
    after = journal.went_back(now)
    assert journal.installed is not None and after.installed is not None
    left, back = journal.installed, after.installed
    details = {
        "reason": FLEET_ROLLBACK,
        "left_id": left.bundle_id,
        "to": f"{back.name} {back.version}",
        "to_id": back.bundle_id,
        "installed_counter": after.installed_counter,
    }
    return _journal(state, after), [
        SaveJournal(after, "fleet-rolled-back", details),
        PollResult(f"rolled back to {back.name} {back.version}"),
    ]


def _return_refused(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    # The slot cannot be trusted to hold the bundle any more: no step back remains.
    assert isinstance(event, ReturnRefused)
    after = state.journal.forget_previous()
    state, effects = _report_check(_journal(state, after), ("refused", event.reason, event.message))
    return state, [SaveJournal(after, None), *effects]


def _downloaded(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, Downloaded) and state.journal.target is not None
    target = state.journal.target
    if not target.same_bundle(event.target):
        return _give_up(state, "assignment-changed", {})
    retries = {k: v for k, v in state.retries.items() if k != target.bundle_id}
    after = state.journal.verified(event.path)
    return replace(state, journal=after, retries=retries), [
        SaveJournal(after, "verified"),
        Hold("verified"),
        ChooseSlot(),
    ]


def _download_refused(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    # What the fetcher refuses about the director's answer is not the bundle being
    # downloaded: the download is given up and reported, and the bundle stays eligible.
    assert isinstance(event, Refused)
    details = {"reason": event.reason, "message": event.message}
    if event.about == "assignment":
        after, effects = _give_up(state, "assignment-refused", details)
        return after, [*effects, PollResult(f"assignment refused: {event.message}")]
    after, effects = _refuse(
        state, event.reason, event.message, now, policy, condemned=event.condemns_bundle
    )
    return after, [*effects, PollResult(f"refused: {event.message}")]


def _assignment_changed(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    return _give_up(state, "assignment-changed", {})


def _download_paused(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, Unavailable)
    return state, [
        Report("download-paused", {"message": event.message}),
        PollResult(f"download paused: {event.message}"),
    ]


def _write_slot(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, SlotChosen) and state.journal.bundle_file is not None
    after = state.journal.start_staging(event.slot)
    return _journal(state, after), [
        SaveJournal(after, "staging", {"slot": event.slot}),
        WriteSlot(event.slot, state.journal.bundle_file),
    ]


def _written(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    after = state.journal.staged()
    assert after.slot is not None
    return _journal(state, after), [
        SaveJournal(after, "staged", {"slot": after.slot}),
        Hold("staged"),
        SelfTest(after.slot),
    ]


def _staging_failed(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, StagingFailed)
    return _refuse(state, event.reason, event.message, now, policy, condemned=event.condemned)


def _tested(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, SelfTestPassed) and state.journal.slot is not None
    slot = state.journal.slot
    after = state.journal.switched(now)
    report = {"latency_p95_ms": event.latency_p95_ms, "memory_mb": round(event.memory_mb, 1)}
    return _journal(state, after), [
        Report("self-test-passed", report),
        Switch(slot),
        WatchTrial(),
        SaveJournal(after, "switched", {"slot": slot}),
        Hold("trial"),
    ]


def _test_failed(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, SelfTestRefused)
    return _refuse(state, event.reason, event.message, now, policy, condemned=True)


def _maybe_commit(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    journal = state.journal
    if journal.trial_started_at is None or now - journal.trial_started_at < policy.health_period_s:
        return state, []
    after = journal.committed(now)
    return _journal(state, after), [
        SaveJournal(after, "committed"),
        EndTrial(),
        *_delete(journal),
    ]


def _watchdog(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, WatchdogTripped)
    return state, [RollBack("watchdog", event.message)]


def _rolled_back(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    assert isinstance(event, SlotsRolledBack)
    journal = state.journal
    after = journal.rolled_back(event.reason, event.message, now)
    details = {"reason": event.reason, "message": event.message}
    return _journal(state, after), [SaveJournal(after, "rolled-back", details), *_delete(journal)]


def _stopping_in_trial(state: InstallerState, event: Event, now: float, policy: Policy) -> Step:
    # Recorded so that the next start is not counted as a crash of the new model.
    after = state.journal.model_copy(update={"clean_shutdown": True})
    return _journal(state, after), [SaveJournal(after, None)]


def _give_up(state: InstallerState, event: str, details: Mapping[str, object]) -> Step:
    """Abandon the download without an outcome: nothing is known against its bundle."""
    target = state.journal.target
    assert target is not None
    after = state.journal.abandoned()
    named = {"abandoned": f"{target.name} {target.version}", "abandoned_id": target.bundle_id}
    return _journal(state, after), [SaveJournal(after, event, {**named, **details}, True)]


def _refuse(
    state: InstallerState,
    reason: str,
    message: str,
    now: float,
    policy: Policy,
    *,
    condemned: bool,
) -> Step:
    """End the install as refused.

    ``condemned``: the bundle itself is bad and is never retried. Otherwise it
    is tried again after a backoff (the poll interval, doubling per refusal in
    a row, at most ``MAX_RETRY_DELAY_S``).
    """
    journal, target = state.journal, state.journal.target
    try:
        after = journal.refused(reason, message, now, condemned=condemned)
    except JournalError:
        return state, []
    retries = dict(state.retries)
    if not condemned and target is not None:
        tries = retries[target.bundle_id].refusals if target.bundle_id in retries else 0
        retries[target.bundle_id] = Retry(
            tries + 1, now + retry_delay(policy.poll_interval_s, tries)
        )
    details = {"reason": reason, "message": message, "remembered": condemned}
    return replace(state, journal=after, retries=retries), [
        SaveJournal(after, "refused", details),
        *_delete(journal),
    ]


def _delete(journal: Journal) -> list[Effect]:
    return [DeleteBundle(journal.bundle_file)] if journal.bundle_file else []


# -- the table -------------------------------------------------------------------------

IDLE, DOWNLOADING, VERIFIED, STAGING, STAGED, TRIAL = tuple(Phase)


def _row(phase: Phase, event: type, to: set[Phase], rule: Rule) -> Transition:
    return Transition(phase, event, frozenset(to), rule)


TRANSITIONS: tuple[Transition, ...] = (
    # After a restart: continue or undo what the journal says may be half done.
    _row(IDLE, Started, {IDLE}, _recover),
    _row(DOWNLOADING, Started, {DOWNLOADING}, _recover),
    _row(VERIFIED, Started, {VERIFIED}, _recover),
    _row(STAGING, Started, {VERIFIED}, _recover),
    _row(STAGED, Started, {STAGED}, _recover),
    _row(TRIAL, Started, {TRIAL}, _recover),
    # A poll asks the fetcher, or goes on with the install under way.
    _row(IDLE, Poll, {IDLE}, _check),
    _row(DOWNLOADING, Poll, {DOWNLOADING}, _download),
    _row(VERIFIED, Poll, {VERIFIED}, _choose_slot),
    _row(TRIAL, Poll, {TRIAL}, _trial_in_progress),
    # A slot write or self-test left by a failure: the next start carries it out.
    _row(STAGING, Poll, {STAGING}, _stay),
    _row(STAGED, Poll, {STAGED}, _stay),
    # The fetcher's answer to a check.
    _row(IDLE, Assigned, {IDLE, DOWNLOADING}, _assigned),
    _row(IDLE, Unassigned, {IDLE}, _not_assigned),
    _row(IDLE, Refused, {IDLE}, _not_assigned),
    _row(IDLE, Unavailable, {IDLE}, _not_assigned),
    # A fleet rollback: back to the bundle the other slot holds from before, no download.
    _row(IDLE, RollbackAssigned, {IDLE}, _rollback_assigned),
    _row(IDLE, ReturnedToSlot, {IDLE}, _went_back),
    _row(IDLE, ReturnRefused, {IDLE}, _return_refused),
    # The fetcher's answer to a download.
    _row(DOWNLOADING, Downloaded, {VERIFIED, IDLE}, _downloaded),
    _row(DOWNLOADING, Refused, {IDLE}, _download_refused),
    _row(DOWNLOADING, Changed, {IDLE}, _assignment_changed),
    _row(DOWNLOADING, Unassigned, {IDLE}, _assignment_changed),
    _row(DOWNLOADING, Unavailable, {DOWNLOADING}, _download_paused),
    # Writing the slot, testing the model, switching.
    _row(VERIFIED, SlotChosen, {STAGING}, _write_slot),
    _row(STAGING, SlotWritten, {STAGED}, _written),
    _row(STAGING, StagingFailed, {IDLE}, _staging_failed),
    _row(STAGED, SelfTestPassed, {TRIAL}, _tested),
    _row(STAGED, SelfTestRefused, {IDLE}, _test_failed),
    # The trial: commit after the health period, or roll back.
    _row(TRIAL, Tick, {TRIAL, IDLE}, _maybe_commit),
    _row(TRIAL, WatchdogTripped, {TRIAL}, _watchdog),
    _row(TRIAL, SlotsRolledBack, {IDLE}, _rolled_back),
    _row(TRIAL, Stopping, {TRIAL}, _stopping_in_trial),
    # Outside the trial the clock and a stop change nothing.
    *(_row(p, Tick, {p}, _stay) for p in (IDLE, DOWNLOADING, VERIFIED, STAGING, STAGED)),
    *(_row(p, Stopping, {p}, _stay) for p in (IDLE, DOWNLOADING, VERIFIED, STAGING, STAGED)),
)

_TABLE: dict[tuple[Phase, type], Transition] = {(t.phase, t.event): t for t in TRANSITIONS}
assert len(_TABLE) == len(TRANSITIONS), "one row per phase and event"
