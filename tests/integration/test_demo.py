"""The demo tells its story without a surprise.

`make demo` itself runs as the README gives it, on a fresh clone, beside another
deployment on the machine's broker: tests/e2e/test_readme.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_the_fleet_story_runs_on_the_zero_setup_defaults(tmp_path: Path) -> None:
    # What `make demo` does on a machine without Mosquitto: the embedded amqtt broker on
    # a free port, and SQLite.
    from simulator.fleet_story import FleetStory
    from testbed.embedded_broker import broker_for_demo

    with broker_for_demo(tmp_path / "broker", prefer_mosquitto=False) as broker:
        assert broker.kind == "amqtt" and not broker.shared_subscriptions
        story = FleetStory(
            tmp_path, broker.url, f"sqlite:///{tmp_path / 'fleet.db'}", shared_subscription=False
        )
        try:
            told = story.tell()
        finally:
            story.close()
    assert told["views"][told["canary"]]["active_bundle"] == "pump-health 1.1.0"
    assert told["outcome"]["reason"] == "watchdog"
    assert set(told["answers"]) == {200}
