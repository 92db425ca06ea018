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


# -- the fleet chapter: the demo scenario, its evidence, the dashboard ---------------------


def test_every_step_of_the_demo_scenario_is_printed_as_a_command_fleetctl_accepts(
    tmp_path: Path,
) -> None:
    import json
    import shlex

    from fleet_server.fleetctl.parser import build_parser
    from protocol.api.rollouts import RolloutSpec
    from simulator.demo_fleet import SCENARIO, step_commands, timeline, write_gate_files
    from simulator.scenario import load_scenario

    scenario = load_scenario(SCENARIO)
    run_dir = tmp_path / "fleet"
    write_gate_files(scenario, run_dir)
    parser = build_parser()
    rollouts = 0
    for step in scenario.steps:
        for command in step_commands(step, scenario, run_dir):
            tool, *args = shlex.split(command)
            assert tool == "fleetctl", command
            parsed = parser.parse_args(args)  # exits (SystemExit) on an option it has not
            if step.action == "rollout":
                rollouts += 1
                assert step.rollout is not None
                if step.rollout.get("gates"):
                    gates = json.loads(Path(parsed.gates).read_text())
                    assert gates == step.rollout["gates"]
                # What the command sends is a spec the server takes, as the run's is.
                RolloutSpec.model_validate({"release": parsed.release, **step.rollout})
    assert rollouts == 2
    lines = timeline(scenario, run_dir)
    assert [at for at, _ in lines] == sorted(at for at, _ in lines)
    assert any("(in the field) eu: vib_rms_x +2 sd" in line for _, line in lines)


@pytest.mark.parametrize(
    ("env", "tty", "stays"),
    [
        ({}, True, True),
        ({"DEMO_EXIT": "1"}, True, False),
        ({"CI": "true"}, True, False),
        ({"DEMO_EXIT": "0"}, True, True),
        ({}, False, False),  # no terminal to press Ctrl-C in (a log, a test)
    ],
)
def test_the_demo_keeps_its_dashboard_up_only_at_a_terminal_unless_told_to_exit(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], tty: bool, stays: bool
) -> None:
    import io

    from simulator import demo

    for name in ("DEMO_EXIT", "CI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    class Stdin(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr("sys.stdin", Stdin())
    assert demo.stays_up() is stays


@pytest.mark.slow
def test_the_fleet_chapter_tells_the_whole_story_and_serves_it_on_the_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    import urllib3

    from simulator.demo_fleet import fleet_chapter

    HEARTBEAT_S = 5  # the demo scenario's agent heartbeat

    with fleet_chapter(tmp_path) as server:
        out = capsys.readouterr().out
        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))
        token = server.token_file.read_text().strip()
        login = http.request(
            "POST", f"{server.url}/dashboard/login", fields={"token": token}, redirect=False
        )
        assert login.status == 303, login.data[:300]
        cookie = login.headers["Set-Cookie"].split(";")[0]
        rollouts = server.api("/rollouts")["rollouts"]
        bad = next(r for r in rollouts if r["release"].endswith("@1.2.0"))
        page = http.request(
            "GET", f"{server.url}/dashboard/rollouts/{bad['id']}", headers={"Cookie": cookie}
        )
        assert page.status == 200
        assert "install_failures" in page.data.decode()
        # While the dashboard is up its fleet is live: every device online, heartbeating.
        before = {d["id"]: d["last_seen_at"] for d in server.api("/devices")["devices"]}
        time.sleep(HEARTBEAT_S * 2 + 1)
        after = server.api("/devices")["devices"]
        assert len(after) == 24 and all(d["online"] for d in after), after
        assert all(d["last_seen_at"] > before[d["id"]] for d in after), (before, after)
    # Leaving the chapter stops the fleet and its server.
    assert not server.alive()
    # Each part of the story happened, with its evidence.
    assert "fleetctl rollout create pump-health@1.1.0 --select hardware=rpi4-arm64" in out
    assert "--on-failure rollback" in out
    assert "scenario demo (real, seed 7, 24 devices" in out and ": passed" in out
    assert "start stage 2 (12/24 devices): bake passed and every required gate passes" in out
    assert "start stage 3 (24/24 devices): bake passed and every required gate passes" in out
    assert "v2 promoted by its gates: 3 promotions, rollout completed" in out
    assert "gate install_failures: fail" in out
    assert "v3-bad stopped in wave 1 (6 of 12 devices): stop-gate failed: install_failures" in out
    assert "devices on v2 (1.1.0) now: 24 of 24" in out
    # The rollback reached every device before the chapter said so.
    assert "rollback complete (waited" in out
    assert "every device reports pump-health 1.1.0 active" in out and ": 24 of 24" in out
    assert "drift alert for region eu on 1.1.0:" in out and "vib_rms_x among them: True" in out
    assert "cloud capacity cut 20 -> 6 requests/s: the 24 plans now grant" in out
