"""The demo tells its story without a surprise."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.demo import run_demo


def test_demo_runs_to_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `make demo` runs it: a work folder relative to the current directory.
    monkeypatch.chdir(tmp_path)
    assert run_demo(Path(".demo")) == 0
    out = capsys.readouterr()
    assert "tampered-bundle" in out.err and "wrong-hardware" in out.err
    assert "Every genuine bundle verified" in out.out
    assert "device: committed 1.1.0" in out.out
    assert "device: refused 1.3.0: self-test-failed" in out.out
    assert "device: rolled_back 1.2.0: watchdog" in out.out
    assert " answered 200 from previous 1.1.0" in out.out


def test_the_fleet_story_runs_on_the_zero_setup_defaults(tmp_path: Path) -> None:
    # What `make demo` does on a machine with no broker: the embedded amqtt broker and
    # SQLite (on a free port here, so the machine's own broker is left alone).
    from simulator.embedded_broker import broker_for_demo
    from simulator.fleet_story import FleetStory, free_port

    with broker_for_demo(port=free_port()) as (broker, embedded):
        assert embedded
        story = FleetStory(
            tmp_path, broker, f"sqlite:///{tmp_path / 'fleet.db'}", shared_subscription=False
        )
        try:
            told = story.tell()
        finally:
            story.close()
    assert told["views"][told["canary"]]["active_bundle"] == "pump-health 1.1.0"
    assert told["outcome"]["reason"] == "watchdog"
    assert set(told["answers"]) == {200}
