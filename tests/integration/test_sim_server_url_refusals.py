"""``fleet-sim run --server-url URL``: a run the server or the scenario cannot carry out is
refused before it starts, naming what was refused and leaving the server as it was. (Runs
carried out against a server given by URL: ``test_sim_server_url.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.release.repository import ImageRepository
from testbed.api_server import repository_files
from testbed.server_process import private_broker
from testbed.waiting import free_port
from tests.support.databases import DATABASES
from tests.support.sim_runs import SCENARIOS
from tests.support.sim_server import (
    BROKER,
    RunningServer,
    fleet_sim,
    fresh_server_on_sqlite,
    refusal,
    server_on_database,
    short_run,
)

pytestmark = pytest.mark.integration


server = pytest.fixture(scope="module", params=DATABASES, name="server")(server_on_database)
fresh_server = pytest.fixture(name="fresh_server")(fresh_server_on_sqlite)


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
