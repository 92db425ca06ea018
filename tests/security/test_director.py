"""Uptane's director checks: the director chooses, the release keys vouch, counters never fall.

Real TUF metadata for the image repository and per-device director
repositories, real signatures, verified by the agent's own code path.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.ota import errors
from agent.ota.fetch_worker import resolve, resolve_shadow
from fleet_server.director import DirectorRepository
from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from protocol.director_marks import ROLLBACK_OF, SHADOW
from testbed.images import HARDWARE

DEVICE = "pump-1"


@pytest.fixture(scope="module")
def director_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return init_keys(tmp_path_factory.mktemp("director-keys") / "keys")


@pytest.fixture
def released(
    repo: ImageRepository, session_keys: KeyStore, bundles: dict[str, Path]
) -> dict[str, ReleasedBundle]:
    repo.add_bundle(bundles["v2"], session_keys)
    return {b.version: b for b in repo.bundles()}


@pytest.fixture
def director(tmp_path: Path, director_keys: KeyStore) -> DirectorRepository:
    d = DirectorRepository(tmp_path / "director")
    d.create(director_keys)
    return d


def agent_config(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    device: str = DEVICE,
    hardware: str = HARDWARE,
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": device,
            "hardware_id": hardware,
            "data_dir": str(tmp_path / f"device-{device}"),
            "image_repository": {"url": str(repo.path), "root": str(repo.trusted_root_path)},
            "director": {"url": str(director.path), "root": str(director.trusted_root_path)},
        }
    )


def test_assignment_of_a_signed_bundle_is_accepted(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    config = agent_config(tmp_path, repo, director)
    director.register(director_keys, DEVICE)
    assert resolve(config, 0)[0] is None  # nothing assigned yet
    director.assign(director_keys, DEVICE, HARDWARE, released["2.0.0"])
    target, _ = resolve(config, 0)
    assert target is not None and (target.version, target.sha256) == (
        "2.0.0",
        released["2.0.0"].sha256,
    )


def test_bundle_the_image_repository_never_signed_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    # Director key compromise alone: the attacker names a bundle of their own.
    evil = dataclasses.replace(
        released["2.0.0"],
        target_path="pump-health/pump-health-6.6.6.bundle",
        version="6.6.6",
        release_counter=6_006_006_999,
    )
    director.assign(director_keys, DEVICE, HARDWARE, evil)
    with pytest.raises(errors.BundleNotFound, match="never signed"):
        resolve(agent_config(tmp_path, repo, director), 0)


def test_director_entry_with_other_bytes_than_the_image_repository_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    swapped = dataclasses.replace(released["2.0.0"], sha256="0" * 64)
    director.assign(director_keys, DEVICE, HARDWARE, swapped)
    with pytest.raises(errors.DirectorMismatch, match="length/hash differ"):
        resolve(agent_config(tmp_path, repo, director), 0)


def test_replayed_older_assignment_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    config = agent_config(tmp_path, repo, director)
    director.assign(director_keys, DEVICE, HARDWARE, released["1.0.0"])
    old = tmp_path / "old-assignment"
    shutil.copytree(director.device(DEVICE).path, old)
    assert resolve(config, 0)[0].version == "1.0.0"  # type: ignore[union-attr]
    director.assign(director_keys, DEVICE, HARDWARE, released["2.0.0"])
    assert resolve(config, 0)[0].version == "2.0.0"  # type: ignore[union-attr]
    shutil.rmtree(director.device(DEVICE).path)
    shutil.copytree(old, director.device(DEVICE).path)
    with pytest.raises(errors.MetadataRollback):
        resolve(config, 0)


def test_director_entry_for_another_device_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    # Mix-and-match: the server hands pump-1 the metadata it signed for pump-2.
    director.assign(director_keys, "pump-2", HARDWARE, released["2.0.0"])
    shutil.copytree(director.device("pump-2").path, director.device(DEVICE).path)
    with pytest.raises(errors.WrongDevice, match="for device pump-2"):
        resolve(agent_config(tmp_path, repo, director), 0)


def test_director_entry_for_another_hardware_id_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> None:
    from testbed.images import make_bundle

    both = make_bundle(tmp_path, "v2", "3.0.0", hardware=(HARDWARE, "jetson-orin"))
    released = repo.add_bundle(both, session_keys)
    director.assign(director_keys, DEVICE, "jetson-orin", released)
    with pytest.raises(errors.WrongHardware, match="for hardware jetson-orin"):
        resolve(agent_config(tmp_path, repo, director), 0)


def test_expired_director_timestamp_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    stale = DirectorRepository(tmp_path / "director", now=datetime.now(UTC) - timedelta(days=3))
    stale.create(director_keys)
    stale.assign(director_keys, DEVICE, HARDWARE, released["2.0.0"])
    with pytest.raises(errors.MetadataExpired, match="timestamp"):
        resolve(agent_config(tmp_path, repo, stale), 0)


def test_director_cannot_roll_a_device_below_its_release_counter(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    director.assign(director_keys, DEVICE, HARDWARE, released["1.0.0"])
    with pytest.raises(errors.ReleaseCounterDowngrade, match="below the installed 2000000999"):
        resolve(agent_config(tmp_path, repo, director), 2_000_000_999)


def test_director_metadata_signed_by_another_key_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    released: dict[str, ReleasedBundle],
) -> None:
    thief = init_keys(tmp_path / "thief")
    forged = DirectorRepository(tmp_path / "forged")
    forged.create(thief)
    forged.assign(thief, DEVICE, HARDWARE, released["2.0.0"])
    shutil.copytree(forged.device(DEVICE).path, director.device(DEVICE).path)
    with pytest.raises(errors.UntrustedMetadata):
        resolve(agent_config(tmp_path, repo, director), 0)


def test_director_refuses_to_assign_a_bundle_for_other_hardware(
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    from fleet_server.release.repository import RepositoryError

    with pytest.raises(RepositoryError, match="not released for hardware esp32"):
        director.assign(director_keys, DEVICE, "esp32", released["2.0.0"])


def test_expiring_director_timestamps_are_re_signed(
    tmp_path: Path,
    repo: ImageRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    # Signed 20 hours ago: the timestamp (one day) expires in 4 hours.
    aging = DirectorRepository(tmp_path / "director", now=datetime.now(UTC) - timedelta(hours=20))
    aging.create(director_keys)
    aging.assign(director_keys, DEVICE, HARDWARE, released["2.0.0"])
    current = DirectorRepository(tmp_path / "director")
    assert current.refresh_expiring(director_keys, timedelta(hours=12)) == 1
    assert current.refresh_expiring(director_keys, timedelta(hours=12)) == 0
    assert current.device(DEVICE).timestamp_expires() > datetime.now(UTC) + timedelta(hours=23)
    target, _ = resolve(agent_config(tmp_path, repo, current), 0)
    assert target is not None and target.version == "2.0.0"


def test_a_shadow_is_signed_beside_the_assignment_with_its_mark_and_never_a_rollback(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    v1, v2 = released["1.0.0"], released["2.0.0"]
    director.assign(director_keys, DEVICE, HARDWARE, v1, shadow=v2)
    signed = director.signed(DEVICE)
    assert (signed.target_path, signed.shadow_path) == (v1.target_path, v2.target_path)
    metadata = director.device(DEVICE).path / "metadata"
    targets = json.loads((metadata / f"{signed.version}.targets.json").read_text())["signed"]
    assert targets["targets"][v2.target_path]["custom"][SHADOW] is True
    assert SHADOW not in targets["targets"][v1.target_path]["custom"]
    assert ROLLBACK_OF not in targets["targets"][v2.target_path]["custom"]
    # The device's own code reads the two apart: its assignment, and its shadow.
    config = agent_config(tmp_path, repo, director)
    assigned, _ = resolve(config, 0)
    shadow, _ = resolve_shadow(config, 0)
    assert assigned is not None and assigned.version == "1.0.0"
    assert shadow is not None and (shadow.version, shadow.sha256) == ("2.0.0", v2.sha256)
    # A device assigned nothing may hold a shadow alone; dropped, the metadata names nothing.
    director.unassign(director_keys, DEVICE, shadow=v2, hardware_id=HARDWARE)
    assert director.signed(DEVICE).target_path is None
    assert director.signed(DEVICE).shadow_path == v2.target_path
    director.unassign(director_keys, DEVICE)
    assert director.signed(DEVICE).shadow_path is None
    with pytest.raises(ValueError, match="never carries rollback_of"):
        assignment_custom(DEVICE, HARDWARE, v2, rollback_of="sha256:" + "0" * 64, shadow=True)
