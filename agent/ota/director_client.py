"""The device's side of Uptane's director: which bundle should this device run?

The director's metadata is a TUF repository of its own, per device, refreshed
with python-tuf exactly like the image repository (so expiry, rollback and
signature thresholds are enforced the same way). Its word is then checked
against the image repository by :func:`resolve_assignment`, a pure function:
the director may only choose among bundles the release keys signed, for this
device and its hardware, and never below the installed release counter —
except for one marked fleet rollback: an entry whose ``custom`` carries
``rollback_of`` (the ``ALGORITHM:HEX`` of the bundle it replaces) is passed on
without the counter check, and the installer accepts it only if it is exactly
the bundle its other slot holds from before, replacing the installed one
(:meth:`agent.ota.journal.Journal.rollback_refusal`); anything else is refused.

Beside the assignment the director may list one shadow target (``custom``
carries ``shadow: true``, :mod:`protocol.director_marks`): a bundle the device
installs beside its active model and runs without serving its answers
(:mod:`agent.ota.shadow`). :meth:`DirectorClient.targets` splits the listing
into the two and refuses anything else by name: two shadows, two assignments,
more than two targets, a shadow marked as a fleet rollback. A shadow is
checked by :func:`resolve_assignment` exactly like an assignment, release
counter included.

The director may also list this device's hybrid-inference plan
(:class:`protocol.hybrid.HybridPlan`): a target whose ``custom`` carries only
``hybrid_plan`` (the text of the plan's canonical JSON: TUF's canonical JSON
cannot sign floats), whose path is ``hybrid-plan/PLAN_ID.json``
and whose length and hashes are those of the plan's canonical JSON. It is read
apart from the bundles (:func:`read_plan`) and never blocks them: a plan that
is malformed, does not match its signed length and hashes, is meant for
another device, is one of two, or has expired is refused by name
(:class:`PlanRefusal`) and the device serves locally only, while the
assignment and the shadow are read as before. When the director cannot be
refreshed (unreachable, or its new metadata fails TUF verification), the
plan is read from the last director targets the device trusted, verified
again against its trusted root (:meth:`DirectorClient.trusted_plan`): a plan
lives no longer than that metadata and its own expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from agent.ota.answers import (
    PLAN_DUPLICATE,
    PLAN_EXPIRED,
    PLAN_HASH_MISMATCH,
    PLAN_MALFORMED,
    PLAN_WRONG_DEVICE,
)
from agent.ota.errors import (
    BundleNotFound,
    DirectorMismatch,
    MetadataExpired,
    UntrustedMetadata,
    WrongDevice,
    WrongHardware,
)
from agent.ota.identity import same_hashes
from agent.ota.image_repository import BundleTarget, ImageRepositoryClient, check_counter, refusals
from agent.ota.transport import FetchConfig
from protocol.director_marks import BUNDLE_ID, HYBRID_PLAN, ROLLBACK_OF, SHADOW
from protocol.hybrid import HybridPlan

# Where a director lists a device's plan: PLAN_PREFIX + plan_id + ".json".
PLAN_PREFIX: Final = "hybrid-plan/"


@dataclass(frozen=True)
class DirectorTarget:
    """The director's entry for this device."""

    path: str
    length: int
    hashes: dict[str, str]
    device_id: str
    hardware_id: str
    release_counter: int
    # A fleet rollback replacing this bundle (ALGORITHM:HEX), or None for an assignment.
    rollback_of: str | None = None
    # A shadow install beside the active model, not an assignment.
    shadow: bool = False

    @classmethod
    def from_target(cls, target: TargetFile) -> DirectorTarget:
        custom: dict[str, Any] = target.custom or {}
        try:
            return cls(
                path=target.path,
                length=target.length,
                hashes=dict(target.hashes),
                device_id=str(custom["device_id"]),
                hardware_id=str(custom["hardware_id"]),
                release_counter=int(custom["release_counter"]),
                rollback_of=_rollback_of(custom.get(ROLLBACK_OF)),
                shadow=_shadow(custom.get(SHADOW)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UntrustedMetadata(
                f"director target {target.path} lacks device_id, hardware_id or "
                f"release_counter, or has a malformed {ROLLBACK_OF} or {SHADOW}: {exc}"
            ) from None


@dataclass(frozen=True)
class PlanRefusal:
    """Why the plan the director listed is not followed: a reason code and what was wrong."""

    reason: str
    message: str


@dataclass(frozen=True)
class DirectorTargets:
    """What the director lists for this device: its assignment, shadow and plan, each optional.

    ``plan`` is the hybrid plan to follow (checked by :func:`read_plan`);
    ``plan_refusal`` says why a listed plan is not. ``expires`` is when the
    director's targets metadata itself expires (``None`` when not read from it).
    """

    assignment: DirectorTarget | None = None
    shadow: DirectorTarget | None = None
    plan: HybridPlan | None = None
    plan_refusal: PlanRefusal | None = None
    expires: datetime | None = None


def is_plan_target(target: TargetFile) -> bool:
    """Whether a director target carries a hybrid plan instead of naming a bundle."""
    custom = target.custom
    return isinstance(custom, dict) and HYBRID_PLAN in custom


def read_plan(
    listed: list[TargetFile], device_id: str, now: datetime
) -> tuple[HybridPlan | None, PlanRefusal | None]:
    """The plan among the director's plan targets ``listed``, or why none is followed.

    No target: no plan, nothing refused. Two or more: all refused (which one
    the director meant cannot be told). One: followed only if its ``custom``
    carries nothing but a valid :class:`HybridPlan`, its path is
    ``hybrid-plan/PLAN_ID.json``, the plan's canonical JSON has the target's
    signed length and hashes, it is meant for ``device_id`` and has not
    expired at ``now``.
    """
    if not listed:
        return None, None
    if len(listed) > 1:
        paths = ", ".join(sorted(t.path for t in listed))
        return None, PlanRefusal(
            PLAN_DUPLICATE,
            f"the director lists {len(listed)} hybrid plans ({paths}); expected at most one",
        )
    target = listed[0]
    custom: dict[str, Any] = target.custom or {}
    others = sorted(k for k in custom if k != HYBRID_PLAN)
    if others:
        return None, PlanRefusal(
            PLAN_MALFORMED,
            f"the plan target {target.path} carries {', '.join(others)} beside {HYBRID_PLAN}; "
            "a plan target carries nothing else",
        )
    try:
        plan = _parse_plan(custom[HYBRID_PLAN])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        return None, PlanRefusal(
            PLAN_MALFORMED, f"the plan in {target.path} is not a hybrid plan: {where}: {err['msg']}"
        )
    if target.path != f"{PLAN_PREFIX}{plan.plan_id}.json":
        return None, PlanRefusal(
            PLAN_MALFORMED,
            f"plan {plan.plan_id} is listed as {target.path}, not as "
            f"{PLAN_PREFIX}{plan.plan_id}.json",
        )
    try:
        target.verify_length_and_hashes(plan.canonical_json())
    except tuf_exc.LengthOrHashMismatchError as exc:
        return None, PlanRefusal(
            PLAN_HASH_MISMATCH,
            f"plan {plan.plan_id}: its canonical JSON does not match the signed length and "
            f"hashes of {target.path} ({exc})",
        )
    if plan.device_id != device_id:
        return None, PlanRefusal(
            PLAN_WRONG_DEVICE,
            f"plan {plan.plan_id} is for device {plan.device_id}, this is {device_id}",
        )
    if plan.expired(now):
        return None, PlanRefusal(
            PLAN_EXPIRED,
            f"plan {plan.plan_id} expired at {plan.expires_at.isoformat()}",
        )
    return plan, None


def _parse_plan(signed: object) -> HybridPlan:
    """The plan a target's ``custom`` carries: its canonical JSON as a string, or an object.

    TUF signs metadata as OLPC canonical JSON, which has no floats, so a plan
    (whose tau, temperature, rates are floats) is signed as the text of its
    canonical JSON; an object whose numbers are written as strings is read too.
    Raises pydantic's ``ValidationError``.
    """
    if isinstance(signed, str):
        return HybridPlan.model_validate_json(signed)
    return HybridPlan.model_validate(signed)


def _listing(targets: Metadata[Targets], device_id: str, now: datetime) -> DirectorTargets:
    """The assignment, shadow and plan of verified director targets metadata."""
    listed = list(targets.signed.targets.values())
    plans = [t for t in listed if is_plan_target(t)]
    split = split_targets([DirectorTarget.from_target(t) for t in listed if not is_plan_target(t)])
    plan, refusal = read_plan(plans, device_id, now)
    return DirectorTargets(
        assignment=split.assignment,
        shadow=split.shadow,
        plan=plan,
        plan_refusal=refusal,
        expires=targets.signed.expires,
    )


def split_targets(listed: list[DirectorTarget]) -> DirectorTargets:
    """The assignment and the shadow among ``listed``; anything else is refused, by name.

    At most two targets: one assignment (a fleet rollback is one) and one
    shadow, which is never a fleet rollback.
    """
    shadows = [t for t in listed if t.shadow]
    assigned = [t for t in listed if not t.shadow]
    if len(listed) > 2:
        raise UntrustedMetadata(
            f"the director names {len(listed)} bundles ({_paths(listed)}); "
            "expected an assignment and at most one shadow"
        )
    if len(shadows) > 1:
        raise UntrustedMetadata(
            f"the director names {len(shadows)} shadow bundles ({_paths(shadows)}); "
            "expected at most one"
        )
    if len(assigned) > 1:
        raise UntrustedMetadata(
            f"the director assigns {len(assigned)} bundles ({_paths(assigned)}); expected one"
        )
    for shadow in shadows:
        if shadow.rollback_of is not None:
            raise UntrustedMetadata(
                f"the director's shadow {shadow.path} is marked as a fleet rollback of "
                f"{shadow.rollback_of}; a shadow never is"
            )
    return DirectorTargets(
        assignment=assigned[0] if assigned else None, shadow=shadows[0] if shadows else None
    )


def _paths(targets: list[DirectorTarget]) -> str:
    return ", ".join(t.path for t in targets)


def _rollback_of(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not BUNDLE_ID.fullmatch(value):
        raise ValueError(f"{ROLLBACK_OF} must be ALGORITHM:HEX, not {value!r}")
    return value


def _shadow(value: object) -> bool:
    if value is None or value is False:
        return False
    if value is not True:
        raise ValueError(f"{SHADOW} must be true, not {value!r}")
    return True


class DirectorClient:
    """Refreshes this device's director metadata and reads its assignment, shadow and plan."""

    def __init__(
        self,
        metadata_dir: Path,
        director_url: str,
        device_id: str,
        fetch: FetchConfig | None = None,
    ) -> None:
        self._repo = ImageRepositoryClient(
            metadata_dir, f"{director_url.rstrip('/')}/devices/{device_id}", fetch
        )
        self.metadata_dir = metadata_dir
        self.device_id = device_id

    def assignment(self) -> DirectorTarget | None:
        """The verified assignment, or ``None`` when the director names no bundle."""
        return self.targets().assignment

    def targets(self, now: datetime | None = None) -> DirectorTargets:
        """The verified assignment and shadow (:func:`split_targets`), each ``None`` if unlisted,
        and the plan (:func:`read_plan`) as of ``now`` (default: the current time)."""
        self._repo.refresh()
        with refusals():
            targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        return _listing(targets, self.device_id, now or datetime.now(UTC))

    def plan(self, now: datetime | None = None) -> DirectorTargets:
        """Refresh, then only the plan (:func:`read_plan`) as of ``now``, and ``expires``.

        The bundles listed beside it are not read: a bad bundle entry is the
        assignment's refusal, never the plan's.
        """
        self._repo.refresh()
        return self.trusted_plan(now)

    def trusted_plan(self, now: datetime | None = None) -> DirectorTargets:
        """The plan of the director targets last trusted, without asking the director.

        For when a refresh failed (and after one): the stored ``targets.json``
        is verified again against the stored trusted root, and refused if it
        has expired at ``now`` (:class:`MetadataExpired`) — a plan lives no
        longer than the metadata that carried it. Only the plan (and
        ``expires``) is returned. Nothing stored yet: an empty listing.
        """
        when = now or datetime.now(UTC)
        path = self.metadata_dir / "targets.json"
        if not path.exists():
            return DirectorTargets()
        with refusals():
            root: Metadata[Root] = Metadata.from_file(str(self.metadata_dir / "root.json"))
            targets: Metadata[Targets] = Metadata.from_file(str(path))
            root.verify_delegate(Targets.type, targets)
        if targets.signed.is_expired(when):
            raise MetadataExpired(
                f"the director targets last trusted expired at "
                f"{targets.signed.expires.isoformat()}; following no plan from them"
            )
        listed = [t for t in targets.signed.targets.values() if is_plan_target(t)]
        plan, refusal = read_plan(listed, self.device_id, when)
        return DirectorTargets(plan=plan, plan_refusal=refusal, expires=targets.signed.expires)


def resolve_assignment(
    director: DirectorTarget,
    image: BundleTarget | None,
    device_id: str,
    hardware_id: str,
    installed_counter: int,
) -> BundleTarget:
    """Accept the director's choice only if the image repository signed it as named.

    Uptane's full verification, step by step: the entry is for this device and
    its hardware; the image repository signed that target path; the lengths
    agree, and the hashes too (they share at least one algorithm and agree on
    every one they share); the signed hardware ids include ours; the release counter
    does not go below the installed one — unless the entry is a marked fleet
    rollback, which only the installer's journal can judge (it knows what the
    other slot holds) and which is never downloaded.
    """
    if director.device_id != device_id:
        raise WrongDevice(
            f"the director metadata is for device {director.device_id}, this is {device_id}"
        )
    if director.hardware_id != hardware_id:
        raise WrongHardware(
            f"the director assigned {director.path} for hardware {director.hardware_id}; "
            f"this device is {hardware_id}"
        )
    if image is None:
        raise BundleNotFound(
            f"the director named {director.path}, which the image repository never signed"
        )
    if director.length != image.length or not same_hashes(director.hashes, image.hashes):
        raise DirectorMismatch(
            f"{director.path}: the director's length/hash differ from the image repository's "
            f"(director: {director.length} bytes, {_algorithms(director.hashes)}; image "
            f"repository: {image.length} bytes, {_algorithms(image.hashes)})"
        )
    if director.release_counter != image.release_counter:
        raise DirectorMismatch(
            f"{director.path}: the director says release counter {director.release_counter}, "
            f"the image repository {image.release_counter}"
        )
    if hardware_id not in image.hardware_ids:
        raise WrongHardware(
            f"{image.name} {image.version} is released for {', '.join(image.hardware_ids)}, "
            f"not for {hardware_id}"
        )
    if director.rollback_of is None:
        check_counter(image, installed_counter)
    return image


def _algorithms(hashes: dict[str, str]) -> str:
    return ", ".join(f"{a} {h[:12]}…" for a, h in sorted(hashes.items())) or "no hashes"


def image_target_or_none(client: ImageRepositoryClient, path: str) -> BundleTarget | None:
    """The image repository's verified entry for ``path``, or ``None`` if it has none."""
    try:
        return client.target(path)
    except BundleNotFound:
        return None
