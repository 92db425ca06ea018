"""What makes two signed bundles the same: their signed hashes, any algorithm python-tuf verifies.

A TUF repository may sign a target with any hash algorithms (sha256, sha512,
blake2b, …). The device names a bundle by its *strongest* signed hash,
``ALGORITHM:HEX`` (:func:`bundle_id`): the install journal, the list of
bundles never to retry, and the events all use that name. Two hash sets name
the same bytes when they share an algorithm and agree on every one they share
(:func:`same_hashes`), which is how the director's entry is checked against
the image repository's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol


class Hasher(Protocol):
    """What the device needs of a hash object: hashlib's and blake2b's alike."""

    @property
    def digest_size(self) -> int: ...

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hash(algorithm: str) -> Hasher:
    """A hash object for ``algorithm``, named as python-tuf names it; ValueError if unknown."""
    if algorithm == "blake2b-256":  # python-tuf's one name beyond hashlib's
        return hashlib.blake2b(digest_size=32)
    return hashlib.new(algorithm)


def _digest_size(algorithm: str) -> int:
    """Bytes of ``algorithm``'s digest (as python-tuf computes it); 0 if unsupported."""
    try:
        return int(new_hash(algorithm).digest_size)
    except (ValueError, TypeError):
        return 0


def bundle_id(hashes: Mapping[str, str]) -> str:
    """The identity of a signed bundle: ``ALGORITHM:HEX`` of its strongest signed hash.

    Strongest means the longest digest among the algorithms python-tuf can
    verify, ties broken by name, so the same signed hashes always give the same
    identity. A repository that signs only sha512 gives ``sha512:…``; one that
    signs only sha256 (as this project's release tooling does) gives ``sha256:…``.
    """
    usable = [a for a in hashes if _digest_size(a) > 0]
    if not usable:
        raise ValueError(f"no hash algorithm python-tuf verifies among {sorted(hashes)}")
    best = max(usable, key=lambda a: (_digest_size(a), a))
    return f"{best}:{hashes[best]}"


def same_hashes(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether two signed hash sets name the same bytes: they share an algorithm and agree."""
    common = a.keys() & b.keys()
    return bool(common) and all(a[k] == b[k] for k in common)


def is_verifiable(algorithm: str) -> bool:
    """Whether python-tuf can check a hash of ``algorithm`` (a fixed-length digest)."""
    return _digest_size(algorithm) > 0
