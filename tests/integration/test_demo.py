"""The demo tells its story without a surprise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.demo import run_demo
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
def foreign_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Another deployment's fleet-server on the machine's shared Mosquitto, default settings.

    Only what a user must give: its folder, the broker and a free HTTP port (the
    default 8080 may be taken on a shared machine); no --db, --replica-id or
    --mqtt-namespace.
    """
    tmp = tmp_path_factory.mktemp("foreign")
    server = ServerProcess(tmp, db_url=None, broker=SHARED_BROKER, replica_id="foreign")
    # No --replica-id either: the default (host name and process id).
    server.args = [a for a in server.args if a not in ("--replica-id", "foreign")]
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_demo_runs_to_the_end(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    foreign_server: ServerProcess,
) -> None:
    # As `make demo` runs it: a work folder relative to the current directory, while
    # another edgefleet server uses the machine's broker (which once took the demo's
    # device messages through the shared subscription group both joined).
    monkeypatch.chdir(tmp_path)
    assert run_demo(Path(".demo")) == 0
    assert foreign_server.alive, foreign_server.log_tail()
    out = capsys.readouterr()
    assert "a private " in out.out and SHARED_BROKER not in out.out
    assert "tampered-bundle" in out.err and "wrong-hardware" in out.err
    assert "Every genuine bundle verified" in out.out
    assert "device: committed 1.1.0" in out.out
    assert "device: refused 1.3.0: self-test-failed" in out.out
    assert "device: rolled_back 1.2.0: watchdog" in out.out
    assert " answered 200 from previous 1.1.0" in out.out


def test_the_fleet_story_runs_on_the_zero_setup_defaults(tmp_path: Path) -> None:
    # What `make demo` does on a machine without Mosquitto: the embedded amqtt broker on
    # a free port, and SQLite.
    from simulator.embedded_broker import broker_for_demo
    from simulator.fleet_story import FleetStory

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
