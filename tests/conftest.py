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

# The helpers in tests/support assert too: their failures explained as a test's are.
pytest.register_assert_rewrite("tests.support")

# -- the order ``make test`` hands the modules to its processes -------------------------------
#
# ``--dist loadfile --no-loadscope-reorder`` runs each module whole in one process and hands
# the modules out in the order collected. The longest modules are collected first, longest
# first, so that no process begins one of them when the others are nearly done; the rest
# keep their order. Seconds on a quiet two-core machine (``--durations``); a module missing
# here, or renamed, only loses its place at the front.
LONGEST: tuple[str, ...] = (
    "tests/e2e/test_readme_walkthrough.py",  # 221
    "tests/e2e/test_sim_scenarios.py",  # 4 runs of 40-50
    "tests/integration/test_sim_server_url.py",  # 4 runs of 30-45
    "tests/e2e/test_hybrid_convergence.py",  # 130
    "tests/e2e/test_rollout_story.py",  # 130
    "tests/e2e/test_readme.py",  # make demo, 120
    "tests/e2e/test_sim_run_options.py",  # 4 runs of 20-40
    "tests/integration/test_sim_server_url_refusals.py",  # 15 runs of 5-40
    "tests/e2e/test_sim_scenarios_in_detail.py",  # 2 runs of 40-50
    "tests/integration/test_api_fuzz.py",
    "tests/e2e/test_hybrid_faults.py",
    "tests/integration/test_demo.py",
    "tests/integration/test_agent_install.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: n for n, module in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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
