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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, TargetFile, Targets

from agent.ota.errors import (
    BundleNotFound,
    DirectorMismatch,
    UntrustedMetadata,
    WrongDevice,
    WrongHardware,
)
from agent.ota.identity import same_hashes
from agent.ota.image_repository import BundleTarget, ImageRepositoryClient, check_counter, refusals
from agent.ota.transport import FetchConfig
from protocol.director_marks import BUNDLE_ID, ROLLBACK_OF, SHADOW


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
class DirectorTargets:
    """What the director lists for this device: its assignment and its shadow, each optional."""

    assignment: DirectorTarget | None = None
    shadow: DirectorTarget | None = None


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
    """Refreshes this device's director metadata and reads its assignment and shadow."""

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

    def assignment(self) -> DirectorTarget | None:
        """The verified assignment, or ``None`` when the director names no bundle."""
        return self.targets().assignment

    def targets(self) -> DirectorTargets:
        """The verified assignment and shadow (:func:`split_targets`), each ``None`` if unlisted."""
        self._repo.refresh()
        with refusals():
            targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        return split_targets(
            [DirectorTarget.from_target(t) for t in targets.signed.targets.values()]
        )


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
