"""A fleet rollback squares with rollback protection: one step back, to exactly the previous bundle.

A director may name, for one device, the bundle that device committed right
before the one it runs (its other A/B slot still holds it), marked as a
rollback of the installed bundle. The device switches back without a download,
never retries the bundle it left, and keeps its release counter as the floor
for everything else. Each other attempt below the counter is an attack and is
refused, naming what was refused.

Real image repository and director (release tooling, real signatures) over a
real HTTP server, real ``edge-agent run`` processes with real slots and the
real runtime; the marker is the one the server's planner computes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.ota.answers import Changed, Refused, RollbackAssigned
from agent.ota.fetch_worker import run
from fleet_server.assignments.planner import ReleaseFacts, RollbackFacts, plan_rollback
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from testbed.fleet import HARDWARE, AgentProcess, Fleet
from testbed.images import make_bundle

pytestmark = pytest.mark.integration

DEVICE = "pump-9"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {
        "0.5.0": make_bundle(tmp, "v1", "0.5.0"),
        "1.0.0": make_bundle(tmp, "v1", "1.0.0"),
        "2.0.0": make_bundle(tmp, "v2", "2.0.0"),
    }


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[KeyStore, KeyStore]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


@pytest.fixture
def released(fleet: Fleet, built: dict[str, Path]) -> dict[str, ReleasedBundle]:
    return {version: fleet.release(path) for version, path in built.items()}


@pytest.fixture
def agent(fleet: Fleet, released: dict[str, ReleasedBundle]) -> Iterator[AgentProcess]:
    """A device that ran 1.0.0, then committed 2.0.0 (1.0.0 stays in its other slot)."""
    process = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    process.wait_ready()
    for version in ("1.0.0", "2.0.0"):
        fleet.assign(DEVICE, released[version])
        process.wait_for(f"{version} committed", lambda v=version: installed(process) == v)
    yield process
    process.stop()


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def serving(agent: AgentProcess) -> str:
    from firmware_images.datagen import FieldConditions, generate

    x, _ = generate(1, 0, FieldConditions())
    rows = [[float(v) for v in row] for row in x]
    return str(json.loads(agent.infer(agent.wait_ready(), rows).data)["model_version"])


def marker(released: dict[str, ReleasedBundle], running: str, ran_before: str) -> str:
    """The ``rollback_of`` the server's planner signs for going back from ``running``."""
    device = RollbackFacts(
        id=DEVICE,
        hardware_id=HARDWARE,
        running=released[running].target_path,
        running_sha256=released[running].sha256,
        ran_before=released[ran_before].target_path,
    )
    before = released[ran_before]
    previous = ReleaseFacts(
        before.target_path, before.name, before.version, before.release_counter, before.hardware_ids
    )
    return plan_rollback(device, previous).rollback_of


def name_as_rollback(fleet: Fleet, bundle: ReleasedBundle, rollback_of: str) -> None:
    """What the director signs: ``bundle`` for the device, marked as replacing ``rollback_of``."""
    fleet.director.assign(fleet.director_keys, DEVICE, HARDWARE, bundle, rollback_of=rollback_of)


def refusal(agent: AgentProcess, since: int) -> dict[str, Any]:
    """The first check refusal recorded after the first ``since`` events."""
    agent.wait_for(
        "the refusal",
        lambda: any(e["event"] == "check-refused" for e in agent.events()[since:]),
    )
    return next(e for e in agent.events()[since:] if e["event"] == "check-refused")


def counter_of(released: dict[str, ReleasedBundle], version: str) -> int:
    return released[version].release_counter


def test_the_previous_bundle_marked_as_a_rollback_is_served_again_and_the_left_one_never_retried(
    fleet: Fleet, released: dict[str, ReleasedBundle], agent: AgentProcess
) -> None:
    downloads = sum(e["event"] == "download-started" for e in agent.events())
    name_as_rollback(fleet, released["1.0.0"], marker(released, "2.0.0", "1.0.0"))
    agent.wait_for("the fleet rollback", lambda: installed(agent) == "1.0.0")

    journal = agent.journal()
    assert journal["installed_counter"] == counter_of(released, "2.0.0"), "the floor stays"
    assert journal["previous"] is None, "one step back, no more"
    assert f"sha256:{released['2.0.0'].sha256}" in journal["rejected"]
    assert journal["last_outcome"]["result"] == "rolled_back"
    assert journal["last_outcome"]["reason"] == "fleet-rollback"
    # The event is appended after the journal is saved: wait for it, not only the journal.
    agent.wait_for(
        "the fleet-rolled-back event",
        lambda: any(e["event"] == "fleet-rolled-back" for e in agent.events()),
    )
    [event] = [e for e in agent.events() if e["event"] == "fleet-rolled-back"]
    assert event["bundle"] == "pump-health 2.0.0" and event["to"] == "pump-health 1.0.0"
    assert serving(agent) == "1.0.0"

    # The operator (or a director) names 2.0.0 again: it is never retried.
    fleet.assign(DEVICE, released["2.0.0"])
    time.sleep(2.0)  # ten poll intervals
    assert installed(agent) == "1.0.0" and serving(agent) == "1.0.0"
    assert sum(e["event"] == "download-started" for e in agent.events()) == downloads


def test_an_older_release_than_the_previous_named_as_a_rollback_is_refused(
    fleet: Fleet, released: dict[str, ReleasedBundle], agent: AgentProcess
) -> None:
    since = len(agent.events())
    name_as_rollback(fleet, released["0.5.0"], f"sha256:{released['2.0.0'].sha256}")
    refused = refusal(agent, since)
    assert refused["reason"] == "release-counter-downgrade"
    assert "pump-health 0.5.0" in refused["message"]
    assert "the other slot holds pump-health 1.0.0" in refused["message"]
    assert installed(agent) == "2.0.0" and serving(agent) == "2.0.0"


def test_the_previous_bundle_without_the_marker_is_refused_as_a_lower_counter(
    fleet: Fleet, released: dict[str, ReleasedBundle], agent: AgentProcess
) -> None:
    since = len(agent.events())
    fleet.assign(DEVICE, released["1.0.0"])
    refused = refusal(agent, since)
    assert refused["reason"] == "release-counter-downgrade"
    assert "pump-health 1.0.0" in refused["message"]
    assert installed(agent) == "2.0.0" and serving(agent) == "2.0.0"


def test_after_going_back_the_newer_bundle_named_as_a_rollback_is_refused(
    fleet: Fleet, released: dict[str, ReleasedBundle], agent: AgentProcess
) -> None:
    name_as_rollback(fleet, released["1.0.0"], marker(released, "2.0.0", "1.0.0"))
    agent.wait_for("the fleet rollback", lambda: installed(agent) == "1.0.0")
    since = len(agent.events())
    # The other slot now holds 2.0.0: a director "rolling back" to it is refused.
    name_as_rollback(fleet, released["2.0.0"], f"sha256:{released['1.0.0'].sha256}")
    refused = refusal(agent, since)
    assert refused["reason"] == "rollback-refused"
    assert "pump-health 2.0.0" in refused["message"]
    assert "no bundle committed before" in refused["message"]
    # And nothing older either: the floor is still 2.0.0's counter.
    since = len(agent.events())
    name_as_rollback(fleet, released["0.5.0"], f"sha256:{released['1.0.0'].sha256}")
    assert refusal(agent, since)["reason"] == "release-counter-downgrade"
    assert installed(agent) == "1.0.0" and serving(agent) == "1.0.0"
    assert agent.journal()["installed_counter"] == counter_of(released, "2.0.0")


def test_a_rollback_to_a_slot_whose_files_were_altered_is_refused(
    fleet: Fleet, released: dict[str, ReleasedBundle], agent: AgentProcess
) -> None:
    slots = agent.data_dir / "slots"
    active = json.loads((slots / "current.json").read_text())["active"]
    other = slots / ("a" if active == "b" else "b")
    model = other / "model.tflite"
    altered = bytearray(model.read_bytes())
    altered[len(altered) // 2] ^= 0xFF
    model.write_bytes(bytes(altered))

    since = len(agent.events())
    name_as_rollback(fleet, released["1.0.0"], marker(released, "2.0.0", "1.0.0"))
    refused = refusal(agent, since)
    assert refused["reason"] == "invalid-bundle"
    assert "pump-health 1.0.0" in refused["message"]
    assert "model.tflite does not match the hash in its manifest" in refused["message"]
    assert json.loads((slots / "current.json").read_text())["active"] == active
    assert installed(agent) == "2.0.0" and serving(agent) == "2.0.0"
    assert agent.journal()["previous"] is None, "a damaged slot is no step back"


# -- the fetcher: a marked rollback keeps every other check, and is never downloaded ----------


def fetcher_config(fleet: Fleet) -> AgentConfig:
    return AgentConfig.load(fleet.agent_config(DEVICE))


def test_a_marked_rollback_is_passed_to_the_installer_and_never_downloaded(
    fleet: Fleet, released: dict[str, ReleasedBundle]
) -> None:
    config, floor = fetcher_config(fleet), counter_of(released, "2.0.0")
    left = f"sha256:{released['2.0.0'].sha256}"
    name_as_rollback(fleet, released["1.0.0"], left)
    answer = run("check", config, floor)
    assert isinstance(answer, RollbackAssigned) and answer.rollback_of == left
    assert answer.target.version == "1.0.0" and answer.target.sha256 == released["1.0.0"].sha256
    expect = f"sha256:{released['1.0.0'].sha256}"
    assert isinstance(run("download", config, floor, expect), Changed)
    assert not list((config.data_dir / "downloads").glob("*")), "nothing was downloaded"


def test_a_marked_rollback_to_a_bundle_the_release_keys_never_signed_is_refused(
    fleet: Fleet, released: dict[str, ReleasedBundle]
) -> None:
    evil = dataclasses.replace(
        released["1.0.0"], target_path="pump-health/pump-health-0.0.1.bundle", version="0.0.1"
    )
    name_as_rollback(fleet, evil, f"sha256:{released['2.0.0'].sha256}")
    answer = run("check", fetcher_config(fleet), counter_of(released, "2.0.0"))
    assert isinstance(answer, Refused) and answer.reason == "bundle-not-found"


def test_a_malformed_rollback_marker_is_refused(
    fleet: Fleet, released: dict[str, ReleasedBundle]
) -> None:
    name_as_rollback(fleet, released["1.0.0"], "the previous one, please")
    answer = run("check", fetcher_config(fleet), counter_of(released, "2.0.0"))
    assert isinstance(answer, Refused) and answer.reason == "untrusted-metadata"
    assert "rollback_of must be ALGORITHM:HEX" in answer.message
