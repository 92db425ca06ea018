"""The poll gate: no fetcher child while nothing changed, the child on any change or doubt.

Real parts: a director and an image repository served over HTTP, the real
fetcher child process (python-tuf, real signatures). Children are counted
where they are started (:meth:`ProcessFetcher._output`).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Collection, Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.ota.answers import (
    Assigned,
    NoShadow,
    PlanRead,
    Refused,
    ShadowAnswer,
    Unassigned,
    Unavailable,
)
from agent.ota.parts import ProcessFetcher
from agent.ota.poll_gate import PollGate, trust_dirs
from fleet_server.director import DirectorRepository
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ExpiryPolicy, ReleasedBundle
from protocol.hybrid import HybridPlan
from testbed.fleet import AgentProcess, Fleet, escalate_plan
from testbed.http_repo import Faults
from testbed.images import make_bundle

pytestmark = pytest.mark.integration

DEVICE = "gate-1"
T = TypeVar("T")


class CountedFetcher(ProcessFetcher):
    """The real child-process fetcher, counting the children it starts."""

    children = 0

    async def _output(
        self, command: str, installed_counter: int, *extra: str
    ) -> tuple[str, int | None]:
        self.children += 1
        return await super()._output(command, installed_counter, *extra)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {"v1": make_bundle(tmp, "v1", "1.0.0"), "v2": make_bundle(tmp, "v2", "2.0.0")}


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[KeyStore, KeyStore]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def gate_of(fleet: Fleet) -> tuple[PollGate, CountedFetcher]:
    path = fleet.agent_config(DEVICE)
    fetcher = CountedFetcher(path)
    return PollGate(fetcher, AgentConfig.load(path)), fetcher


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def make_plan(plan_id: str, ttl: timedelta = timedelta(hours=1)) -> HybridPlan:
    return escalate_plan(DEVICE, plan_id, ttl)


def released(fleet: Fleet, built: dict[str, Path]) -> dict[str, ReleasedBundle]:
    return {name: fleet.release(path) for name, path in built.items()}


def shadow(gate: PollGate, counter: int, known: Collection[str] = ()) -> ShadowAnswer:
    return run(gate.shadow(counter, known))


def test_a_poll_with_nothing_new_starts_no_child_and_answers_the_same(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    fleet.director.sign_plan(fleet.director_keys, DEVICE, make_plan("p1"))
    gate, fetcher = gate_of(fleet)

    first = run(gate.check(0))
    assert isinstance(first, Assigned) and first.target.version == "1.0.0"
    plan = run(gate.plan())
    assert isinstance(plan, PlanRead) and plan.plan is not None and plan.plan.plan_id == "p1"
    assert isinstance(shadow(gate, 0), NoShadow)
    assert fetcher.children == 3

    for _ in range(3):
        assert run(gate.check(0)) == first
        assert run(gate.plan()) == plan
        assert isinstance(shadow(gate, 0), NoShadow)
    assert fetcher.children == 3, "a poll with nothing new started a child"
    assert gate.repeated == 9

    # Other inputs (an install moved the counter on, another shadow known): the child.
    assert run(gate.check(1_000)) == first
    assert isinstance(shadow(gate, 0, ["sha256:" + "0" * 64]), NoShadow)
    assert fetcher.children == 5

    # A new agent (a restart) keeps nothing: its first poll of each kind runs the child.
    again, fetcher_again = gate_of(fleet)
    assert run(again.check(0)) == first
    assert fetcher_again.children == 1


def test_any_change_at_the_director_or_the_image_repository_runs_the_child(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    gate, fetcher = gate_of(fleet)
    assert isinstance(run(gate.check(0)), Assigned)
    assert isinstance(run(gate.plan()), PlanRead)
    children = fetcher.children

    def asked(kind: str) -> object:
        nonlocal children
        answer = run(gate.check(0)) if kind == "check" else run(gate.plan())
        assert fetcher.children == children + 1, f"{kind}: no child after a change"
        children = fetcher.children
        return answer

    fleet.assign(DEVICE, bundles["v2"])  # a new assignment
    answer = asked("check")
    assert isinstance(answer, Assigned) and answer.target.version == "2.0.0"

    fleet.director.refresh_timestamp(fleet.director_keys, DEVICE)  # re-signed, nothing else
    asked("check")
    asked("plan")

    fleet.director.sign_plan(fleet.director_keys, DEVICE, make_plan("p2"))  # a new plan
    plan = asked("plan")
    assert isinstance(plan, PlanRead) and plan.plan is not None and plan.plan.plan_id == "p2"

    (fleet.root / "more").mkdir()
    fleet.release(make_bundle(fleet.root / "more", "v1", "1.0.1"))  # the image repository
    asked("check")

    fleet.director.unassign(fleet.director_keys, DEVICE)
    assert isinstance(asked("check"), Unassigned)
    assert run(gate.check(0)) == Unassigned()  # kept again once the child answered
    assert fetcher.children == children


def test_expired_metadata_is_refused_by_the_child_the_gate_never_hides_it(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    short = DirectorRepository(fleet.director.path, ExpiryPolicy(timestamp=timedelta(seconds=8)))
    short.refresh_timestamp(fleet.director_keys, DEVICE)
    gate, fetcher = gate_of(fleet)
    first = run(gate.check(0))
    assert isinstance(first, Assigned), "the timestamp expired before the first check"
    expires = json.loads((trust_dirs(gate.config)[1] / "timestamp.json").read_bytes())
    until = datetime.fromisoformat(expires["signed"]["expires"]).timestamp()
    if time.time() < until - 1:
        assert run(gate.check(0)) == first
        assert fetcher.children == 1
    time.sleep(max(0.0, until - time.time()) + 0.1)

    answer = run(gate.check(0))
    assert isinstance(answer, Refused) and answer.reason == "metadata-expired", answer
    assert fetcher.children == 2
    assert isinstance(run(gate.check(0)), Refused)  # a refusal is never kept
    assert fetcher.children == 3


def test_a_changed_timestamp_body_runs_the_child_which_refuses_it(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    gate, fetcher = gate_of(fleet)
    assert isinstance(run(gate.check(0)), Assigned)

    served = fleet.director.device(DEVICE).path / "metadata" / "timestamp.json"
    tampered = json.loads(served.read_bytes())
    tampered["signed"]["version"] += 1  # not signed by the director
    served.write_text(json.dumps(tampered))
    for n in (2, 3):  # and never kept: every poll asks again
        answer = run(gate.check(0))
        assert isinstance(answer, Refused) and answer.reason == "untrusted-metadata", answer
        assert fetcher.children == n


def test_an_unavailable_answer_is_never_repeated(fleet: Fleet, built: dict[str, Path]) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    gate, fetcher = gate_of(fleet)
    assert isinstance(run(gate.check(0)), Assigned)

    # The new timestamp arrives, the snapshot it names does not.
    fleet.assign(DEVICE, bundles["v2"])
    fleet.server.faults = Faults(match="snapshot", cut_after=0)
    for n in (2, 3):
        answer = run(gate.check(0))
        assert isinstance(answer, Unavailable), answer
        assert fetcher.children == n
    fleet.server.faults = Faults()
    answer = run(gate.check(0))
    assert isinstance(answer, Assigned) and answer.target.version == "2.0.0"
    assert fetcher.children == 4


def test_a_director_that_cannot_be_reached_runs_the_child(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    gate, fetcher = gate_of(fleet)
    assert isinstance(run(gate.check(0)), Assigned)
    fleet.server.close()
    answer = run(gate.check(0))
    assert isinstance(answer, Unavailable), answer
    assert fetcher.children == 2


def _questions(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        s.labels["answered_by"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgefleet_agent_update_questions_total"
    }


def test_an_idle_agent_polls_without_children_and_still_installs_what_is_assigned(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    try:
        url = agent.wait_ready()
        agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
        agent.wait_for("polls answered by the gate", lambda: _questions(url)["poll_gate"] >= 6)
        before = _questions(url)
        agent.wait_for(
            "more polls", lambda: _questions(url)["poll_gate"] >= before["poll_gate"] + 9
        )
        assert _questions(url)["fetcher"] == before["fetcher"], "an idle poll started a child"

        fleet.assign(DEVICE, bundles["v2"])
        agent.wait_for("v2 committed", lambda: installed(agent) == "2.0.0")
        assert _questions(url)["fetcher"] > before["fetcher"]
    finally:
        agent.stop()


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def test_a_clock_set_back_or_past_the_earliest_expiry_runs_the_child(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    bundles = released(fleet, built)
    fleet.assign(DEVICE, bundles["v1"])
    path = fleet.agent_config(DEVICE)
    fetcher = CountedFetcher(path)
    now = [time.time()]
    gate = PollGate(fetcher, AgentConfig.load(path), clock=lambda: now[0])
    first = run(gate.check(0))
    assert isinstance(first, Assigned)
    assert run(gate.check(0)) == first and fetcher.children == 1

    now[0] -= 3600  # the clock went back: whatever the gate knew, the child answers
    assert run(gate.check(0)) == first and fetcher.children == 2
    assert run(gate.check(0)) == first and fetcher.children == 2

    # The director's timestamp (one day) is the earliest expiry in the stores.
    stored = json.loads((trust_dirs(gate.config)[1] / "timestamp.json").read_bytes())
    now[0] = datetime.fromisoformat(stored["signed"]["expires"]).timestamp()
    assert run(gate.check(0)) == first and fetcher.children == 3
