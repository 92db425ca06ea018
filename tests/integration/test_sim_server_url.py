"""``fleet-sim run --server-url URL --token TOKEN --mqtt BROKER``: the simulated fleet against a
fleet server that is already running, as a user starts one, on SQLite and on PostgreSQL.

The server is a ``fleet-server`` process with its own data folder on the machine's Mosquitto
(127.0.0.1:1883) under a topic namespace of its own; the run is ``fleet-sim`` in its own
process, given the server's URL, an admin token made through the server's API and the broker.
What the run did is read back through that server's REST API. A run the server or the
scenario cannot carry out is refused before it starts, naming what was refused.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fleet_server.release.repository import ImageRepository
from simulator.scenario import CHECKS
from testbed.api_server import repository_files
from testbed.server_process import ServerProcess, clear_retained, private_broker
from testbed.waiting import free_port
from tests.support.databases import DATABASES, database_url
from tests.support.sim_runs import RUN_TIMEOUT_S, SCENARIOS

pytestmark = pytest.mark.integration

BROKER = "mqtt://127.0.0.1:1883"  # the machine's Mosquitto, shared with other runs
SCENARIO = SCENARIOS / "good-rollout.toml"  # its short form: 5 devices, 30 s


def fleet_sim_command() -> list[str]:
    """``fleet-sim`` as installed beside this interpreter (the entry point a user types)."""
    script = Path(sys.executable).parent / "fleet-sim"
    return [str(script)] if script.exists() else [sys.executable, "-m", "simulator.cli"]


def fleet_sim(workdir: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> Any:
    return subprocess.run(
        [*fleet_sim_command(), "run", *args, "--workdir", str(workdir), "--quiet"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def short_run(workdir: Path, server_url: str, *args: str, timeout: float = RUN_TIMEOUT_S) -> Any:
    """``fleet-sim run SCENARIO --short --server-url URL ARGS``, as a user types it."""
    return fleet_sim(
        workdir, str(SCENARIO), "--short", "--server-url", server_url, *args, timeout=timeout
    )


class RunningServer:
    """A ``fleet-server`` started as a user would, and an admin token made through its API."""

    def __init__(self, process: ServerProcess, token: str) -> None:
        self.process = process
        self.url = process.url
        self.token = token

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return self.process.api(method, path, self.token, body)


@contextmanager
def running_server(
    tmp: Path, db_url: str, extra_args: tuple[str, ...] = ("--rollout-interval", "1")
) -> Iterator[RunningServer]:
    """``fleet-server`` on ``db_url`` and the machine's broker, under a namespace of its own.

    As typed: ``fleet-server --data DIR --db URL --mqtt mqtt://127.0.0.1:1883 --mqtt-namespace
    NS --http 127.0.0.1:PORT --rollout-interval 1`` (a short scenario's rollout bakes for
    seconds, not minutes), then an admin token made with the one it wrote at its first start.
    """
    namespace = f"simurl-{secrets.token_hex(6)}"
    process = ServerProcess(
        tmp,
        db_url=db_url,
        broker=BROKER,
        replica_id="fleet",
        namespace=namespace,
        extra_args=extra_args,
    )
    process.start()
    try:
        bootstrap = process.admin_token()
        created = process.api("POST", "/tokens", bootstrap, {"name": "fleet-sim", "role": "admin"})
        yield RunningServer(process, created["token"])
    finally:
        process.stop()
        clear_retained(f"edgefleet/v1/{namespace}/#")


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp(f"sim-server-url-{request.param}")
    with database_url(request.param, tmp) as db_url, running_server(tmp, db_url) as running:
        yield running


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server of the test's own on SQLite, holding nothing yet."""
    tmp = tmp_path / "fresh"
    tmp.mkdir()
    with running_server(tmp, f"sqlite:///{tmp / 'fleet.db'}") as running:
        yield running


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


def refusal(done: Any) -> str:
    """The one ``fleet-sim:`` line of a refused run (and no traceback)."""
    assert done.returncode == 2, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("fleet-sim:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("given", ["--token", "--token-file"])
def test_a_wrong_token_is_refused_naming_the_server_and_its_refusal(
    server: RunningServer, tmp_path: Path, given: str
) -> None:
    before = server.api("GET", "/devices")["devices"]
    token = "not-a-token-of-this-server"
    if given == "--token-file":
        (tmp_path / "token").write_text(token + "\n")
        token = str(tmp_path / "token")
    done = short_run(
        tmp_path / "run",
        server.url,
        given,
        token,
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert f"--server-url {server.url} refused --token" in line
    assert "401" in line
    # Nothing was registered on the server under a refused token.
    assert server.api("GET", "/devices")["devices"] == before


def test_a_token_that_is_not_an_admin_token_is_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    viewer = server.api("POST", "/tokens", {"name": "sim-viewer", "role": "viewer"})["token"]
    done = short_run(
        tmp_path / "run",
        server.url,
        "--token",
        viewer,
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert "--token" in line and "403" in line and "admin" in line


def test_an_unreachable_server_is_refused_naming_its_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = short_run(
        tmp_path / "run",
        url,
        "--token",
        "anything",
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert f"--server-url {url}" in line
    assert "cannot reach" in line


def test_an_unreadable_token_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    done = short_run(
        tmp_path / "run",
        "http://127.0.0.1:9",
        "--token-file",
        str(missing),
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert f"--token-file {missing}: cannot read it" in line


def test_the_broker_is_asked_for_when_the_server_is_given(tmp_path: Path) -> None:
    done = short_run(
        tmp_path / "run",
        "http://127.0.0.1:9",
        "--token",
        "anything",
        timeout=120,
    )
    line = refusal(done)
    assert "--mqtt" in line


def test_an_unreachable_broker_is_refused_naming_it(server: RunningServer, tmp_path: Path) -> None:
    other = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    done = short_run(
        tmp_path / "run",
        server.url,
        "--token",
        server.token,
        "--mqtt",
        other,
        timeout=120,
    )
    line = refusal(done)
    assert f"--mqtt {other}: cannot reach the broker" in line


def test_a_broker_the_server_does_not_ingest_from_is_refused(
    fresh_server: RunningServer, tmp_path: Path
) -> None:
    # A broker that is up, but not the one the server ingests from: the devices connect,
    # the server never sees them.
    with private_broker(tmp_path / "other-broker") as other:
        done = short_run(
            tmp_path / "run",
            fresh_server.url,
            "--token",
            fresh_server.token,
            "--mqtt",
            other.url,
            timeout=300,
        )
    line = refusal(done)
    assert f"--mqtt {other.url}" in line
    assert f"--server-url {fresh_server.url} saw none of them online" in line
    assert "another broker" in line


def test_a_server_holding_releases_already_is_refused(
    fresh_server: RunningServer, tmp_path: Path, repo: ImageRepository
) -> None:
    # Released under other keys than the run's: the run could not release beside them.
    fresh_server.api("POST", "/releases", {"files": repository_files(repo.path)})
    done = short_run(
        tmp_path / "run",
        fresh_server.url,
        "--token",
        fresh_server.token,
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert f"--server-url {fresh_server.url} holds releases already (1)" in line
    assert fresh_server.api("GET", "/devices")["devices"] == []


def test_a_server_holding_the_scenarios_devices_already_is_refused(
    fresh_server: RunningServer, tmp_path: Path
) -> None:
    fresh_server.api("POST", "/devices", {"device_id": "us-00001", "hardware_id": "rpi4-arm64"})
    done = short_run(
        tmp_path / "run",
        fresh_server.url,
        "--token",
        fresh_server.token,
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert "registered already (1: us-00001)" in line
    assert fresh_server.api("GET", "/releases")["releases"] == []


def test_a_scenario_needing_what_a_given_server_has_not_is_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    # The cloud endpoint runs beside a server the run starts; a given server's is not known.
    done = fleet_sim(
        tmp_path / "run",
        str(SCENARIOS / "cloud-capacity.toml"),
        "--short",
        "--server-url",
        server.url,
        "--token",
        server.token,
        "--mqtt",
        BROKER,
        timeout=120,
    )
    line = refusal(done)
    assert "server.cloud" in line and "--server-url" in line
