"""Targets as TUF allows them: any hash algorithm python-tuf verifies, consistent snapshots or not.

Real repositories (the release tooling's, or built with ``tuf.api.metadata``),
real signatures, served by a real HTTP server; the agent's own code verifies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.ota import errors
from agent.ota.answers import Downloaded
from agent.ota.fetch_worker import resolve, run
from agent.ota.verify import VerifiedBundle, verify_bundle
from fleet_server.director import DirectorRepository
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.http_repo import RepositoryServer
from testbed.images import HARDWARE
from tests.support.tuf_repos import assign_with_hashes, plain_repository, resign_with_hashes

DEVICE = "pump-1"


@pytest.fixture(scope="module")
def director_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return init_keys(tmp_path_factory.mktemp("director-keys") / "keys")


def target_requests(server: RepositoryServer) -> list[str]:
    return [p for p, _ in server.faults.requests if "/targets/" in p]


def verify_from(repo: ImageRepository, http_repo: RepositoryServer, out: Path) -> VerifiedBundle:
    """The device's verification of pump-health from ``http_repo``, into ``out``."""
    return verify_bundle(
        trusted_root=repo.trusted_root_path,
        repository=http_repo.url,
        name="pump-health",
        hardware_id=HARDWARE,
        out_dir=out,
    )


def test_a_target_signed_only_with_sha512_is_verified_and_fetched_by_its_sha512_name(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    http_repo: RepositoryServer,
    tmp_path: Path,
) -> None:
    hashes = resign_with_hashes(repo, session_keys, bundles["v1"], ("sha512",))
    verified = verify_from(repo, http_repo, tmp_path / "out")
    assert verified.path.read_bytes() == bundles["v1"].read_bytes()
    assert verified.target.bundle_id == f"sha512:{hashes['sha512']}"
    assert verified.target.sha256 is None
    [url] = target_requests(http_repo)
    assert url.endswith(f"/targets/pump-health/{hashes['sha512']}.pump-health-1.0.0.bundle")


def test_a_target_signed_with_blake2b_256_is_verified_as_python_tuf_names_it(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    http_repo: RepositoryServer,
    tmp_path: Path,
) -> None:
    # python-tuf's one algorithm name beyond hashlib's: blake2b with a 32-byte digest.
    from tuf.api.metadata import TargetFile

    resign_with_hashes(repo, session_keys, bundles["v1"], ("sha256",))
    listed = repo.targets()
    [(path, entry)] = listed.items()
    digest = TargetFile.from_data(path, bundles["v1"].read_bytes(), ["blake2b-256"]).hashes
    # Stored under each hash's name, as a consistent-snapshot repository must.
    dirname, _, basename = path.rpartition("/")
    shutil.copyfile(
        bundles["v1"], repo.targets_dir / dirname / f"{digest['blake2b-256']}.{basename}"
    )
    listed[path] = TargetFile(
        entry.length, {**entry.hashes, **digest}, path, entry.unrecognized_fields
    )
    repo.set_targets(session_keys, listed)
    verified = verify_from(repo, http_repo, tmp_path / "out")
    assert verified.path.read_bytes() == bundles["v1"].read_bytes()
    listed[path] = TargetFile(
        entry.length, {**entry.hashes, "blake2b-256": "0" * 64}, path, entry.unrecognized_fields
    )
    repo.set_targets(session_keys, listed)
    shutil.copyfile(bundles["v1"], repo.targets_dir / dirname / f"{'0' * 64}.{basename}")
    with pytest.raises(
        errors.TamperedBundle, match=r"its blake2b-256 is [0-9a-f]{64}, signed 0+\)"
    ):
        verify_from(repo, http_repo, tmp_path / "out2")


def test_a_download_that_matches_one_signed_hash_but_not_another_is_refused(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    http_repo: RepositoryServer,
    tmp_path: Path,
) -> None:
    # Every signed hash is checked, not only the one that names the file: the
    # release keys sign a sha256 the bytes have and a sha512 they do not.
    from tuf.api.metadata import TargetFile

    resign_with_hashes(repo, session_keys, bundles["v1"], ("sha256", "sha512"))
    listed = repo.targets()
    [(path, entry)] = listed.items()
    wrong = {**entry.hashes, "sha512": "0" * 128}
    listed[path] = TargetFile(entry.length, wrong, path, entry.unrecognized_fields)
    repo.set_targets(session_keys, listed)
    with pytest.raises(errors.TamperedBundle, match="differs from the signed length and hashes"):
        verify_from(repo, http_repo, tmp_path / "out")


def test_a_target_signed_with_an_algorithm_the_device_cannot_verify_is_refused_up_front(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    http_repo: RepositoryServer,
    tmp_path: Path,
) -> None:
    from tuf.api.metadata import TargetFile

    listed = repo.targets()
    [(path, entry)] = listed.items()
    listed[path] = TargetFile(
        entry.length, {**entry.hashes, "sha3-999": "00"}, path, entry.unrecognized_fields
    )
    repo.set_targets(session_keys, listed)
    with pytest.raises(errors.UntrustedMetadata, match="'sha3-999', which this device cannot"):
        verify_from(repo, http_repo, tmp_path / "out")
    assert target_requests(http_repo) == [], "nothing is downloaded"


@pytest.mark.parametrize("consistent", [False, True])
def test_target_urls_follow_the_roots_consistent_snapshot_setting(
    consistent: bool, session_keys: KeyStore, bundles: dict[str, Path], tmp_path: Path
) -> None:
    repo_dir = tmp_path / "repo"
    root = plain_repository(repo_dir, session_keys, [bundles["v1"]], consistent_snapshot=consistent)
    server = RepositoryServer(repo_dir)
    try:
        verified = verify_bundle(
            trusted_root=root,
            repository=server.url,
            name="pump-health",
            hardware_id=HARDWARE,
            out_dir=tmp_path / "out",
        )
        [url] = target_requests(server)
    finally:
        server.close()
    assert verified.path.read_bytes() == bundles["v1"].read_bytes()
    name = "pump-health-1.0.0.bundle"
    expected = f"{verified.target.sha256}.{name}" if consistent else name
    assert url == f"/targets/pump-health/{expected}"


def test_a_repository_without_consistent_snapshots_signing_sha512_only_is_installable(
    session_keys: KeyStore, bundles: dict[str, Path], tmp_path: Path
) -> None:
    repo_dir = tmp_path / "repo"
    root = plain_repository(
        repo_dir,
        session_keys,
        [bundles["v1"], bundles["v2"]],
        consistent_snapshot=False,
        algorithms=("sha512",),
    )
    verified = verify_bundle(
        trusted_root=root,
        repository=str(repo_dir),
        name="pump-health",
        hardware_id=HARDWARE,
        out_dir=tmp_path / "out",
    )
    assert verified.manifest.version == "2.0.0"
    assert verified.target.bundle_id.startswith("sha512:")


def director_config(
    tmp_path: Path, repo: ImageRepository, director: DirectorRepository
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "hardware_id": HARDWARE,
            "data_dir": str(tmp_path / "device"),
            "image_repository": {"url": str(repo.path), "root": str(repo.trusted_root_path)},
            "director": {"url": str(director.path), "root": str(director.trusted_root_path)},
        }
    )


@pytest.fixture
def director(tmp_path: Path, director_keys: KeyStore) -> DirectorRepository:
    d = DirectorRepository(tmp_path / "director")
    d.create(director_keys)
    return d


def test_a_director_assignment_by_sha512_of_a_sha512_only_bundle_installs(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    director: DirectorRepository,
    director_keys: KeyStore,
    tmp_path: Path,
) -> None:
    hashes = resign_with_hashes(repo, session_keys, bundles["v1"], ("sha512",))
    released = _released(repo)
    assign_with_hashes(director, director_keys, DEVICE, HARDWARE, released, hashes)
    config = director_config(tmp_path, repo, director)
    answer = run("download", config, 0, expect=f"sha512:{hashes['sha512']}")
    assert isinstance(answer, Downloaded), answer
    assert Path(answer.path).read_bytes() == bundles["v1"].read_bytes()


def test_director_and_image_repository_must_share_a_hash_algorithm_and_agree(
    repo: ImageRepository,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    director: DirectorRepository,
    director_keys: KeyStore,
    tmp_path: Path,
) -> None:
    hashes = resign_with_hashes(repo, session_keys, bundles["v1"], ("sha256", "sha512"))
    released = _released(repo)
    config = director_config(tmp_path, repo, director)
    # Naming the bundle by one of its signed hashes is enough...
    assign_with_hashes(
        director, director_keys, DEVICE, HARDWARE, released, {"sha512": hashes["sha512"]}
    )
    target, _ = resolve(config, 0)
    assert target is not None and target.bundle_id == f"sha512:{hashes['sha512']}"
    # ...but a wrong value for a shared algorithm is refused,
    wrong = {"sha256": hashes["sha256"], "sha512": "0" * 128}
    assign_with_hashes(director, director_keys, DEVICE, HARDWARE, released, wrong)
    with pytest.raises(errors.DirectorMismatch, match="length/hash differ"):
        resolve(config, 0)
    # ...and so is an entry with no algorithm in common (nothing ties it to the signed bytes).
    assign_with_hashes(director, director_keys, DEVICE, HARDWARE, released, {"blake2b": "0" * 128})
    with pytest.raises(errors.DirectorMismatch, match="length/hash differ"):
        resolve(config, 0)


def _released(repo: ImageRepository):  # type: ignore[no-untyped-def]
    """The one released bundle, read without assuming it is signed with sha256."""
    from fleet_server.release.repository import ReleasedBundle

    [(path, entry)] = repo.targets().items()
    custom = entry.custom or {}
    return ReleasedBundle(
        target_path=path,
        name=custom["name"],
        version=custom["version"],
        release_counter=custom["release_counter"],
        hardware_ids=tuple(custom["hardware_ids"]),
        sha256=entry.hashes.get("sha256", ""),
        length=entry.length,
    )
