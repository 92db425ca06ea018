"""The first end-to-end path with real processes: Mosquitto, PostgreSQL, a fleet server,
three agents. A model travels from the release engineer to a device and back out."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.fleet_story import FleetStory
from tests.support.databases import postgres_database

pytestmark = pytest.mark.integration


@pytest.fixture
def story(tmp_path: Path) -> Iterator[FleetStory]:
    with postgres_database() as db_url:
        # Unique device ids: the shared broker keeps retained messages between runs.
        s = FleetStory(
            tmp_path, "mqtt://127.0.0.1:1883", db_url, device_prefix=f"pump-{secrets.token_hex(3)}"
        )
        try:
            yield s
        finally:
            s.close()


def test_release_assign_install_and_rollback_reach_the_server(story: FleetStory) -> None:
    told = story.tell()
    canary, others = told["ids"][0], told["ids"][1:]
    views = told["views"]
    # The canary runs v2 again after rolling back v3-bad; the others stayed on v1.
    assert views[canary]["active_bundle"] == "pump-health 1.1.0"
    assert all(views[d]["active_bundle"] == "pump-health 1.0.0" for d in others)
    assert all(views[d]["online"] for d in told["ids"])
    # The server shows why.
    outcome = told["outcome"]
    assert outcome["reason"] == "watchdog" and "NaN" in outcome["message"]
    assert views[canary]["installed_counter"] == 1_001_000_999
    kinds = [e["event"] for e in told["events"]]
    assert "rolled-back" in kinds and "switched" in kinds
    # Every request sent while it happened got an answer.
    assert told["answers"] and set(told["answers"]) == {200}
    # What the canary saw reached the server as feature summaries, and left its outbox.
    assert told["windows"] >= 1
