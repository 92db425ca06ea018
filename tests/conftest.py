"""Shared fixtures: sample models, release keys, bundles and image repositories."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.fleet import reap_agents, running_agents
from testbed.http_repo import RepositoryServer
from testbed.images import MODELS, make_bundle


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of v1 (1.0.0) and v2 (2.0.0), built once per test session."""
    tmp = tmp_path_factory.mktemp("bundles")
    return {"v1": make_bundle(tmp, "v1", "1.0.0"), "v2": make_bundle(tmp, "v2", "2.0.0")}


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys")


@pytest.fixture
def repo(tmp_path: Path, session_keys: KeyStore, bundles: dict[str, Path]) -> ImageRepository:
    """An image repository with v1 released."""
    repository = ImageRepository(tmp_path / "repo")
    repository.create(session_keys)
    repository.add_bundle(bundles["v1"], session_keys)
    return repository


@pytest.fixture
def http_repo(repo: ImageRepository) -> Iterator[RepositoryServer]:
    server = RepositoryServer(repo.path)
    yield server
    server.close()


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test() -> Iterator[None]:
    # Agents of wider-scoped fixtures (a module's agent) were started before this test
    # began and outlive it on purpose; the fixture that started them stops them.
    before = running_agents()
    yield
    reap_agents(keep=before)


@pytest.fixture(autouse=True, scope="session")
def _no_agent_outlives_the_session() -> Iterator[None]:
    yield
    reap_agents()
