"""A rollout's shadow stage on the device, with real agent processes, signatures and models.

The director lists, beside the device's assignment, a bundle marked as a
shadow: the agent installs it outside its slots, runs it on requests without
serving its answers and counts what it did in its window summaries; it drops
it when the director stops listing it, refuses a forged or tampered one with
the active model untouched, and refuses two listed at once. (A shadow whose
install is cut off, refused or unreachable: ``test_agent_shadow_retries.py``.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.status import collect_status, describe_status
from testbed.fleet import Fleet
from tests.support.shadow_fleet import (
    DEVICE,
    answers,
    built,
    device_state,
    events,
    field_rows,
    fleet,
    install_v1,
    installed,
    keys,
    list_targets,
    start,
    windows,
)

pytestmark = pytest.mark.integration

__all__ = ["built", "fleet", "keys"]  # fixtures, used by name


def test_an_identical_shadow_agrees_on_every_request_it_runs_and_changes_nothing_served(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    before = device_state(agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    installed_event = events(agent, "shadow-installed")[0]
    assert installed_event["bundle"] == "pump-health 1.0.1"
    assert installed_event["memory_mb"] is not None and installed_event["latency_p95_ms"] > 0
    assert device_state(agent) == before, "the shadow changed the slots or the journal"
    assert (agent.data_dir / "shadow" / "current" / "manifest.json").exists()
    status = collect_status(AgentConfig.load(agent.config))
    assert status["shadow"]["version"] == "1.0.1"
    assert "shadow: pump-health 1.0.1 (answers not served)" in describe_status(status)

    rows = field_rows(40, seed=3)
    served = answers(agent, url, rows)
    assert {(a["model_version"], a["parameters"]["stage"]) for a in served} == {("1.0.0", "active")}
    time.sleep(1.0)  # a run in a worker thread reports after its answer (microseconds)
    assert agent.stop() == 0  # the last window is stored on the way out

    shadowed = [w.shadow for w in windows(agent) if w.shadow is not None]
    assert shadowed, "no window carries a shadow section"
    assert {(s.bundle_id, s.model_version) for s in shadowed} == {
        (f"sha256:{released['v1-again'].sha256}", "1.0.1")
    }
    ran = sum(s.requests for s in shadowed)
    assert ran == len(rows)  # share 1.0 and room for every run: none skipped
    assert sum(s.agreements for s in shadowed) == ran
    assert sum(s.errors for s in shadowed) == 0
    assert sum(s.latency_ms.count for s in shadowed) == ran


def test_a_nan_producing_shadow_counts_errors_and_the_answers_served_stay_the_same(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    rows = field_rows(40, idle_share=0.5, seed=5)
    without = answers(agent, url, rows)
    list_targets(fleet, released["v1"], released["v3-bad"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    with_shadow = answers(agent, url, rows)
    assert [a["outputs"] for a in with_shadow] == [a["outputs"] for a in without]
    assert {a["parameters"]["stage"] for a in with_shadow} == {"active"}
    time.sleep(1.0)
    agent.stop()
    shadowed = [w.shadow for w in windows(agent) if w.shadow is not None]
    assert {s.model_version for s in shadowed} == {"3.0.0"}
    assert sum(s.requests for s in shadowed) == len(rows)
    errors = sum(s.errors for s in shadowed)
    assert 0 < errors < len(rows), "the NaN rows were not counted as the shadow's errors"
    # The served windows counted no error: the shadow's NaN never reached an answer.
    assert sum(w.errors for w in windows(agent)) == 0


def test_a_shadow_the_director_stops_listing_is_dropped(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    before = device_state(agent)
    fleet.assign(DEVICE, released["v1"])  # the assignment alone: no shadow listed
    agent.wait_for("the shadow dropped", lambda: events(agent, "shadow-dropped"))
    dropped = events(agent, "shadow-dropped")[0]
    assert dropped["reason"] == "unlisted" and dropped["bundle"] == "pump-health 1.0.1"
    assert not (agent.data_dir / "shadow" / "current").exists()
    assert device_state(agent) == before
    assert answers(agent, url, field_rows(1))[0]["model_version"] == "1.0.0"
    agent.stop()


def test_a_shadow_assigned_later_installs_through_the_slots_as_usual(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    fleet.assign(DEVICE, released["v1-again"])  # promoted: now the assignment, no shadow
    agent.wait_for("1.0.1 committed", lambda: installed(agent) == "1.0.1")
    agent.wait_for("the shadow dropped", lambda: events(agent, "shadow-dropped"))
    assert answers(agent, url, field_rows(1))[0]["model_version"] == "1.0.1"
    assert agent.journal()["installed_counter"] == released["v1-again"].release_counter
    agent.stop()


@pytest.mark.parametrize("forgery", ["director-mismatch", "tampered-bundle", "rollback-mark"])
def test_a_forged_or_tampered_shadow_is_refused_and_the_active_model_untouched(
    forgery: str, fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    before = device_state(agent)
    shadow = released["v1-again"]
    if forgery == "director-mismatch":  # the director names hashes the release keys never signed
        list_targets(fleet, released["v1"], shadow, sha256="0" * 64)
        expected = "director-mismatch"
    elif forgery == "tampered-bundle":  # the bytes on the server differ from the signed ones
        stored = next((fleet.repo.targets_dir).rglob(f"*{Path(shadow.target_path).name}"))
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        list_targets(fleet, released["v1"], shadow)
        expected = "tampered-bundle"
    else:  # a shadow dressed as a fleet rollback
        list_targets(
            fleet, released["v1"], shadow, shadow_custom={"rollback_of": "sha256:" + "1" * 64}
        )
        expected = "untrusted-metadata"
    agent.wait_for("the shadow refused", lambda: events(agent, "shadow-refused"))
    refused = events(agent, "shadow-refused")[0]
    assert refused["reason"] == expected, refused
    assert not (agent.data_dir / "shadow" / "current").exists()
    assert not events(agent, "shadow-installed")
    assert device_state(agent) == before
    served = answers(agent, url, field_rows(3))
    assert {(a["model_version"], a["parameters"]["stage"]) for a in served} == {("1.0.0", "active")}
    time.sleep(1.0)  # more polls: the same refusal is reported once
    assert len(events(agent, "shadow-refused")) == 1
    agent.stop()


def test_two_shadows_are_refused_naming_both(fleet: Fleet, built: dict[str, Path]) -> None:
    agent, _ = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, None, released["v1-again"], released["v3-bad"])
    agent.wait_for("the shadows refused", lambda: events(agent, "shadow-refused"))
    message = str(events(agent, "shadow-refused")[0]["message"])
    assert "2 shadow bundles" in message
    assert "pump-health-1.0.1" in message and "pump-health-3.0.0" in message
    assert installed(agent) == "1.0.0"
    agent.stop()
