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
from protocol.director_marks import BUNDLE_ID, ROLLBACK_OF


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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UntrustedMetadata(
                f"director target {target.path} lacks device_id, hardware_id or "
                f"release_counter, or has a malformed {ROLLBACK_OF}: {exc}"
            ) from None


def _rollback_of(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not BUNDLE_ID.fullmatch(value):
        raise ValueError(f"{ROLLBACK_OF} must be ALGORITHM:HEX, not {value!r}")
    return value


class DirectorClient:
    """Refreshes this device's director metadata and reads its assignment."""

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
        self._repo.refresh()
        with refusals():
            targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        listed = list(targets.signed.targets.values())
        if not listed:
            return None
        if len(listed) > 1:
            raise UntrustedMetadata(f"the director names {len(listed)} bundles; expected one")
        return DirectorTarget.from_target(listed[0])


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
