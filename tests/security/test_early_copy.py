"""A bundle copied before its metadata is verified is kept only if it is the signed bundle.

``edge-agent verify`` starts copying the bundle the repository's unverified
metadata names while python-tuf loads (agent.ota.early_copy). These tests
start that copy as the command does, then verify: the copy is kept only when
it is the verified target's file with the signed length and hashes; anything
else is deleted, the bundle is downloaded as ever, and every refusal still
happens. Real signatures, real files.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.ota import early_copy, errors
from agent.ota.early_copy import EarlyCopy
from agent.ota.image_repository import ImageRepositoryClient
from agent.ota.verify import VerifiedBundle, verify_bundle
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.images import HARDWARE


@pytest.fixture(autouse=True)
def idle_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy is started early only with an idle CPU: these tests run on busy ones too."""
    monkeypatch.setattr(early_copy, "_idle_cpu", lambda: True)


def target_file(repo: ImageRepository, name: str = "pump-health") -> Path:
    [path] = list((repo.targets_dir / name).glob("*.bundle"))
    return path


def verify_early(
    repo: ImageRepository, out: Path, copy_from: ImageRepository | None = None, **kw: object
) -> tuple[EarlyCopy, VerifiedBundle]:
    """Start the early copy (from ``copy_from``, default the same repository), then verify."""
    early = EarlyCopy.start(str((copy_from or repo).path), "pump-health", HARDWARE, out)
    assert early is not None
    try:
        verified = verify_bundle(
            trusted_root=repo.trusted_root_path,
            repository=str(repo.path),
            name="pump-health",
            hardware_id=HARDWARE,
            out_dir=out,
            early=early,
            **kw,  # type: ignore[arg-type]
        )
    except BaseException:
        assert not list(out.glob(".*.early")), "an early copy must not outlive a refusal"
        raise
    return early, verified


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != ".metadata")


def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the early copy should have been kept")

    monkeypatch.setattr(ImageRepositoryClient, "download", refuse)


def test_the_signed_bundle_copied_early_is_kept(
    repo: ImageRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_download(monkeypatch)
    out = tmp_path / "out"
    _, verified = verify_early(repo, out)
    assert verified.manifest.version == "1.0.0"
    assert verified.path.read_bytes() == target_file(repo).read_bytes()
    assert leftovers(out) == [verified.path.name]


def test_a_tampered_bundle_copied_early_is_deleted_and_refused(
    repo: ImageRepository, tmp_path: Path
) -> None:
    path = target_file(repo)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length: only the hash tells
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(errors.TamperedBundle, match="differs from the signed"):
        verify_early(repo, out)
    assert leftovers(out) == []


def test_a_copy_of_another_repositorys_bundle_is_not_kept(
    repo: ImageRepository, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    # The unverified metadata can name any file: an attacker's repository with its own
    # keys and bundle. The copy is of another file than the verified target's: deleted,
    # and the signed bundle downloaded instead.
    attacker = init_keys(tmp_path / "attacker")
    forged = ImageRepository(tmp_path / "forged")
    forged.create(attacker)
    forged.add_bundle(bundles["v2"], attacker)
    out = tmp_path / "out"
    _, verified = verify_early(repo, out, copy_from=forged)
    assert verified.manifest.version == "1.0.0"
    assert verified.path.read_bytes() == target_file(repo).read_bytes()
    assert leftovers(out) == [verified.path.name]


def test_the_same_bytes_under_another_name_are_not_kept(
    repo: ImageRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy is kept only if it was read from the file python-tuf's rules name.
    mirror = ImageRepository(tmp_path / "mirror")
    shutil.copytree(repo.path, mirror.path)
    downloaded: list[str] = []
    original = ImageRepositoryClient.download

    def download(self: ImageRepositoryClient, bundle: object, *args: object) -> Path:
        downloaded.append(str(bundle))
        return original(self, bundle, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageRepositoryClient, "download", download)
    out = tmp_path / "out"
    _, verified = verify_early(repo, out, copy_from=mirror)
    assert len(downloaded) == 1
    assert verified.path.read_bytes() == target_file(repo).read_bytes()
    assert leftovers(out) == [verified.path.name]


def test_expired_metadata_is_refused_and_the_early_copy_deleted(
    tmp_path: Path, session_keys: KeyStore, bundles: dict[str, Path]
) -> None:
    frozen = ImageRepository(tmp_path / "repo", now=datetime.now(UTC) - timedelta(days=2))
    frozen.create(session_keys)
    frozen.add_bundle(bundles["v1"], session_keys)
    out = tmp_path / "out"
    with pytest.raises(errors.MetadataExpired, match=r"timestamp\.json is expired"):
        verify_early(frozen, out)
    assert leftovers(out) == []


def test_wrong_hardware_and_downgrade_are_refused_with_an_early_copy(
    repo: ImageRepository, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(errors.ReleaseCounterDowngrade):
        verify_early(repo, out, installed_counter=2_000_000_999)
    assert leftovers(out) == []
    early = EarlyCopy.start(str(repo.path), "pump-health", "jetson-nano", out)
    assert early is None  # nothing listed for that hardware: nothing copied


def test_a_repository_on_a_web_server_is_not_copied_early(tmp_path: Path) -> None:
    web = "https://updates.example/repo"
    assert EarlyCopy.start(web, "pump-health", HARDWARE, tmp_path) is None


def test_unreadable_metadata_means_no_early_copy(repo: ImageRepository, tmp_path: Path) -> None:
    (repo.metadata_dir / "timestamp.json").write_text("{not json")
    assert EarlyCopy.start(str(repo.path), "pump-health", HARDWARE, tmp_path / "out") is None


def test_no_idle_cpu_means_no_early_copy(
    repo: ImageRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(early_copy, "_idle_cpu", lambda: False)
    assert EarlyCopy.start(str(repo.path), "pump-health", HARDWARE, tmp_path / "out") is None
