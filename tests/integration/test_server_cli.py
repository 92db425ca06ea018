"""``fleet-server`` as an operator starts it: real processes, real sockets, real databases."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def fleet_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet_server.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (bound then released, so no other test holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_busy_http_port_is_one_line_naming_the_flag(tmp_path: Path, busy_port: int) -> None:
    result = fleet_server("--data", str(tmp_path / "data"), "--http", f"127.0.0.1:{busy_port}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("fleet-server:")]
    assert len(refusals) == 1, result.stderr
    assert refusals[0].startswith("fleet-server: --http: ")
    assert f"127.0.0.1:{busy_port}" in refusals[0]
    assert refusals[0].endswith("Address already in use")
    assert result.stderr.strip().splitlines()[-1] == refusals[0]


def test_an_unreachable_database_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    port = closed_port()
    url = f"postgresql://fleet:secret@127.0.0.1:{port}/test"
    result = fleet_server("--data", str(tmp_path / "data"), "--db", url, "--http", "127.0.0.1:0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleet-server: --db: ")
    assert f"127.0.0.1:{port}" in lines[0]
    assert "secret" not in lines[0]


def test_migration_lines_are_quiet_by_default_and_shown_with_verbose(
    tmp_path: Path, busy_port: int
) -> None:
    # The busy port ends each start right after the migrations ran.
    quiet = fleet_server("--data", str(tmp_path / "quiet"), "--http", f"127.0.0.1:{busy_port}")
    assert "alembic" not in quiet.stderr and "Running upgrade" not in quiet.stderr, quiet.stderr
    loud = fleet_server(
        "--data", str(tmp_path / "loud"), "--http", f"127.0.0.1:{busy_port}", "--verbose"
    )
    assert "Running upgrade" in loud.stderr, loud.stderr
    assert loud.stderr.strip().splitlines()[-1].startswith("fleet-server: --http: ")


def test_version_is_printed(tmp_path: Path) -> None:
    result = fleet_server("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("fleet-server ") and result.stdout.split()[1][0].isdigit()
