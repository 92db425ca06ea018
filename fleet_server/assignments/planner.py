"""The assignment rules as plain functions over plain data: no database, no signing.

What a device may be assigned, and what it should run, follows from the
release, the tag rules and the facts the device reports:

- a release goes only to the hardware it was released for;
- a release below the release counter a device runs is refused up front (the
  device would refuse it); an old model goes back out as a re-release above;
- a yanked release is assigned to no device;
- for a device gaining a tag, an assignment made for the device by name
  overrides tag rules, and of two rules matching it, the newest wins;
- the director metadata follows the database (:func:`plan_sync`);
- a fleet rollback (:func:`plan_rollback`) may name a release below the
  counter a device runs only as a marked rollback, and only the release that
  device committed right before the one it runs: the device still holds it in
  its other slot and accepts exactly that one (a compromised director can undo
  one step, never install an arbitrary old release).

The ORM rows satisfy the ``*Like`` protocols, and so do the plain
dataclasses below (``ReleaseFacts``, ``DeviceFacts``, ``RuleFacts``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from fleet_server.assignments.models import (
    AssignmentConflict,
    AssignmentError,
    Committed,
    Refusal,
    ReleaseYanked,
    SyncStep,
)
from fleet_server.director import Signed
from protocol.api.assignments import ASSIGNMENT_ID_PATTERN

# Assignments are named by kind: ``dev-N`` one device's (a row of ``assignments``),
# ``tag-N`` a tag rule (a row of ``assignment_rules``).
_ASSIGNMENT_ID = re.compile(ASSIGNMENT_ID_PATTERN)
# Devices named in a one-line refusal; the rest are counted.
NAMED_IN_REFUSAL = 3


class ReleaseLike(Protocol):
    @property
    def target_path(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def release_counter(self) -> int: ...
    @property
    def hardware_ids(self) -> Sequence[str]: ...
    @property
    def yanked_at(self) -> datetime | None: ...
    @property
    def yank_reason(self) -> str | None: ...


class DeviceLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def hardware_id(self) -> str: ...
    @property
    def installed_counter(self) -> int | None: ...
    @property
    def active_bundle(self) -> str | None: ...


class RuleLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def tag(self) -> str: ...
    @property
    def cancelled_at(self) -> datetime | None: ...


D = TypeVar("D", bound=DeviceLike)
R = TypeVar("R", bound=RuleLike)


@dataclass(frozen=True)
class ReleaseFacts:
    """A release as the planner sees it."""

    target_path: str
    name: str
    version: str
    release_counter: int
    hardware_ids: Sequence[str]
    yanked_at: datetime | None = None
    yank_reason: str | None = None


@dataclass(frozen=True)
class DeviceFacts:
    """A device as the planner sees it: its hardware and what it reports running."""

    id: str
    hardware_id: str
    installed_counter: int | None = None
    active_bundle: str | None = None


@dataclass(frozen=True)
class RuleFacts:
    """A tag rule as the planner sees it."""

    id: int
    tag: str
    cancelled_at: datetime | None = None


@dataclass(frozen=True)
class RollbackFacts:
    """A device as a fleet rollback sees it: what it runs, and what it ran right before.

    ``running_sha256`` is the signed sha256 of the release it runs (the bundle
    the rollback replaces); both releases are named by target path, as
    committed by the device (``None``: unknown, or none).
    """

    id: str
    hardware_id: str
    running: str | None
    running_sha256: str | None
    ran_before: str | None


@dataclass(frozen=True)
class RollbackPlan:
    """A marked rollback for the director to sign: ``target_path`` replacing ``rollback_of``."""

    device_id: str
    target_path: str
    rollback_of: str  # the replaced bundle's identity, ALGORITHM:HEX, as the device names it


class RollbackRefused(AssignmentConflict):
    """The device cannot be rolled back to that release (it did not run it right before)."""


def plan_rollback(device: RollbackFacts, previous: ReleaseLike) -> RollbackPlan:
    """The marked rollback that returns ``device`` to ``previous``, or :class:`RollbackRefused`.

    Allowed only when the device committed ``previous`` right before the
    release it runs now (so its other slot holds it), for its hardware, not
    yanked. The plan names the replaced bundle by its signed sha256, which is
    what the device checks against the bundle it runs; a rollback is always
    marked, whatever the counters, so the device never downloads it.
    """
    label = f"{previous.name} {previous.version}"
    if device.running is None or device.running_sha256 is None:
        raise RollbackRefused(f"{device.id} runs no release the server knows: nothing to undo")
    if device.running == previous.target_path:
        raise RollbackRefused(f"{device.id} runs {label} already: nothing to undo")
    if device.ran_before != previous.target_path:
        before = device.ran_before or "no release the server knows"
        raise RollbackRefused(
            f"{device.id} did not run {label} right before what it runs now (it ran {before}); "
            "a rollback returns a device one step, to the release its other slot holds"
        )
    if device.hardware_id not in previous.hardware_ids:
        raise RollbackRefused(f"{label} is not released for {device.hardware_id} ({device.id})")
    if previous.yanked_at is not None:
        raise RollbackRefused(
            f"{label} was yanked ({previous.yank_reason}): {device.id} keeps what it runs"
        )
    return RollbackPlan(device.id, previous.target_path, f"sha256:{device.running_sha256}")


def device_label(assignment_id: int) -> str:
    return f"dev-{assignment_id}"


def rule_label(rule_id: int) -> str:
    return f"tag-{rule_id}"


def parse_assignment_id(text: str) -> tuple[str, int]:
    """``dev-N`` or ``tag-N`` as (kind, N); anything else is refused naming the form."""
    if not _ASSIGNMENT_ID.match(text):
        raise AssignmentError(
            f"assignment id {text!r} must be dev-N (a device's) or tag-N (a tag rule's), "
            "as fleetctl assignments list shows"
        )
    kind, _, number = text.partition("-")
    return kind, int(number)


def below_installed(release: ReleaseLike, devices: Sequence[D]) -> list[D]:
    """The devices running a higher release counter than ``release``: they would refuse it."""
    return [d for d in devices if (d.installed_counter or 0) > release.release_counter]


def counter_refusal(
    release: ReleaseLike, below: Sequence[DeviceLike], total: int, tag: str | None
) -> str:
    """One line: which devices run a higher counter than ``release``, and how to roll back."""
    named = "; ".join(
        f"{d.id} runs {d.active_bundle or 'a bundle'} (release counter {d.installed_counter})"
        for d in below[:NAMED_IN_REFUSAL]
    )
    more = f"; and {len(below) - NAMED_IN_REFUSAL} more" if len(below) > NAMED_IN_REFUSAL else ""
    if tag is not None:
        whom = f"{len(below)} of the {total} devices it matches (tag {tag}) run"
    elif len(below) == 1:
        whom = "the device runs"
    else:
        whom = f"{len(below)} of the {total} devices run"
    return (
        f"{release.name} {release.version} (release counter {release.release_counter}) is below "
        f"what {whom}: {named}{more}; a device never installs a lower release counter, so "
        f"re-release it above: fleetctl release add --re-release-of "
        f"{release.name}@{release.version} --repo REPO --keys KEYS, then fleetctl release push "
        "--repo REPO, and assign the version that prints"
    )


def refuse_yanked(release: ReleaseLike) -> None:
    """Raise :class:`ReleaseYanked`, naming the reason, if ``release`` was yanked."""
    if release.yanked_at is not None:
        raise ReleaseYanked(
            f"{release.name} {release.version} was yanked: {release.yank_reason}; "
            "assign another release"
        )


def refuse_cancelled(assignment_id: str, cancelled_at: datetime | None, by: str | None) -> None:
    """Raise :class:`AssignmentConflict`, naming who and when, if it was cancelled before."""
    if cancelled_at is not None:
        raise AssignmentConflict(
            f"{assignment_id} was already cancelled by {by} at {cancelled_at:%Y-%m-%d %H:%M:%S}Z"
        )


def check_assignment(release: ReleaseLike, devices: Sequence[DeviceLike], tag: str | None) -> None:
    """Refuse assigning ``release`` to ``devices`` (matched by name or by ``tag``), or pass.

    Refused: no device at all (a typo in a tag must not become a rule that
    waits for devices forever), a device of another hardware, a device running
    a higher release counter (:class:`AssignmentConflict`).
    """
    if not devices:
        raise AssignmentError(
            "no device matches the assignment"
            + (f" (no device has the tag {tag}; tag one first)" if tag else "")
        )
    wrong = [d.id for d in devices if d.hardware_id not in release.hardware_ids]
    if wrong:
        raise AssignmentError(
            f"{release.name} {release.version} is not released for the hardware of "
            f"{', '.join(wrong)}"
        )
    below = below_installed(release, devices)
    if below:
        raise AssignmentConflict(counter_refusal(release, below, len(devices), tag))


def winning_rule(rules: Iterable[R], tags: Iterable[str]) -> R | None:
    """The newest active rule whose tag is among ``tags`` (of two rules, the later one wins)."""
    held = set(tags)
    matching = [r for r in rules if r.cancelled_at is None and r.tag in held]
    return max(matching, key=lambda r: r.id, default=None)


def rule_to_apply(
    rules: Sequence[R],
    tags: Collection[str],
    gained: Collection[str],
    current_rule: int | None,
    assigned: bool,
) -> R | None:
    """The rule to apply to a device holding ``tags`` that just gained ``gained``, if any.

    Only if one of the gained tags has an active rule; the newest rule among
    all the device's tags wins. ``assigned``: the device has a current,
    uncancelled assignment, made by the rule ``current_rule`` (``None``: made
    for the device by name, which overrides every rule): then nothing changes
    if it came by name or by the winning rule already.
    """
    if not set(gained) & set(tags):
        return None
    active = [r for r in rules if r.cancelled_at is None and r.tag in tags]
    rule = winning_rule(active, tags)
    if rule is None or not any(r.tag in gained for r in active):
        return None
    if assigned and current_rule in (None, rule.id):
        return None
    return rule


def rule_skip_reason(release: ReleaseLike, device: DeviceLike) -> str | None:
    """Why a tag rule's ``release`` cannot go to ``device`` (yanked, hardware, counter), if so."""
    if release.yanked_at is not None:
        return f"{release.name} {release.version} was yanked: {release.yank_reason}"
    if device.hardware_id not in release.hardware_ids:
        return f"{release.name} {release.version} is not released for {device.hardware_id}"
    if below_installed(release, [device]):
        return counter_refusal(release, [device], 1, None)
    return None


def refusal_of(
    refusals: Sequence[Refusal], release: ReleaseLike, since: datetime
) -> Refusal | None:
    """The newest refusal of ``release`` received since ``since`` (its assignment), if any.

    A refusal names the bundle as NAME VERSION: in its ``bundle`` field, or (a
    refused director answer) in its message.
    """
    label = f"{release.name} {release.version}"
    named = re.compile(rf"(^|[\s(]){re.escape(label)}($|[\s:;,)])")
    for r in refusals:
        if r.received_at < since:
            continue
        if r.bundle == label or (r.bundle is None and r.message and named.search(r.message)):
            return r
    return None


def refusal_warning(device_id: str, release: ReleaseLike, refusal: Refusal) -> str:
    """One line: the device refused (or rolled back) the bundle assigned to it."""
    did = {
        "rolled-back": "rolled back",
        "fleet-rolled-back": "was rolled back by the fleet from",
    }.get(refusal.event, "refused")
    return (
        f"{device_id} {did} the assigned {release.name} {release.version} at "
        f"{refusal.at:%Y-%m-%d %H:%M:%S}Z ({refusal.reason or refusal.event}: "
        f"{refusal.message or 'no message'}); it keeps running what it has"
    )


def plan_sync(committed: Committed, signed: Signed) -> SyncStep | None:
    """The step that makes ``signed`` name what ``committed`` says, or ``None`` if it does.

    What is named is the assignment and the shadow install beside it, together:

    - committed but not signed yet (metadata older than the recorded version):
      sign it at the recorded version;
    - the metadata names another target (or shadow) at the recorded version or
      later (it got ahead of the database, as before signing followed the
      commit): sign the committed targets at the next version and record that
      version;
    - the same targets, the metadata at a later version: record its version;
    - an assignment withdrawn (by a cancel, a yank or a decommission: nothing
      committed at a recorded version) while the metadata still names a target:
      sign an empty assignment, so the device keeps what it runs. A device never
      assigned (recorded version 0) needs nothing, whatever its metadata says.
    """
    same = (
        signed.target_path == committed.target_path and signed.shadow_path == committed.shadow_path
    )
    if committed.target_path is None and committed.shadow_path is None:
        if committed.director_version == 0 or same:
            return None  # never assigned, or withdrawn and signed: it keeps what it runs
        if signed.version < committed.director_version:
            return SyncStep(sign=True, version=committed.director_version, record=False)
        return SyncStep(sign=True, version=signed.version + 1, record=True)
    if signed.version < committed.director_version:
        return SyncStep(sign=True, version=committed.director_version, record=False)
    if not same:
        return SyncStep(sign=True, version=signed.version + 1, record=True)
    if signed.version != committed.director_version:
        return SyncStep(sign=False, version=signed.version, record=True)
    return None
