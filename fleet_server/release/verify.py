"""Server-side verification of an image repository with python-tuf's client.

The server checks pushed metadata exactly as a device will (root, timestamp,
snapshot, targets; signatures, thresholds, versions, expiry) before it
publishes anything.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from fleet_server.release.repository import ReleasedBundle


class RepositoryVerificationError(Exception):
    """The repository's metadata does not verify."""


class DirectoryFetcher(FetcherInterface):
    """Reads ``file://`` URLs; a missing file is a 404, as ngclient expects."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = Path(url.removeprefix("file://"))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise tuf_exc.DownloadHTTPError(f"{path} does not exist", 404) from None
        return iter([data])


def verify_metadata(
    directory: Path, trusted_root: Path, trust_dir: Path | None = None
) -> list[ReleasedBundle]:
    """Refresh the repository in ``directory`` trusting ``trusted_root``; list its bundles.

    With ``trust_dir`` (the metadata accepted last time), older metadata is
    refused as a rollback, exactly as on a device; the store is updated only
    when verification succeeds.
    """
    with tempfile.TemporaryDirectory() as trust:
        work = Path(trust)
        if trust_dir is not None and (trust_dir / "root.json").exists():
            shutil.copytree(trust_dir, work, dirs_exist_ok=True)
        else:
            (work / "root.json").write_bytes(trusted_root.read_bytes())
        try:
            updater = Updater(
                metadata_dir=trust,
                metadata_base_url=(directory / "metadata").resolve().as_uri() + "/",
                fetcher=DirectoryFetcher(),
                bootstrap=None,
            )
            updater.refresh()
            targets: Metadata[Targets] = Metadata.from_file(str(work / "targets.json"))
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise RepositoryVerificationError(f"{type(exc).__name__}: {exc}") from None
        except (ValueError, TypeError, KeyError, OSError) as exc:  # e.g. a garbage root
            raise RepositoryVerificationError(f"unreadable metadata: {exc}") from None
        if trust_dir is not None:
            trust_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work, trust_dir, dirs_exist_ok=True)
    out = []
    for path, t in targets.signed.targets.items():
        custom = t.custom or {}
        try:
            out.append(
                ReleasedBundle(
                    target_path=path,
                    name=str(custom["name"]),
                    version=str(custom["version"]),
                    release_counter=int(custom["release_counter"]),
                    hardware_ids=tuple(custom["hardware_ids"]),
                    sha256=t.hashes["sha256"],
                    length=t.length,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryVerificationError(f"target {path} lacks bundle fields: {exc}") from None
    return out
