"""Each attack from the TUF threat list against the image repository is refused.

Real signatures, real files, and for network attacks a real HTTP server.
"""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.ota import errors
from agent.ota.image_repository import ImageRepositoryClient, open_verified_manifest
from agent.ota.transport import FetchConfig
from agent.ota.verify import verify_bundle
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.http_repo import RepositoryServer
from testbed.images import HARDWARE


def verify(repo: ImageRepository, source: str, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    return verify_bundle(
        trusted_root=repo.trusted_root_path,
        repository=source,
        name="pump-health",
        hardware_id=kw.pop("hardware_id", HARDWARE),  # type: ignore[arg-type]
        out_dir=out,
        **kw,  # type: ignore[arg-type]
    )


def target_file(repo: ImageRepository) -> Path:
    [path] = list((repo.targets_dir / "pump-health").glob("*.bundle"))
    return path


def test_genuine_bundle_is_verified_from_a_directory(repo: ImageRepository, tmp_path: Path) -> None:
    verified = verify(repo, str(repo.path), tmp_path / "out")
    assert verified.manifest.version == "1.0.0"
    assert verified.path.read_bytes() == target_file(repo).read_bytes()
    assert not list((tmp_path / "out").glob("*.partial"))


def test_genuine_bundle_is_verified_over_http(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    verified = verify(repo, http_repo.url, tmp_path / "out")
    assert verified.target.release_counter == 1_000_000_999


def test_newest_release_is_chosen(
    repo: ImageRepository, session_keys: KeyStore, bundles: dict[str, Path], tmp_path: Path
) -> None:
    repo.add_bundle(bundles["v2"], session_keys)
    assert verify(repo, str(repo.path), tmp_path / "out").manifest.version == "2.0.0"


def test_tampered_bundle_is_refused(repo: ImageRepository, tmp_path: Path) -> None:
    path = target_file(repo)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(errors.TamperedBundle, match="differs from the signed"):
        verify(repo, str(repo.path), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.bundle")), "a refused bundle must not be kept"


def test_bundle_signed_by_unknown_keys_is_refused(
    repo: ImageRepository, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    # Arbitrary installation: an attacker with their own keys re-signs the repository,
    # including its 1.root.json; the device still trusts the root it was provisioned with.
    provisioned = tmp_path / "provisioned-root.json"
    shutil.copyfile(repo.trusted_root_path, provisioned)
    attacker = init_keys(tmp_path / "attacker")
    forged = ImageRepository(tmp_path / "forged")
    forged.create(attacker)
    forged.add_bundle(bundles["v2"], attacker)
    shutil.copytree(forged.path, repo.path, dirs_exist_ok=True)
    with pytest.raises(errors.UntrustedMetadata, match="not signed by enough trusted keys"):
        verify_bundle(
            trusted_root=provisioned,
            repository=str(repo.path),
            name="pump-health",
            hardware_id=HARDWARE,
            out_dir=tmp_path / "out",
        )


def test_rolled_back_metadata_is_refused(
    repo: ImageRepository, session_keys: KeyStore, bundles: dict[str, Path], tmp_path: Path
) -> None:
    old_metadata = tmp_path / "old-metadata"
    shutil.copytree(repo.metadata_dir, old_metadata)
    repo.add_bundle(bundles["v2"], session_keys)
    out = tmp_path / "out"
    assert verify(repo, str(repo.path), out).manifest.version == "2.0.0"
    # The attacker replays the older, validly signed metadata.
    shutil.rmtree(repo.metadata_dir)
    shutil.copytree(old_metadata, repo.metadata_dir)
    with pytest.raises(errors.MetadataRollback):
        verify(repo, str(repo.path), out)


def test_expired_timestamp_is_refused(
    tmp_path: Path, session_keys: KeyStore, bundles: dict[str, Path]
) -> None:
    # Indefinite freeze: the attacker keeps serving metadata that has since expired.
    frozen = ImageRepository(tmp_path / "repo", now=datetime.now(UTC) - timedelta(days=2))
    frozen.create(session_keys)
    frozen.add_bundle(bundles["v1"], session_keys)
    with pytest.raises(errors.MetadataExpired, match=r"timestamp\.json is expired"):
        verify(frozen, str(frozen.path), tmp_path / "out")


def test_refreshed_timestamp_is_accepted_again(
    tmp_path: Path, session_keys: KeyStore, bundles: dict[str, Path]
) -> None:
    repo = ImageRepository(tmp_path / "repo", now=datetime.now(UTC) - timedelta(days=2))
    repo.create(session_keys)
    repo.add_bundle(bundles["v1"], session_keys)
    ImageRepository(repo.path).refresh_timestamp(session_keys)
    assert verify(repo, str(repo.path), tmp_path / "out").manifest.version == "1.0.0"


def test_wrong_hardware_is_refused(repo: ImageRepository, tmp_path: Path) -> None:
    with pytest.raises(errors.WrongHardware, match=f"released for hardware {HARDWARE}"):
        verify(repo, str(repo.path), tmp_path / "out", hardware_id="jetson-nano")


def test_lower_release_counter_than_installed_is_refused(
    repo: ImageRepository, tmp_path: Path
) -> None:
    with pytest.raises(errors.ReleaseCounterDowngrade, match="below the installed 2000000999"):
        verify(repo, str(repo.path), tmp_path / "out", installed_counter=2_000_000_999)


def test_endless_data_from_a_directory_is_refused(repo: ImageRepository, tmp_path: Path) -> None:
    path = target_file(repo)
    with path.open("ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(errors.EndlessData, match="more than the signed"):
        verify(repo, str(repo.path), tmp_path / "out")


def test_endless_data_over_http_is_refused(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    http_repo.faults.match = "/targets/"
    http_repo.faults.extra_bytes = 10 * 1024 * 1024
    with pytest.raises(errors.EndlessData):
        verify(repo, http_repo.url, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.partial"))


def test_endless_metadata_is_refused(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    http_repo.faults.match = "timestamp.json"
    http_repo.faults.extra_bytes = 1024 * 1024
    with pytest.raises(errors.UpdateRefused) as refused:
        verify(repo, http_repo.url, tmp_path / "out")
    assert isinstance(refused.value, errors.EndlessData | errors.UntrustedMetadata)


def test_stalled_server_is_refused(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    http_repo.faults.match = "/targets/"
    http_repo.faults.stall_after = 1000
    fetch = FetchConfig(read_timeout=0.5, connect_timeout=2)
    with pytest.raises(errors.SlowRetrieval, match="stalled"):
        verify(repo, http_repo.url, tmp_path / "out", fetch=fetch)


def test_trickling_server_is_refused(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    # Slow retrieval below the read timeout: every byte arrives in time, but too slowly.
    http_repo.faults.match = "/targets/"
    http_repo.faults.trickle_delay = 0.05
    fetch = FetchConfig(read_timeout=5, min_bytes_per_second=1000, grace_seconds=0.5)
    with pytest.raises(errors.SlowRetrieval, match="below the minimum"):
        verify(repo, http_repo.url, tmp_path / "out", fetch=fetch)


def interrupted(repo: ImageRepository, http_repo: RepositoryServer, out: Path, at: int) -> None:
    """A download of the bundle into ``out`` cut after ``at`` bytes; the server then heals."""
    http_repo.faults.match = "/targets/"
    http_repo.faults.cut_after = at
    with pytest.raises(errors.DownloadInterrupted):
        verify(repo, http_repo.url, out)
    http_repo.faults.cut_after = None


def last_range(http_repo: RepositoryServer) -> str | None:
    return [r for p, r in http_repo.faults.requests if "/targets/" in p][-1]


def test_interrupted_download_resumes_with_range(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    size = target_file(repo).stat().st_size
    out = tmp_path / "out"
    interrupted(repo, http_repo, out, size // 3)
    assert [p.stat().st_size for p in out.glob("*.partial")] == [size // 3]
    verified = verify(repo, http_repo.url, out)
    assert verified.path.read_bytes() == target_file(repo).read_bytes()
    assert last_range(http_repo) == f"bytes={size // 3}-"


def test_a_resumed_download_whose_earlier_part_was_changed_is_refused(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    # The hashes are computed while the file is written: a resumed download
    # hashes the bytes already on disk too, so a change to them is caught.
    size = target_file(repo).stat().st_size
    out = tmp_path / "out"
    interrupted(repo, http_repo, out, size // 3)
    [partial] = out.glob("*.partial")
    data = bytearray(partial.read_bytes())
    data[len(data) // 2] ^= 0x01
    partial.write_bytes(bytes(data))
    with pytest.raises(errors.TamperedBundle, match=r"its sha256 is [0-9a-f]{64}, signed"):
        verify(repo, http_repo.url, out)
    assert last_range(http_repo) == f"bytes={size // 3}-"
    assert not list(out.glob("*.partial")) and not list(out.glob("*.bundle"))


def test_resume_against_a_server_without_range_restarts(
    repo: ImageRepository, http_repo: RepositoryServer, tmp_path: Path
) -> None:
    size = target_file(repo).stat().st_size
    out = tmp_path / "out"
    interrupted(repo, http_repo, out, size // 2)
    http_repo.faults.ignore_range = True
    assert verify(repo, http_repo.url, out).path.read_bytes() == target_file(repo).read_bytes()


def test_manifest_that_disagrees_with_signed_fields_is_refused(
    repo: ImageRepository, tmp_path: Path
) -> None:
    # The bytes match the signed hash, but the signed fields name other hardware than
    # the manifest inside (a release-tooling mistake or a crafted target entry).
    verified = verify(repo, str(repo.path), tmp_path / "out")
    signed = dataclasses.replace(verified.target, hardware_ids=(HARDWARE, "jetson-nano"))
    with pytest.raises(errors.TamperedBundle, match="differs from the signed metadata"):
        open_verified_manifest(verified.path, signed)


def test_unknown_bundle_name_is_reported(repo: ImageRepository, tmp_path: Path) -> None:
    store = tmp_path / "trust"
    ImageRepositoryClient.provision(store, repo.trusted_root_path)
    client = ImageRepositoryClient(store, str(repo.path))
    with pytest.raises(errors.BundleNotFound, match="no bundle conveyor-health"):
        client.choose("conveyor-health", HARDWARE)


def test_unreachable_repository_is_reported(repo: ImageRepository, tmp_path: Path) -> None:
    with pytest.raises(errors.RepositoryUnavailable):
        verify(
            repo,
            "http://127.0.0.1:9",
            tmp_path / "out",
            fetch=FetchConfig(connect_timeout=1, read_timeout=1),
        )
