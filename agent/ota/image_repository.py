"""The device's view of the image repository: refresh, choose, download, verify.

python-tuf's ``Updater`` refreshes and verifies the metadata (root, timestamp,
snapshot, targets: TUF client workflow 5.3-5.6) and keeps the trusted copies
in the device's metadata directory. The bundle itself is downloaded by this
module, resumably and never past its signed length, from the URL python-tuf's
rules give (``HASH.NAME`` only when the trusted root uses consistent
snapshots), then verified by python-tuf against every hash the repository
signed (any algorithm python-tuf supports), then checked against the signed
custom fields (name, version, release counter, hardware ids). Every refusal is
an :class:`UpdateRefused`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from agent.ota.durable import fsync_dir, start_writeback
from agent.ota.errors import (
    BundleNotFound,
    DownloadInterrupted,
    EndlessData,
    InsufficientSpace,
    ManifestMismatch,
    MetadataExpired,
    MetadataRollback,
    ReleaseCounterDowngrade,
    RepositoryUnavailable,
    SlowRetrieval,
    TamperedBundle,
    TamperedMetadata,
    UntrustedMetadata,
    UntrustedRoot,
    UpdateRefused,
    WrongHardware,
)
from agent.ota.identity import Hasher, bundle_id, is_verifiable, new_hash
from agent.ota.location import is_local, local_path
from agent.ota.transport import FetchConfig, RepositoryFetcher, Stream
from agent.ota.tuf_client import Updater, UpdaterConfig
from protocol.bundle import BundleFormatError, read_checked_manifest
from protocol.manifest_check import CheckedManifest
from protocol.signed_bundle import (
    SignedFieldsError,
    manifest_disagreement,
    newest_by_name,
    signed_fields,
)

if TYPE_CHECKING:
    from agent.ota.early_copy import EarlyCopy

PARTIAL_SUFFIX = ".partial"
_READ_BLOCK = 1 << 20  # bytes a resumed download's earlier part is hashed by
# Bytes written between starts of their writeback: the fsync at the end then waits
# for about this much, not for the whole bundle.
_WRITEBACK_BLOCK = 8 << 20


@dataclass(frozen=True)
class BundleTarget:
    """A bundle the image repository signed, with its trusted length, hashes and fields.

    ``hashes`` are all the hashes the repository signed, in its order (the
    first names the file in a consistent-snapshot repository); the bundle's
    identity is :attr:`bundle_id`, its strongest hash.
    """

    path: str
    length: int
    hashes: dict[str, str]
    name: str
    version: str
    release_counter: int
    hardware_ids: tuple[str, ...]

    @classmethod
    def from_target(cls, target: TargetFile) -> BundleTarget:
        try:
            fields = signed_fields(target.path, target.custom)
        except SignedFieldsError as exc:
            raise UntrustedMetadata(str(exc)) from None
        bundle = cls(
            path=target.path,
            length=target.length,
            hashes=dict(target.hashes),
            name=fields.name,
            version=fields.version,
            release_counter=fields.release_counter,
            hardware_ids=fields.hardware_ids,
        )
        check_hash_algorithms(f"target {target.path}", bundle.hashes)
        return bundle

    @property
    def bundle_id(self) -> str:
        """``ALGORITHM:HEX`` of the strongest signed hash (the journal's key)."""
        return bundle_id(self.hashes)

    @property
    def sha256(self) -> str | None:
        """The signed sha256, when the repository signed one."""
        return self.hashes.get("sha256")

    @property
    def file_name(self) -> str:
        return self.path.rpartition("/")[2]

    def target_file(self) -> TargetFile:
        return TargetFile(length=self.length, hashes=dict(self.hashes), path=self.path)


def check_hash_algorithms(what: str, hashes: dict[str, str]) -> None:
    """Refuse hashes python-tuf could not verify, before anything is downloaded."""
    if not hashes:
        raise UntrustedMetadata(f"{what} lists no hashes")
    for algorithm in hashes:
        if not is_verifiable(algorithm):
            raise UntrustedMetadata(
                f"{what} is signed with hash algorithm {algorithm!r}, which this device "
                "cannot verify"
            )


@contextmanager
def refusals() -> Iterator[None]:
    """Translate python-tuf's and the OS's errors into :class:`UpdateRefused`."""
    try:
        yield
    except UpdateRefused:
        raise
    except tuf_exc.ExpiredMetadataError as exc:
        raise MetadataExpired(f"{exc}; refusing stale metadata (a freeze attack?)") from None
    except (tuf_exc.BadVersionNumberError, tuf_exc.EqualVersionNumberError) as exc:
        raise MetadataRollback(f"{exc}; refusing metadata older than what is trusted") from None
    except tuf_exc.DownloadLengthMismatchError as exc:
        raise EndlessData(f"{exc}") from None
    except tuf_exc.SlowRetrievalError as exc:
        raise SlowRetrieval(str(exc)) from None
    except tuf_exc.LengthOrHashMismatchError as exc:
        raise TamperedMetadata(str(exc)) from None
    except tuf_exc.UnsignedMetadataError as exc:
        raise UntrustedMetadata(f"{exc}; not signed by enough trusted keys") from None
    except tuf_exc.DownloadError as exc:
        raise RepositoryUnavailable(str(exc)) from None
    except tuf_exc.RepositoryError as exc:
        raise UntrustedMetadata(str(exc)) from None
    except OSError as exc:
        raise RepositoryUnavailable(f"{exc}") from None


# The root a trust store was provisioned with, kept beside the (possibly newer) root.json.
PROVISIONED_ROOT = "provisioned-root.json"


def load_trusted_root(path: Path) -> Metadata[Root]:
    """``path`` as a valid TUF root signed by its own keys.

    Raises :class:`UntrustedRoot` naming the file and what is wrong with it
    (missing, unreadable, not JSON, another role's metadata, not self-signed).
    """
    raw, problem = _read_root(path)
    if raw is None:
        raise UntrustedRoot(f"the trusted root {path} {problem}")
    md: Metadata[Root] = Metadata.from_bytes(raw)
    return md


def _read_root(path: Path) -> tuple[bytes, None] | tuple[None, str]:
    """The bytes of ``path`` if it is a self-signed TUF root, else what is wrong with it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "does not exist"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    problem = _root_problem(raw)
    if problem is not None:
        return None, problem
    return raw, None


def _root_problem(raw: bytes) -> str | None:
    """What keeps ``raw`` from being a self-signed TUF root, or None."""
    try:
        md = Metadata.from_bytes(raw)
    except DeserializationError as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, json.JSONDecodeError):
            return f"is not JSON ({cause})"
        return " ".join(f"is not valid TUF metadata ({cause})".split())
    if not isinstance(md.signed, Root):
        return f"is {md.signed.type} metadata, not a root"
    try:
        md.verify_delegate(Root.type, md)
    except tuf_exc.UnsignedMetadataError as exc:
        return f"is not signed by a threshold of its own root keys ({exc})"
    return None


def _signed_of(path: Path) -> dict[str, Any] | None:
    """The signed part of the valid root stored at ``path``; None when it is damaged.

    A damaged store is left for the updater to refuse by name (it is the store
    that needs provisioning again, not the root the user gave).
    """
    raw, _ = _read_root(path)
    if raw is None:
        return None
    signed: dict[str, Any] = Metadata.from_bytes(raw).signed.to_dict()
    return signed


class ImageRepositoryClient:
    """Verifies and downloads bundles from one image repository.

    ``metadata_dir`` is the device's trust store: it must hold ``root.json``
    (the trusted root the device was provisioned with) and keeps the newest
    verified metadata, which is what makes rollback of metadata detectable.
    """

    def __init__(
        self,
        metadata_dir: Path,
        repository: str,
        fetch: FetchConfig | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        base = repository.rstrip("/")
        if is_local(base):
            base = local_path(base).resolve().as_uri()
        self._metadata_url = f"{base}/metadata/"
        self._targets_url = f"{base}/targets/"
        self._fetcher = RepositoryFetcher(fetch)
        self._updater: Updater | None = None

    @classmethod
    def provision(cls, metadata_dir: Path, trusted_root: Path, *, insist: bool = False) -> None:
        """Install ``trusted_root`` as the root of a new trust store (once).

        Only a valid, self-signed TUF root is installed; anything else is an
        :class:`UntrustedRoot` naming the file. A store that already exists
        keeps its trusted root. With ``insist`` the given root must also be
        the one that store was provisioned with: a user who names a root
        expects it to be the anchor, so a disagreeing store is refused
        (naming both), never silently preferred.
        """
        root = metadata_dir / "root.json"
        provisioned = metadata_dir / PROVISIONED_ROOT
        if root.exists():
            if insist:
                given = load_trusted_root(trusted_root)
                anchor = provisioned if provisioned.exists() else root
                stored = _signed_of(anchor)
                if stored is not None and stored != given.signed.to_dict():
                    raise UntrustedRoot(
                        f"the trusted root {trusted_root} disagrees with the trust store "
                        f"{metadata_dir}, provisioned with {anchor}; use that root, or a new "
                        "metadata directory to start over from this one"
                    )
            return
        raw, problem = _read_root(trusted_root)
        if raw is None:
            raise UntrustedRoot(
                f"cannot install the trusted root {trusted_root} into {metadata_dir}: it {problem}"
            )
        try:
            metadata_dir.mkdir(parents=True, exist_ok=True)
            provisioned.write_bytes(raw)
            shutil.copyfile(provisioned, root)
        except OSError as exc:
            raise UntrustedRoot(
                f"cannot install the trusted root {trusted_root} into {metadata_dir}: "
                f"{exc.strerror or exc}"
            ) from None

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (TUF client workflow, steps 5.3-5.6)."""
        self._updater = self._open_trusted_root()
        with refusals():
            self._updater.refresh()

    def _open_trusted_root(self) -> Updater:
        """An updater on the stored trusted root (client workflow 5.2), or a typed refusal.

        The root on disk is the anchor of all trust: a missing, corrupt or
        badly signed one cannot be repaired from the network, so it is refused
        by name (the device must be provisioned again), never reported as a
        repository that is merely unavailable.
        """
        root = self.metadata_dir / "root.json"
        try:
            return Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=self._metadata_url,
                target_base_url=self._targets_url,
                fetcher=self._fetcher,
                config=UpdaterConfig(),
                bootstrap=None,  # the trusted root is the one in metadata_dir
            )
        except FileNotFoundError:
            problem = "does not exist"
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        except tuf_exc.UnsignedMetadataError as exc:
            problem = f"is not signed by a threshold of its own root keys ({exc})"
        except DeserializationError as exc:
            cause = exc.__cause__ or exc
            problem = f"is not valid TUF root metadata ({cause})"
        except (tuf_exc.RepositoryError, ValueError, TypeError, KeyError) as exc:
            problem = f"is not a usable TUF root ({exc})"
        raise UntrustedRoot(
            " ".join(
                f"the trusted root {root} {problem}; provision the device again with "
                "its repository's root".split()
            )
        )

    def bundles(self) -> list[BundleTarget]:
        """Every bundle the verified top-level targets metadata lists."""
        if self._updater is None:
            self.refresh()
        # refresh() persists targets.json only after verifying it, so this copy is trusted.
        with refusals():
            targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        return [BundleTarget.from_target(t) for t in targets.signed.targets.values()]

    def target(self, target_path: str) -> BundleTarget:
        """The verified entry for one target path (what a director names)."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        with refusals():
            info = self._updater.get_targetinfo(target_path)
        if info is None:
            raise BundleNotFound(f"the image repository signed no target {target_path}")
        return BundleTarget.from_target(info)

    def choose(
        self,
        name: str,
        hardware_id: str,
        installed_counter: int = 0,
        version: str | None = None,
    ) -> BundleTarget:
        """The newest bundle called ``name`` for ``hardware_id`` (or that ``version``).

        Refuses a bundle for other hardware and one whose release counter is
        below ``installed_counter``.
        """
        named = [b for b in self.bundles() if b.name == name]
        if version is not None:
            named = [b for b in named if b.version == version]
        if not named:
            what = f"{name} {version}" if version else name
            raise BundleNotFound(f"the image repository lists no bundle {what}")
        fitting = [b for b in named if hardware_id in b.hardware_ids]
        if not fitting:
            released_for = sorted({h for b in named for h in b.hardware_ids})
            raise WrongHardware(
                f"{name} is released for hardware {', '.join(released_for)}, "
                f"not for this device's {hardware_id}"
            )
        best = newest_by_name(fitting, hardware_id)[name]
        check_counter(best, installed_counter)
        return best

    def download(
        self,
        bundle: BundleTarget,
        directory: Path,
        on_progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Download ``bundle`` into ``directory``, verified; returns the file's path.

        A partial download from an earlier try is resumed (HTTP Range). The file
        never grows past the signed length, and gets its final name only once
        python-tuf has checked its length and every signed hash.
        """
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / bundle.file_name
        partial = directory / (bundle.file_name + PARTIAL_SUFFIX)
        have = partial.stat().st_size if partial.exists() else 0
        if have > bundle.length:
            partial.unlink()
            have = 0
        free = shutil.disk_usage(directory).free
        if bundle.length - have > free:
            raise InsufficientSpace(
                f"{bundle.path} needs {bundle.length - have} more bytes; {free} are free"
            )
        url = self.target_url(bundle)
        # Every signed hash is computed while the file is written, as python-tuf
        # computes it (a resumed download's earlier bytes first): the bundle is read once.
        hashes = {algorithm: new_hash(algorithm) for algorithm in bundle.hashes}
        with refusals():
            stream = self._fetcher.open(url, have)
            received = _receive(stream, partial, bundle.length, on_progress, hashes.values())
        if received > bundle.length:
            partial.unlink()
            raise EndlessData(
                f"{bundle.path}: the server sent more than the signed {bundle.length} bytes"
            )
        if received < bundle.length:
            raise DownloadInterrupted(
                f"{bundle.path}: {received} of {bundle.length} bytes arrived; will resume"
            )
        for algorithm, computed in hashes.items():
            if computed.hexdigest() != bundle.hashes[algorithm]:
                partial.unlink()
                raise TamperedBundle(
                    f"{bundle.path} from {url}: what arrived differs from the signed length "
                    f"and hashes (its {algorithm} is {computed.hexdigest()}, signed "
                    f"{bundle.hashes[algorithm]})"
                )
        os.replace(partial, final)
        fsync_dir(directory)
        return final

    def adopt(self, early: EarlyCopy, bundle: BundleTarget, directory: Path) -> Path | None:
        """The copy started early (:mod:`agent.ota.early_copy`) as the verified ``bundle``, or None.

        Only a copy of the very file python-tuf's rules name for ``bundle`` in a
        directory repository, with the signed length and every signed hash of
        the bytes written, gets the bundle's name; any other is deleted (the
        caller then downloads the bundle as ever).
        """
        url = self.target_url(bundle)
        final = directory / bundle.file_name
        if not is_local(url) or not early.adopt(
            local_path(url).resolve(), bundle.length, bundle.hashes, final
        ):
            early.discard()
            return None
        # A partial download from an earlier try is of these bytes: the bundle is here whole.
        (directory / (bundle.file_name + PARTIAL_SUFFIX)).unlink(missing_ok=True)
        fsync_dir(directory)
        return final

    def target_url(self, bundle: BundleTarget) -> str:
        """Where the repository keeps ``bundle``, by python-tuf's rule (client workflow 5.7.3).

        With consistent snapshots (as the trusted root says) the file is named
        ``HASH.NAME`` after the first hash the repository listed, whatever its
        algorithm; without, it is the plain target path.
        """
        if self._updater is None:
            self.refresh()
        with refusals():
            root: Metadata[Root] = Metadata.from_file(str(self.metadata_dir / "root.json"))
        if not (root.signed.consistent_snapshot and UpdaterConfig().prefix_targets_with_hash):
            return f"{self._targets_url}{bundle.path}"
        first_hash = next(iter(bundle.hashes.values()))
        dirname, sep, basename = bundle.path.rpartition("/")
        return f"{self._targets_url}{dirname}{sep}{first_hash}.{basename}"


def check_counter(bundle: BundleTarget, installed_counter: int) -> None:
    """Refuse a bundle whose release counter is below the installed one."""
    if bundle.release_counter < installed_counter:
        raise ReleaseCounterDowngrade(
            f"{bundle.name} {bundle.version} has release counter {bundle.release_counter}, "
            f"below the installed {installed_counter}"
        )


def open_verified_manifest(path: Path, bundle: BundleTarget) -> CheckedManifest:
    """Read a downloaded bundle's manifest and check it says what the metadata signed.

    Checked without pydantic (``protocol.manifest_check``), so verifying builds no models.
    """
    try:
        with path.open("rb") as f:
            manifest = read_checked_manifest(f)
    except BundleFormatError as exc:
        raise ManifestMismatch(f"{bundle.path}: {exc}") from None
    if (problem := manifest_disagreement(manifest, bundle)) is not None:
        raise ManifestMismatch(f"{bundle.path}: {problem}")
    return manifest


def _receive(
    stream: Stream,
    partial: Path,
    length: int,
    on_progress: Callable[[int], None] | None = None,
    hashes: Iterable[Hasher] = (),
) -> int:
    """Write the stream into ``partial`` from its offset; returns the file's new size.

    ``hashes`` are fed every byte of the file: those already there up to the
    offset, then each chunk written. Stops one byte past ``length``: the caller
    refuses such a download.
    """
    hashes = list(hashes)
    with partial.open("r+b" if stream.offset else "wb") as out:
        while (done := out.tell()) < stream.offset:
            block = out.read(min(_READ_BLOCK, stream.offset - done))
            if not block:
                break
            for h in hashes:
                h.update(block)
        out.seek(stream.offset)
        out.truncate()
        received = written_back = stream.offset
        try:
            for chunk in stream.chunks:
                received += len(chunk)
                if received > length:
                    break
                out.write(chunk)
                for h in hashes:
                    h.update(chunk)
                if received - written_back >= _WRITEBACK_BLOCK:
                    out.flush()
                    start_writeback(out.fileno(), written_back, received - written_back)
                    written_back = received
                if on_progress is not None:
                    out.flush()
                    on_progress(received)
        except tuf_exc.SlowRetrievalError:
            raise
        except tuf_exc.DownloadError:
            # The connection broke mid-body: keep what arrived, the caller reports
            # an interrupted download and the next try resumes from here.
            received = out.tell()
        finally:
            close = getattr(stream.chunks, "close", None)
            if close is not None:
                close()  # releases the HTTP connection when we stopped early
            out.flush()
            os.fsync(out.fileno())
    return received
