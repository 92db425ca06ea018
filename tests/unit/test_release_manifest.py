"""The image repository hands out a released bundle's manifest (drift's baselines come from it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.release.repository import ImageRepository
from protocol.bundle import read_manifest


def test_the_manifest_of_a_released_bundle_is_read_from_the_repository(
    repo: ImageRepository, bundles: dict[str, Path]
) -> None:
    [released] = repo.bundles()
    with bundles["v1"].open("rb") as source:
        expected = read_manifest(source)
    manifest = repo.read_manifest(released.target_path, released.sha256)
    assert manifest == expected
    assert (manifest.name, manifest.version) == (released.name, released.version)


def test_a_bundle_the_repository_does_not_hold_is_an_os_error(repo: ImageRepository) -> None:
    [released] = repo.bundles()
    with pytest.raises(FileNotFoundError):
        repo.read_manifest(released.target_path, "0" * 64)
