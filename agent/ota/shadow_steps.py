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
   budget included) is dropped, reported once and not tried again while the
   director keeps listing it (a restart forgets that: the next start tries it
   once more).
3. When the director no longer lists the shadow, it is dropped (unloaded,
   deleted). A refusal of the director's answer changes nothing on the
   device: the shadow held stays as it is.
4. Every change is reported as an event: ``shadow-installed``,
   ``shadow-refused`` (with the reason) and ``shadow-dropped``; the same
   refusal on every poll is reported once.

No I/O and no clock here: :class:`~agent.ota.shadow.ShadowKeeper` carries out
the effects and feeds what each one found back in as the next event. Every
transition is a row of :data:`SHADOW_TRANSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from agent.ota.answers import NoShadow, Refused, ShadowDownloaded, ShadowKept, Unavailable
from agent.ota.journal import InstallTarget


class ShadowPhase(StrEnum):
    ABSENT = "absent"  # no shadow serves (none on disk, or being replaced)
    INSTALLING = "installing"  # a verified download is being written to the shadow folder
    TESTING = "testing"  # the shadow folder's model is being self-tested
    SERVING = "serving"  # the shadow runs beside the active model


@dataclass(frozen=True)
class ShadowState:
    """The shadow on this device: what it holds and what it refused (in memory only).

    ``held`` is the shadow in the folder (installing, testing or serving);
    ``refused`` the last bundle refused, by id, so a listing that does not
    change is not downloaded again; ``last_report`` what was reported last.
    """

    phase: ShadowPhase = ShadowPhase.ABSENT
    held: InstallTarget | None = None
    refused: str | None = None
    last_report: tuple[str, ...] | None = None

    @property
    def known(self) -> str | None:
        """The bundle id the fetcher need not download again: the one held, or refused."""
        return self.held.bundle_id if self.held is not None else self.refused


# -- events: what happened -------------------------------------------------------------


@dataclass(frozen=True)
class ShadowStarted:
    """The agent started; ``held`` is the shadow its folder holds whole (``None``: none)."""

    held: InstallTarget | None


@dataclass(frozen=True)
class ShadowWritten:
    """The shadow bundle is written to the shadow folder, whole and fsynced."""


@dataclass(frozen=True)
class ShadowWriteFailed:
    reason: str
    message: str


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
class ReportShadow:
    """Record an event (``shadow-installed``, ``shadow-refused``, ``shadow-dropped``)."""

    event: str
    details: Mapping[str, object] = field(default_factory=dict)


ShadowEffect = WriteShadow | TestShadow | RunShadow | DropShadow | ReportShadow


class InvalidShadowEvent(Exception):
    """An event the shadow's transition table does not allow in the current phase."""


ShadowStep = tuple[ShadowState, list[ShadowEffect]]
ShadowRule = Callable[[ShadowState, ShadowEvent], ShadowStep]


@dataclass(frozen=True)
class ShadowTransition:
    phase: ShadowPhase
    event: type
    to: frozenset[ShadowPhase]
    rule: ShadowRule


def decide_shadow(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    """The next state and the effects to carry out, in order, for ``event``."""
    row = _TABLE.get((state.phase, type(event)))
    if row is None:
        raise InvalidShadowEvent(f"{type(event).__name__} is not expected in {state.phase}")
    after, effects = row.rule(state, event)
    if after.phase not in row.to:  # pragma: no cover - a bug in a rule
        raise InvalidShadowEvent(f"{row.phase} --{row.event.__name__}--> {after.phase}")
    return after, effects


# -- the rules ---------------------------------------------------------------------


def _named(target: InstallTarget) -> dict[str, object]:
    return {"bundle": f"{target.name} {target.version}", "bundle_id": target.bundle_id}


def _started(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    assert isinstance(event, ShadowStarted)
    if event.held is None:
        return state, []
    return replace(state, phase=ShadowPhase.TESTING, held=event.held), [TestShadow()]


def _unlisted(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    held = state.held
    after = ShadowState()
    if held is None:
        return after, []
    return after, [
        DropShadow(),
        ReportShadow("shadow-dropped", {**_named(held), "reason": "unlisted"}),
    ]


def _kept(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    return state, []


def _downloaded(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    assert isinstance(event, ShadowDownloaded)
    after = replace(state, phase=ShadowPhase.INSTALLING, held=event.target, refused=None)
    return after, [WriteShadow(event.path)]


def _refused(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    # The director's answer or the download was refused: what the device holds stays.
    assert isinstance(event, Refused)
    report = ("refused", event.reason, event.message)
    if report == state.last_report:
        return state, []
    details = {"reason": event.reason, "message": event.message}
    return replace(state, last_report=report), [ReportShadow("shadow-refused", details)]


def _unavailable(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    return state, []


def _written(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    return replace(state, phase=ShadowPhase.TESTING), [TestShadow()]


def _write_failed(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    assert isinstance(event, ShadowWriteFailed) and state.held is not None
    return _give_up(state, state.held, event.reason, event.message)


def _tested(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    assert isinstance(event, ShadowTestPassed) and state.held is not None
    details = {
        **_named(state.held),
        "latency_p95_ms": round(event.latency_p95_ms, 3),
        "memory_mb": round(event.memory_mb, 1),
    }
    after = replace(state, phase=ShadowPhase.SERVING, last_report=None)
    return after, [RunShadow(), ReportShadow("shadow-installed", details)]


def _test_failed(state: ShadowState, event: ShadowEvent) -> ShadowStep:
    assert isinstance(event, ShadowTestFailed) and state.held is not None
    return _give_up(state, state.held, event.reason, event.message)


def _give_up(state: ShadowState, target: InstallTarget, reason: str, message: str) -> ShadowStep:
    """Drop the shadow and remember it as refused while the director lists it."""
    after = ShadowState(refused=target.bundle_id, last_report=("refused", reason, message))
    details = {**_named(target), "reason": reason, "message": message}
    return after, [DropShadow(), ReportShadow("shadow-refused", details)]


# -- the table -------------------------------------------------------------------------

ABSENT, INSTALLING, TESTING, SERVING = tuple(ShadowPhase)


def _row(
    phase: ShadowPhase, event: type, to: set[ShadowPhase], rule: ShadowRule
) -> ShadowTransition:
    return ShadowTransition(phase, event, frozenset(to), rule)


SHADOW_TRANSITIONS: tuple[ShadowTransition, ...] = (
    # After a restart: a whole shadow on disk is self-tested again before it runs.
    _row(ABSENT, ShadowStarted, {ABSENT, TESTING}, _started),
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
