"""What the image repository signs about a bundle, and the checks made against it.

A TUF target of the image repository carries, besides its length and hashes,
the bundle's ``custom`` fields: ``name``, ``version``, ``release_counter`` and
``hardware_ids``. Whoever runs a bundle — a device, or the fleet's cloud
endpoint — reads those fields (:func:`signed_fields`), picks the newest
release for its hardware (:func:`newest_by_name`), and, once the bytes have
passed the signed hashes, refuses a bundle whose manifest says something else
than what was signed (:func:`manifest_disagreement`). Pure functions over
data: the TUF client work (signatures, thresholds, expiry, hashes of the
bytes) is the caller's, through python-tuf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class Described(Protocol):
    """A manifest as :func:`manifest_disagreement` reads it (the model or the device's check)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def release_counter(self) -> int: ...

    @property
    def hardware_ids(self) -> Sequence[str]: ...


class Released(Described, Protocol):
    """Anything that carries a release's signed fields (what :func:`newest_by_name` reads)."""

    @property
    def hardware_ids(self) -> tuple[str, ...]: ...


_Signed = TypeVar("_Signed", bound=Released)


class SignedFieldsError(ValueError):
    """A target lacks the bundle fields, or they do not have their types."""


@dataclass(frozen=True)
class SignedFields:
    """The bundle fields of one image-repository target."""

    name: str
    version: str
    release_counter: int
    hardware_ids: tuple[str, ...]


def signed_fields(target_path: str, custom: Mapping[str, Any] | None) -> SignedFields:
    """The bundle fields of ``custom``; :class:`SignedFieldsError` names what is missing."""
    fields: Mapping[str, Any] = custom or {}
    try:
        hardware = fields["hardware_ids"]
        if isinstance(hardware, str) or not isinstance(hardware, Iterable):
            raise TypeError(f"hardware_ids is {type(hardware).__name__}, not a list")
        return SignedFields(
            name=str(fields["name"]),
            version=str(fields["version"]),
            release_counter=int(fields["release_counter"]),
            hardware_ids=tuple(str(h) for h in hardware),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SignedFieldsError(
            f"target {target_path} lacks the bundle fields (name, version, "
            f"release_counter, hardware_ids): {exc}"
        ) from None


def manifest_disagreement(manifest: Described, signed: Released) -> str | None:
    """What the manifest inside signed bytes contradicts in the signed fields, or ``None``.

    Name, version, release counter and hardware ids must be the same (the
    hardware ids as a set).
    """
    inside = (manifest.name, manifest.version, manifest.release_counter, set(manifest.hardware_ids))
    outside = (signed.name, signed.version, signed.release_counter, set(signed.hardware_ids))
    if inside == outside:
        return None
    return (
        f"the manifest (name, version, counter, hardware) {inside} "
        f"differs from the signed metadata {outside}"
    )


def newest_by_name(bundles: Iterable[_Signed], hardware_id: str) -> dict[str, _Signed]:
    """Per bundle name, the bundle released for ``hardware_id`` with the highest release counter.

    Ties (two targets with one counter, which release tooling never signs) go
    to the higher version string, so the choice never depends on listing order.
    """
    best: dict[str, _Signed] = {}
    for bundle in bundles:
        if hardware_id not in bundle.hardware_ids:
            continue
        held = best.get(bundle.name)
        if held is None or (bundle.release_counter, bundle.version) > (
            held.release_counter,
            held.version,
        ):
            best[bundle.name] = bundle
    return best
