"""A ``fleet-server`` started as a user starts one, and ``fleet-sim run --server-url`` against
it, for the tests of runs against a server given by URL (``test_sim_server_url*.py``).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from testbed.server_process import ServerProcess, clear_retained
from tests.support.databases import database_url
from tests.support.sim_runs import RUN_TIMEOUT_S, SCENARIOS

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


def server_on_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A test module's server on the database its fixture's parameter names (see
    ``test_sim_server_url*.py``: ``pytest.fixture(scope="module", params=DATABASES)``)."""
    tmp = tmp_path_factory.mktemp(f"sim-server-url-{request.param}")
    with database_url(request.param, tmp) as db_url, running_server(tmp, db_url) as running:
        yield running


def fresh_server_on_sqlite(tmp_path: Path) -> Iterator[RunningServer]:
    """A server of the test's own on SQLite, holding nothing yet."""
    tmp = tmp_path / "fresh"
    tmp.mkdir()
    with running_server(tmp, f"sqlite:///{tmp / 'fleet.db'}") as running:
        yield running


def refusal(done: Any) -> str:
    """The one ``fleet-sim:`` line of a refused run (and no traceback)."""
    assert done.returncode == 2, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("fleet-sim:")]
    assert len(lines) == 1, done.stderr
    return lines[0]
