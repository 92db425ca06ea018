"""Verify a bundle end to end: refresh metadata, choose, download, check the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.ota.early_copy import EarlyCopy
from agent.ota.image_repository import (
    BundleTarget,
    ImageRepositoryClient,
    open_verified_manifest,
)
from agent.ota.transport import FetchConfig
from protocol.manifest_check import CheckedManifest


@dataclass(frozen=True)
class VerifiedBundle:
    """A downloaded bundle whose bytes and manifest match the signed metadata."""

    path: Path
    target: BundleTarget
    manifest: CheckedManifest


def verify_bundle(
    *,
    trusted_root: Path,
    repository: str,
    name: str,
    hardware_id: str,
    out_dir: Path,
    metadata_dir: Path | None = None,
    installed_counter: int = 0,
    version: str | None = None,
    fetch: FetchConfig | None = None,
    early: EarlyCopy | None = None,
) -> VerifiedBundle:
    """Download the newest signed bundle ``name`` for ``hardware_id`` into ``out_dir``.

    ``metadata_dir`` keeps the trusted metadata between runs (default
    ``out_dir/.metadata``), so a later run detects rolled-back metadata.
    ``trusted_root`` must be the root that store was provisioned with.
    ``early`` is a copy into ``out_dir`` started before (:mod:`agent.ota.early_copy`):
    it is kept only if it is the chosen bundle's signed bytes, and deleted otherwise.
    Raises :class:`agent.ota.errors.UpdateRefused` with the reason.
    """
    try:
        store = metadata_dir or out_dir / ".metadata"
        ImageRepositoryClient.provision(store, trusted_root, insist=True)
        client = ImageRepositoryClient(store, repository, fetch)
        client.refresh()
        target = client.choose(name, hardware_id, installed_counter, version)
        path = None if early is None else client.adopt(early, target, out_dir)
        if path is None:
            path = client.download(target, out_dir)
        manifest = open_verified_manifest(path, target)
        return VerifiedBundle(path=path, target=target, manifest=manifest)
    finally:
        if early is not None:
            early.discard()
