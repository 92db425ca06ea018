"""A device whose assignment is cancelled keeps running what it installed.

Cancelling an assignment signs director metadata that names no target. The
real agent process reads it like any other answer: nothing is assigned, so it
installs nothing, and the model it runs stays installed and serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.release.keys import init_keys
from testbed.fleet import AgentProcess, Fleet
from tests.support.install_fleet import assert_slots_intact, field_rows, installed

pytestmark = pytest.mark.integration

DEVICE = "pump-unassigned"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, init_keys(tmp_path / "release"), init_keys(tmp_path / "director"))
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def trusted_director_targets(agent: AgentProcess) -> dict[str, object] | None:
    """The director targets the device last verified (``None`` before its first refresh)."""
    path = agent.data_dir / "trust" / "director" / "targets.json"
    try:
        return dict(json.loads(path.read_text())["signed"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def test_a_cancelled_assignment_leaves_the_installed_model_serving(
    fleet: Fleet, bundles: dict[str, Path]
) -> None:
    v1 = fleet.release(bundles["v1"])
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    url = agent.wait_ready()
    fleet.assign(DEVICE, v1)
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")

    # What the server signs when the assignment is cancelled: a target-less version.
    version = fleet.director.unassign(fleet.director_keys, DEVICE)

    def read_the_cancel() -> bool:
        targets = trusted_director_targets(agent)
        return targets is not None and targets["version"] == version

    agent.wait_for("the agent to verify the empty assignment", read_the_cancel)
    targets = trusted_director_targets(agent)
    assert targets is not None and targets["targets"] == {}
    answer = agent.infer(url, field_rows(1))
    assert answer.status == 200, answer.data
    body = json.loads(answer.data)
    assert body["parameters"]["stage"] == "active" and body["model_version"] == "1.0.0"
    assert installed(agent) == "1.0.0" and agent.journal()["phase"] == "idle"
    assert_slots_intact(agent.data_dir)
    events = [e["event"] for e in agent.events()]
    assert "rolled-back" not in events and "refused" not in events
    assert agent.stop() == 0
