"""``fleet-sim run --server-url URL --token TOKEN --mqtt BROKER``: the simulated fleet against a
fleet server that is already running, as a user starts one, on SQLite and on PostgreSQL.

The server is a ``fleet-server`` process with its own data folder on the machine's Mosquitto
(127.0.0.1:1883) under a topic namespace of its own; the run is ``fleet-sim`` in its own
process, given the server's URL, an admin token made through the server's API and the broker.
What the run did is read back through that server's REST API. A run the server or the
scenario cannot carry out is refused before it starts, naming what was refused:
``test_sim_server_url_refusals.py``, a module of its own so that it runs beside this one.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from simulator.scenario import CHECKS
from tests.support.databases import DATABASES
from tests.support.sim_server import (
    BROKER,
    RunningServer,
    fleet_sim,
    fresh_server_on_sqlite,
    running_server,
    server_on_database,
    short_run,
)

pytestmark = pytest.mark.integration


server = pytest.fixture(scope="module", params=DATABASES, name="server")(server_on_database)
fresh_server = pytest.fixture(name="fresh_server")(fresh_server_on_sqlite)


def test_a_scenario_runs_against_a_server_given_by_url(
    server: RunningServer, tmp_path: Path
) -> None:
    # A device of the server's own, of the scenario's hardware: no rollout of the run's may
    # reach it.
    bystander = f"bystander-{secrets.token_hex(3)}"
    server.api("POST", "/devices", {"device_id": bystander, "hardware_id": "rpi4-arm64"})
    report_path = tmp_path / "report.json"
    done = short_run(
        tmp_path / "run",
        server.url,
        "--token",
        server.token,
        "--mqtt",
        BROKER,
        "--report-json",
        str(report_path),
    )
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, said
    report = json.loads(report_path.read_text())
    assert report["passed"] is True, said
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == set(CHECKS), said
    assert all(c["passed"] for c in checks.values()), said
    assert report["figures"]["broker"] == "given"

    # The devices the run made are registered on that server, tagged with their cohorts.
    devices = {d["id"]: d for d in server.api("GET", "/devices")["devices"]}
    expected = {f"eu-{i:05d}" for i in range(3)} | {f"us-{i:05d}" for i in range(2)}
    assert expected <= set(devices)
    assert all(devices[d]["hardware_id"] == "rpi4-arm64" for d in expected)
    assert all(d.split("-")[0] in devices[d]["tags"] for d in expected)

    # Their windows are stored there: every window the run produced, once.
    stored = {
        d: [w["window_id"] for w in server.api("GET", f"/devices/{d}/windows?limit=500")["windows"]]
        for d in expected
    }
    assert all(stored[d] for d in expected), stored
    assert sum(len(ids) for ids in stored.values()) == report["figures"]["windows_stored"]
    assert report["figures"]["windows_stored"] == report["figures"]["windows_produced"] > 0
    assert all(len(ids) == len(set(ids)) for ids in stored.values())
    # Counted through the API while the run went on, too, not only at its end.
    series = report["series"]
    assert any(s["windows_stored"] > 0 for s in series[:-1]), series
    assert series[-1]["windows_stored"] == report["figures"]["windows_stored"]

    # The run's rollout is that server's; it completed there, on the run's devices alone, and
    # they run the release it carried.
    rollout_ids = report["figures"]["rollouts"]
    assert len(rollout_ids) == 1
    rollout = server.api("GET", f"/rollouts/{rollout_ids[0]}")
    assert rollout["phase"] == "completed"
    assert rollout["matched"] == len(expected)
    devices = {d["id"]: d for d in server.api("GET", "/devices")["devices"]}
    assert all("1.1.0" in (devices[d]["assigned_target"] or "") for d in expected), devices
    assert devices[bystander]["assigned_target"] is None


def test_a_fleet_over_two_processes_behind_the_fault_proxy_reports_to_the_given_server(
    fresh_server: RunningServer, tmp_path: Path
) -> None:
    # Half the devices in a second process; one cohort's link goes down through the run's
    # fault proxy in front of the given server and broker. Every window of both processes
    # must be found stored on the server.
    scenario = tmp_path / "split.toml"
    scenario.write_text(
        'name = "split"\nduration = "20s"\nprocesses = 2\n'
        '[traffic]\nrate = 2.0\nwindow = "3s"\n'
        '[[cohorts]]\nname = "a"\ndevices = 2\n'
        '[[cohorts]]\nname = "b"\ndevices = 2\n'
        '[[faults]]\nkind = "link-down"\nat = "5s"\nduration = "4s"\ntarget = { cohort = "b" }\n'
        "[expect]\nmin_online = 1.0\n"
    )
    report_path = tmp_path / "report.json"
    done = fleet_sim(
        tmp_path / "run",
        str(scenario),
        "--server-url",
        fresh_server.url,
        "--token",
        fresh_server.token,
        "--mqtt",
        BROKER,
        "--report-json",
        str(report_path),
    )
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, said
    report = json.loads(report_path.read_text())
    assert all(c["passed"] for c in report["checks"]), said
    figures = report["figures"]
    assert figures["processes"] == 2
    assert [f["applied"] for f in report["faults"]] == ["yes"]
    assert figures["proxy_broker"]["refused"] > 0  # b's reconnects while its link was down
    ids = ["a-00000", "a-00001", "b-00000", "b-00001"]
    stored = {d: fresh_server.api("GET", f"/devices/{d}/windows?limit=500")["windows"] for d in ids}
    assert all(stored[d] for d in ids), stored  # the second process's devices' too
    assert sum(len(w) for w in stored.values()) == figures["windows_produced"]


def test_a_rollout_left_going_out_by_a_slow_server_says_the_servers_pace(tmp_path: Path) -> None:
    # A server on its default pace (a rollout step a minute): the short scenario's rollout is
    # still under way when the run ends, and the failed check says why.
    tmp = tmp_path / "slow"
    tmp.mkdir()
    with running_server(tmp, f"sqlite:///{tmp / 'fleet.db'}", extra_args=()) as slow:
        report_path = tmp_path / "report.json"
        done = short_run(
            tmp_path / "run",
            slow.url,
            "--token",
            slow.token,
            "--mqtt",
            BROKER,
            "--report-json",
            str(report_path),
        )
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 1, said
    checks = {c["name"]: c for c in json.loads(report_path.read_text())["checks"]}
    assert not checks["expectations"]["passed"], said
    assert "--rollout-interval 1" in checks["expectations"]["detail"]
    assert "FAIL expectations" in done.stdout and "--rollout-interval" in done.stdout
    assert checks["windows-once"]["passed"], said  # the fleet reported to it all the same
