"""The published-releases rules (no database): the row <-> bundle mapping and refused pushes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet_server.errors import Conflict
from fleet_server.published.rules import (
    PushConflict,
    ReleaseError,
    check_push,
    release_row,
    released_bundle,
    safe_relative,
)
from fleet_server.release.repository import ReleasedBundle

BUNDLE = ReleasedBundle(
    "kws/kws-1.2.0.bundle",
    "kws",
    "1.2.0",
    7,
    ("rpi4", "jetson"),
    "ab" * 32,
    4096,
)


def test_a_bundle_and_its_row_map_both_ways() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    row = release_row(BUNDLE, at)
    assert row.target_path == "kws/kws-1.2.0.bundle"
    assert row.hardware_ids == ["rpi4", "jetson"]
    assert row.released_at == at
    assert row.yanked_at is None
    assert released_bundle(row) == BUNDLE


def test_a_re_release_maps_to_a_row_without_the_re_release_note() -> None:
    re_released = replace(BUNDLE, re_release_of="1.0.0")
    assert released_bundle(release_row(re_released, datetime.now(UTC))) == BUNDLE


@pytest.mark.parametrize("path", ["/etc/passwd", "metadata/../x", "other/file", ""])
def test_paths_outside_metadata_and_targets_are_refused(path: str) -> None:
    with pytest.raises(ReleaseError, match="is not a path under metadata/ or targets/"):
        safe_relative(path)


def test_published_versioned_metadata_never_changes(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "2.targets.json").write_bytes(b"old")
    check_push(tmp_path, {"metadata/2.targets.json": b"old"})  # the same bytes again: fine
    check_push(tmp_path, {"metadata/timestamp.json": b"new"})  # unversioned: may change
    with pytest.raises(PushConflict, match="differs from the published one") as refused:
        check_push(tmp_path, {"metadata/2.targets.json": b"new"})
    assert isinstance(refused.value, Conflict)


def test_a_path_cannot_be_both_a_file_and_a_folder(tmp_path: Path) -> None:
    (tmp_path / "targets" / "kws").mkdir(parents=True)
    with pytest.raises(PushConflict, match="targets/kws is a directory on the server"):
        check_push(tmp_path, {"targets/kws": b"x"})
    with pytest.raises(PushConflict, match="targets/a is a file, so targets/a/b cannot be under"):
        check_push(tmp_path, {"targets/a": b"x", "targets/a/b": b"y"})
