"""Why an update was refused: one small hierarchy, each with a stable reason code.

Every refusal an attacker or a broken repository can cause is an
``UpdateRefused``; callers handle "the repository sent something bad" in one
place and report ``reason`` (a short code) and the message (what and why).

Most refusals are about an *answer* (metadata, the director's choice, the bytes
one download delivered) and say nothing about the bundle the release keys
signed: a forged or garbled answer must never keep a genuine bundle from
installing later. Only the refusals whose ``condemns_bundle`` is true are
about the signed bundle itself (its signed bytes are unusable, or its model
failed the self-test); the installer remembers only those, and never retries
that bundle.
"""

from __future__ import annotations

from typing import ClassVar


class UpdateRefused(Exception):
    """The device refused an update; ``reason`` is a short stable code."""

    reason = "refused"
    # True only when the signed bundle itself is bad, whoever delivers it.
    condemns_bundle: ClassVar[bool] = False

    @property
    def detail(self) -> str:
        """The message without the reason code."""
        return super().__str__()

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class TamperedBundle(UpdateRefused):
    """The downloaded bytes differ from what the release keys signed (length or hashes)."""

    reason = "tampered-bundle"


class ManifestMismatch(TamperedBundle):
    """The signed bytes hold a manifest that contradicts the signed fields (or none)."""

    reason = "manifest-mismatch"
    condemns_bundle = True


class TamperedMetadata(UpdateRefused):
    """Metadata does not match the hash or length its parent role signed."""

    reason = "tampered-metadata"


class UntrustedMetadata(UpdateRefused):
    """Metadata is not signed by enough trusted keys, or is otherwise invalid."""

    reason = "untrusted-metadata"


class UntrustedRoot(UntrustedMetadata):
    """The device's own trusted root is missing, unreadable, corrupt or not validly signed.

    Nothing can be verified until the device is provisioned again with a good root.
    """

    reason = "untrusted-root"


class MetadataRollback(UpdateRefused):
    """The repository offered metadata older than metadata already trusted."""

    reason = "metadata-rollback"


class MetadataExpired(UpdateRefused):
    """Metadata has expired: a freeze attack, or a repository no longer re-signed."""

    reason = "metadata-expired"


class WrongHardware(UpdateRefused):
    """The bundle is not released for this device's hardware."""

    reason = "wrong-hardware"


class ReleaseCounterDowngrade(UpdateRefused):
    """The bundle's release counter is lower than the installed one."""

    reason = "release-counter-downgrade"


class EndlessData(UpdateRefused):
    """The server sent more bytes than the signed length."""

    reason = "endless-data"


class SlowRetrieval(UpdateRefused):
    """The server stalled or sent data slower than the minimum speed."""

    reason = "slow-retrieval"


class BundleNotFound(UpdateRefused):
    """The image repository lists no such bundle."""

    reason = "bundle-not-found"


class RepositoryUnavailable(UpdateRefused):
    """The repository could not be reached or answered with an error; retry later."""

    reason = "repository-unavailable"


class DownloadInterrupted(RepositoryUnavailable):
    """The download stopped early; what arrived is kept and the next try resumes."""

    reason = "download-interrupted"


class InsufficientSpace(UpdateRefused):
    """The data directory has too little free space for the bundle."""

    reason = "insufficient-space"


class DirectorMismatch(UpdateRefused):
    """The director named a bundle the image repository did not sign as named."""

    reason = "director-mismatch"


class WrongDevice(UpdateRefused):
    """The director metadata is meant for another device."""

    reason = "wrong-device"


class SelfTestFailed(UpdateRefused):
    """The staged model failed its self-test (load, golden vectors, latency, memory)."""

    reason = "self-test-failed"
    condemns_bundle = True


class InvalidBundle(UpdateRefused):
    """The bundle is signed but unusable (members do not match its manifest, or newer schema)."""

    reason = "invalid-bundle"
    condemns_bundle = True


def refusal_kinds() -> list[type[UpdateRefused]]:
    """:class:`UpdateRefused` and every kind of it, each naming one reason code."""
    kinds: list[type[UpdateRefused]] = []
    pending: list[type[UpdateRefused]] = [UpdateRefused]
    while pending:
        cls = pending.pop()
        kinds.append(cls)
        pending.extend(cls.__subclasses__())
    return kinds


def answer_refusal_codes() -> frozenset[str]:
    """The reason codes of refusals about an answer, never about the signed bundle itself."""
    return frozenset(cls.reason for cls in refusal_kinds() if not cls.condemns_bundle)
