"""The hybrid plan on a real agent: signed in its director metadata, refused by name, expired.

Real agent processes, a real director and image repository over HTTP, real
signatures and models. A refused plan never keeps the assignment from
installing; a valid one is followed (an event, the agent's metrics), read
again after a restart, and dropped when it expires.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import urllib3
from tuf.api.metadata import TargetFile

from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from protocol.director_marks import HYBRID_PLAN
from protocol.hybrid import HybridPlan
from testbed.fleet import HARDWARE, AgentProcess, Fleet, escalate_plan
from testbed.images import make_bundle

pytestmark = pytest.mark.integration

DEVICE = "pump-9"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("built"), "v1", "1.0.0")


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[KeyStore, KeyStore]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def make_plan(plan_id: str, ttl: timedelta = timedelta(hours=1)) -> HybridPlan:
    return escalate_plan(DEVICE, plan_id, ttl)


def plan_target(plan: HybridPlan, signed_as: HybridPlan | None = None) -> TargetFile:
    """The plan's target; ``signed_as``: another plan whose length and hash it carries."""
    body = (signed_as or plan).canonical_json()
    return TargetFile(
        length=len(body),
        hashes={"sha256": hashlib.sha256(body).hexdigest()},
        path=f"hybrid-plan/{plan.plan_id}.json",
        unrecognized_fields={"custom": {HYBRID_PLAN: plan.canonical_json().decode()}},
    )


def sign(fleet: Fleet, assigned: ReleasedBundle, *plans: TargetFile) -> None:
    """The device's director targets: its assignment and ``plans``."""
    targets = {
        assigned.target_path: TargetFile(
            length=assigned.length,
            hashes={"sha256": assigned.sha256},
            path=assigned.target_path,
            unrecognized_fields={"custom": assignment_custom(DEVICE, HARDWARE, assigned)},
        ),
        **{t.path: t for t in plans},
    }
    fleet.director.device(DEVICE).sign(fleet.director_keys, targets, None)


def events(agent: AgentProcess, kind: str) -> list[dict[str, object]]:
    return [e for e in agent.events() if e["event"] == kind]


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def metrics(url: str) -> str:
    response = urllib3.request("GET", f"{url}/metrics")
    assert response.status == 200
    return response.data.decode()


def start(fleet: Fleet) -> tuple[AgentProcess, str]:
    agent = AgentProcess(fleet.agent_config(DEVICE))
    return agent, agent.wait_ready()


def test_a_refused_plan_keeps_the_assignment_and_a_signed_one_is_followed_across_a_restart(
    fleet: Fleet, v1: Path
) -> None:
    released = fleet.release(v1)
    bolder = make_plan("p-000000000001").model_copy(update={"tau": 0.99})
    tampered = plan_target(make_plan("p-000000000001"), signed_as=bolder)
    sign(fleet, released, tampered)
    agent, url = start(fleet)
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
    agent.wait_for("the plan refused", lambda: bool(events(agent, "plan-refused")))
    [refused] = events(agent, "plan-refused")
    assert refused["reason"] == "plan-hash-mismatch", refused
    assert "p-000000000001" in str(refused["message"])
    assert not events(agent, "plan-followed")
    time.sleep(1.0)  # more polls: the same refusal is reported once
    assert len(events(agent, "plan-refused")) == 1
    assert 'edgefleet_agent_plan_refusals_total{reason="plan-hash-mismatch"} 1.0' in metrics(url)

    plan = make_plan("p-000000000002")
    sign(fleet, released, plan_target(plan))  # a new plan alone: the bundle is unchanged
    agent.wait_for("the plan followed", lambda: bool(events(agent, "plan-followed")))
    [followed] = events(agent, "plan-followed")
    assert (followed["plan"], followed["mode"]) == ("p-000000000002", "escalate")
    assert followed["expires_at"] == plan.expires_at.timestamp()
    assert (
        'edgefleet_agent_hybrid_plan_info{mode="escalate",plan_id="p-000000000002"} 1.0'
        in metrics(url)
    )
    assert installed(agent) == "1.0.0"
    assert agent.stop() == 0

    # After a restart the plan is read again from the director metadata.
    agent, url = start(fleet)
    agent.wait_for("the plan followed again", lambda: len(events(agent, "plan-followed")) == 2)
    assert events(agent, "plan-followed")[-1]["plan"] == "p-000000000002"
    assert agent.stop() == 0


def test_a_plan_is_dropped_when_it_expires_without_asking_the_director(
    fleet: Fleet, v1: Path
) -> None:
    released = fleet.release(v1)
    agent, url = start(fleet)
    sign(fleet, released, plan_target(make_plan("p-000000000003", ttl=timedelta(seconds=8))))
    agent.wait_for("the plan followed", lambda: bool(events(agent, "plan-followed")))
    agent.wait_for("the plan expired", lambda: bool(events(agent, "plan-refused")))
    [expired] = events(agent, "plan-refused")
    assert (expired["reason"], expired["plan"]) == ("plan-expired", "p-000000000003")
    assert 'edgefleet_agent_plan_refusals_total{reason="plan-expired"} 1.0' in metrics(url)
    assert "edgefleet_agent_hybrid_plan_info{" not in metrics(url)
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
    assert agent.stop() == 0
