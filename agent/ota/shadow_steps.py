"""The shadow install's rules as one step function: ``decide_shadow(state, event)``.

A rollout's shadow stage has the director list, beside the device's
assignment, one bundle marked as a shadow (:mod:`protocol.director_marks`).
The device holds it in a folder of its own (:class:`~agent.ota.shadow.ShadowStore`),
self-tests it beside the active model and then runs it on a share of
requests without serving its answers (:mod:`agent.serving.shadow`).

Rules:

1. The shadow lives outside the A/B slots and the install journal: installing,
   testing or dropping it never changes the active model, the slots or the
   installed release counter. It is verified exactly like an assignment
   (signatures, hashes, hardware, release counter not below the installed
   one) by the fetcher before it is written.
2. A shadow is written whole or not at all (staged, fsynced, renamed); it
   serves only after its self-test passed in this process, after every start
   too. One that fails the self-test (its memory or latency over the bundle's
   budget included), or whose signed bytes are unusable, is dropped, reported
   once and not downloaded again while the director keeps listing it; the
   refusal is written down durably (:class:`KeepRefusal`), so a restart does
   not try it again. A different bundle is tried as usual.
3. A download refused for something other than the bundle (bytes garbled on
   the way, storage failing) is retried with the installer's backoff: after
   the poll interval, doubling per refusal in a row, at most
   :data:`~agent.ota.steps.MAX_RETRY_DELAY_S`
   (:func:`~agent.ota.steps.retry_delay`); meanwhile that bundle is not
   downloaded, another one the director names is. An unreachable repository
   puts off the whole check by the same backoff; any answer ends it.
4. When the director no longer lists the shadow, it is dropped (unloaded,
   deleted) and its refusals forgotten. A refusal of the director's answer
   changes nothing on the device: the shadow held stays as it is.
5. Every change is reported as an event: ``shadow-installed``,
   ``shadow-refused`` (with the reason) and ``shadow-dropped``; the same
   refusal on every poll is reported once.

No I/O here, and the clock only as ``now``, passed in:
:class:`~agent.ota.shadow.ShadowKeeper` carries out the effects and feeds what
each one found back in as the next event. Every transition is a row of
:data:`SHADOW_TRANSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from agent.ota.answers import NoShadow, Refused, ShadowDownloaded, ShadowKept, Unavailable
from agent.ota.journal import InstallTarget
from agent.ota.steps import Retry, retry_delay


class ShadowPhase(StrEnum):
    ABSENT = "absent"  # no shadow serves (none on disk, or being replaced)
    INSTALLING = "installing"  # a verified download is being written to the shadow folder
    TESTING = "testing"  # the shadow folder's model is being self-tested
    SERVING = "serving"  # the shadow runs beside the active model


@dataclass(frozen=True)
class ShadowPolicy:
    """The settings the shadow's rules read."""

    poll_interval_s: float


@dataclass(frozen=True)
class ShadowState:
    """The shadow on this device: what it holds, refused, and waits to retry.

    ``held`` is the shadow in the folder (installing, testing or serving);
    ``refused`` the last bundle refused for itself, by id, so a listing that
    does not change is not downloaded again (kept on disk too); ``retries``
    the bundles whose download was refused for something else, by id;
    ``unreachable`` the backoff while the repository cannot be reached;
    ``last_report`` what was reported last.
    """

    phase: ShadowPhase = ShadowPhase.ABSENT
    held: InstallTarget | None = None
    refused: str | None = None
    retries: Mapping[str, Retry] = field(default_factory=dict)
    unreachable: Retry | None = None
    last_report: tuple[str, ...] | None = None

    @property
    def known(self) -> str | None:
        """The bundle id the fetcher need not download again: the one held, or refused."""
        return self.held.bundle_id if self.held is not None else self.refused

    def not_to_download(self, now: float) -> tuple[str, ...]:
        """The bundle ids the fetcher is not to download at ``now``: held, refused, or waiting."""
        ids = [self.held.bundle_id] if self.held is not None else []
        ids += [self.refused] if self.refused is not None else []
        ids += [bundle_id for bundle_id, r in self.retries.items() if now < r.not_before]
        return tuple(dict.fromkeys(ids))


# -- events: what happened -------------------------------------------------------------


@dataclass(frozen=True)
class ShadowStarted:
    """The agent started; ``held`` is the shadow its folder holds whole (``None``: none),
    ``refused`` the bundle id it refused before the restart (``None``: none)."""

    held: InstallTarget | None
    refused: str | None = None


@dataclass(frozen=True)
class ShadowPoll:
    """Time to ask the director for the shadow."""


@dataclass(frozen=True)
class ShadowWritten:
    """The shadow bundle is written to the shadow folder, whole and fsynced."""


@dataclass(frozen=True)
class ShadowWriteFailed:
    """The shadow folder could not be written; ``condemned``: the bundle itself is unusable
    (otherwise the device's storage failed)."""

    reason: str
    message: str
    condemned: bool


@dataclass(frozen=True)
class ShadowTestPassed:
    latency_p95_ms: float
    memory_mb: float


@dataclass(frozen=True)
class ShadowTestFailed:
    reason: str
    message: str


ShadowEvent = (
    ShadowStarted
    | ShadowPoll
    | NoShadow
    | ShadowKept
    | ShadowDownloaded
    | Refused
    | Unavailable
    | ShadowWritten
    | ShadowWriteFailed
    | ShadowTestPassed
    | ShadowTestFailed
)


# -- effects: what the keeper is to do, in order -----------------------------------------


@dataclass(frozen=True)
class AskShadow:
    """Ask the fetcher for the director's shadow, downloading none of ``known``; its answer
    is the next event."""

    known: tuple[str, ...]


@dataclass(frozen=True)
class WriteShadow:
    """Stop running the old shadow, write ``bundle_file`` to the shadow folder, delete the
    file; next :class:`ShadowWritten` or :class:`ShadowWriteFailed`."""

    bundle_file: str


@dataclass(frozen=True)
class TestShadow:
    """Load and self-test the shadow folder's model beside the active one; next
    :class:`ShadowTestPassed` or :class:`ShadowTestFailed`."""


@dataclass(frozen=True)
class RunShadow:
    """Hand the tested shadow model to the serving chain."""


@dataclass(frozen=True)
class DropShadow:
    """Stop running the shadow, unload it and delete the shadow folder."""


@dataclass(frozen=True)
class KeepRefusal:
    """Write down durably that ``bundle_id`` was refused for itself (``None``: forget it)."""

    bundle_id: str | None
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportShadow:
    """Record an event (``shadow-installed``, ``shadow-refused``, ``shadow-dropped``)."""

    event: str
    details: Mapping[str, object] = field(default_factory=dict)


ShadowEffect = (
    AskShadow | WriteShadow | TestShadow | RunShadow | DropShadow | KeepRefusal | ReportShadow
)


class InvalidShadowEvent(Exception):
    """An event the shadow's transition table does not allow in the current phase."""


ShadowStep = tuple[ShadowState, list[ShadowEffect]]
ShadowRule = Callable[[ShadowState, ShadowEvent, float, ShadowPolicy], ShadowStep]


@dataclass(frozen=True)
class ShadowTransition:
    phase: ShadowPhase
    event: type
    to: frozenset[ShadowPhase]
    rule: ShadowRule


def decide_shadow(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    """The next state and the effects to carry out, in order, for ``event`` at ``now``."""
    row = _TABLE.get((state.phase, type(event)))
    if row is None:
        raise InvalidShadowEvent(f"{type(event).__name__} is not expected in {state.phase}")
    after, effects = row.rule(state, event, now, policy)
    if after.phase not in row.to:  # pragma: no cover - a bug in a rule
        raise InvalidShadowEvent(f"{row.phase} --{row.event.__name__}--> {after.phase}")
    return after, effects


# -- the rules ---------------------------------------------------------------------


def _named(target: InstallTarget) -> dict[str, object]:
    return {"bundle": f"{target.name} {target.version}", "bundle_id": target.bundle_id}


def _started(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    assert isinstance(event, ShadowStarted)
    state = replace(state, refused=event.refused)
    if event.held is None:
        return state, []
    return replace(state, phase=ShadowPhase.TESTING, held=event.held), [TestShadow()]


def _poll(state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy) -> ShadowStep:
    if state.unreachable is not None and now < state.unreachable.not_before:
        return state, []
    return state, [AskShadow(state.not_to_download(now))]


def _answered(state: ShadowState) -> ShadowState:
    """An answer came: the repository is reachable again."""
    return replace(state, unreachable=None)


def _forget_refusal(state: ShadowState) -> list[ShadowEffect]:
    return [KeepRefusal(None)] if state.refused is not None else []


def _unlisted(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    held = state.held
    after = ShadowState()
    forget = _forget_refusal(state)
    if held is None:
        return after, forget
    return after, [
        DropShadow(),
        *forget,
        ReportShadow("shadow-dropped", {**_named(held), "reason": "unlisted"}),
    ]


def _kept(state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy) -> ShadowStep:
    return _answered(state), []


def _downloaded(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    assert isinstance(event, ShadowDownloaded)
    retries = {k: v for k, v in state.retries.items() if k != event.target.bundle_id}
    after = replace(
        _answered(state),
        phase=ShadowPhase.INSTALLING,
        held=event.target,
        refused=None,
        retries=retries,
    )
    return after, [*_forget_refusal(state), WriteShadow(event.path)]


def _refused(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    # The director's answer or the download was refused: what the device holds stays.
    assert isinstance(event, Refused)
    state = _answered(state)
    effects: list[ShadowEffect] = []
    details: dict[str, object] = {"reason": event.reason, "message": event.message}
    if event.target is not None:
        details = {**_named(event.target), **details}
        if event.condemns_bundle:
            state = replace(state, refused=event.target.bundle_id)
            effects.append(KeepRefusal(event.target.bundle_id, details))
        else:
            state = _back_off(state, event.target.bundle_id, now, policy)
    report = ("refused", event.reason, event.message)
    if report == state.last_report:
        return state, effects
    return replace(state, last_report=report), [*effects, ReportShadow("shadow-refused", details)]


def _back_off(state: ShadowState, bundle_id: str, now: float, policy: ShadowPolicy) -> ShadowState:
    """Put off the next download of ``bundle_id``, longer for each refusal in a row."""
    before = state.retries.get(bundle_id)
    tries = before.refusals if before is not None else 0
    retry = Retry(tries + 1, now + retry_delay(policy.poll_interval_s, tries))
    return replace(state, retries={**state.retries, bundle_id: retry})


def _unavailable(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    tries = state.unreachable.refusals if state.unreachable is not None else 0
    waiting = Retry(tries + 1, now + retry_delay(policy.poll_interval_s, tries))
    return replace(state, unreachable=waiting), []


def _written(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    return replace(state, phase=ShadowPhase.TESTING), [TestShadow()]


def _write_failed(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    assert isinstance(event, ShadowWriteFailed) and state.held is not None
    if event.condemned:
        return _give_up(state, state.held, event.reason, event.message)
    # The storage failed, not the bundle: dropped, and downloaded again after a backoff.
    target = state.held
    after = _back_off(ShadowState(retries=state.retries), target.bundle_id, now, policy)
    after = replace(after, last_report=("refused", event.reason, event.message))
    details = {**_named(target), "reason": event.reason, "message": event.message}
    return after, [DropShadow(), ReportShadow("shadow-refused", details)]


def _tested(state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy) -> ShadowStep:
    assert isinstance(event, ShadowTestPassed) and state.held is not None
    details = {
        **_named(state.held),
        "latency_p95_ms": round(event.latency_p95_ms, 3),
        "memory_mb": round(event.memory_mb, 1),
    }
    after = replace(state, phase=ShadowPhase.SERVING, last_report=None)
    return after, [RunShadow(), ReportShadow("shadow-installed", details)]


def _test_failed(
    state: ShadowState, event: ShadowEvent, now: float, policy: ShadowPolicy
) -> ShadowStep:
    assert isinstance(event, ShadowTestFailed) and state.held is not None
    return _give_up(state, state.held, event.reason, event.message)


def _give_up(state: ShadowState, target: InstallTarget, reason: str, message: str) -> ShadowStep:
    """Drop the shadow and remember it, durably, as refused while the director lists it."""
    after = ShadowState(
        refused=target.bundle_id,
        retries={k: v for k, v in state.retries.items() if k != target.bundle_id},
        last_report=("refused", reason, message),
    )
    details = {**_named(target), "reason": reason, "message": message}
    # Dropped first: a power cut between the two forgets the refusal (one more try),
    # never leaves a refused shadow in the folder to be tested again.
    return after, [
        DropShadow(),
        KeepRefusal(target.bundle_id, details),
        ReportShadow("shadow-refused", details),
    ]


# -- the table -------------------------------------------------------------------------

ABSENT, INSTALLING, TESTING, SERVING = tuple(ShadowPhase)


def _row(
    phase: ShadowPhase, event: type, to: set[ShadowPhase], rule: ShadowRule
) -> ShadowTransition:
    return ShadowTransition(phase, event, frozenset(to), rule)


SHADOW_TRANSITIONS: tuple[ShadowTransition, ...] = (
    # After a restart: a whole shadow on disk is self-tested again before it runs.
    _row(ABSENT, ShadowStarted, {ABSENT, TESTING}, _started),
    # A poll asks the fetcher, unless the repository was unreachable a moment ago.
    *(_row(p, ShadowPoll, {p}, _poll) for p in (ABSENT, SERVING)),
    # The fetcher's answer to a shadow check.
    *(_row(p, NoShadow, {ABSENT}, _unlisted) for p in (ABSENT, SERVING)),
    *(_row(p, ShadowKept, {p}, _kept) for p in (ABSENT, SERVING)),
    *(_row(p, ShadowDownloaded, {INSTALLING}, _downloaded) for p in (ABSENT, SERVING)),
    *(_row(p, Refused, {p}, _refused) for p in (ABSENT, SERVING)),
    *(_row(p, Unavailable, {p}, _unavailable) for p in (ABSENT, SERVING)),
    # Writing the folder, then the self-test beside the active model.
    _row(INSTALLING, ShadowWritten, {TESTING}, _written),
    _row(INSTALLING, ShadowWriteFailed, {ABSENT}, _write_failed),
    _row(TESTING, ShadowTestPassed, {SERVING}, _tested),
    _row(TESTING, ShadowTestFailed, {ABSENT}, _test_failed),
)

_TABLE: dict[tuple[ShadowPhase, type], ShadowTransition] = {
    (t.phase, t.event): t for t in SHADOW_TRANSITIONS
}
assert len(_TABLE) == len(SHADOW_TRANSITIONS), "one row per phase and event"
