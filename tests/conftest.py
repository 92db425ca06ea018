"""Shared fixtures: sample models, release keys, bundles and image repositories."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# ``--dist loadfile --no-loadscope-reorder`` hands out modules whole, in the order collected;
# each module is a unit of its own (``pytest_xdist_make_scheduler``), except the modules that
# run many real processes against wall-clock deadlines (a fleet of agents, the simulator's
# scenarios, the demo): they make up two lanes, each run one module after the other in one
# process, so that
# no more than two of them share the machine at once (three at once, on a loaded two-core
# machine, starved each other's servers past their deadlines). The lanes are collected first,
# then the other longest modules, longest first; the rest keep their order. Seconds on a
# quiet two-core machine (``--durations``); a module missing here, or renamed, only loses
# its place at the front.
REAL_TIME_LANES: tuple[tuple[str, ...], ...] = (
    (
        "tests/e2e/test_rollout_story.py",  # 130
        "tests/e2e/test_sim_scenarios.py",  # 4 runs of 40-50
        "tests/integration/test_demo.py",  # the fleet chapter, 100
        "tests/e2e/test_sim_run_options.py",  # 4 runs of 20-40
        "tests/e2e/test_hybrid_faults.py",
    ),
    (
        "tests/e2e/test_readme_walkthrough.py",  # 110
        "tests/integration/test_sim_server_url.py",  # 4 runs of 30-45
        "tests/e2e/test_hybrid_convergence.py",  # 130
        "tests/e2e/test_sim_scenarios_in_detail.py",  # 2 runs of 40-50
        "tests/e2e/test_readme.py",  # make demo, 120
    ),
)
LONGEST: tuple[str, ...] = (
    "tests/integration/test_sim_server_url_refusals.py",  # 15 runs of 5-40
    "tests/integration/test_api_fuzz.py",
    "tests/integration/test_agent_install.py",
)


_LANE = {module: n for n, modules in enumerate(REAL_TIME_LANES) for module in modules}
_PLACE = {module: i for modules in REAL_TIME_LANES for i, module in enumerate(modules)}
_RANK = {module: n for n, module in enumerate(LONGEST)}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, each lane of :data:`REAL_TIME_LANES` handed out as one file."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RealTimeLanes(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            lane = _LANE.get(module)
            return module if lane is None else f"real-time-lane-{lane + 1}"

    return RealTimeLanes(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> tuple[int, int, int]:
        module = item.nodeid.split("::")[0]
        if module in _LANE:
            return (0, _LANE[module], _PLACE[module])
        return (1, _RANK.get(module, len(_RANK)), 0)

    items.sort(key=order)


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
