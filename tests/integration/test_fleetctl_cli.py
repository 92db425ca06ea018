"""``fleetctl`` as a shell user meets it: real processes, real pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def fleetctl_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run fleetctl with stdout a pipe whose reader has already gone, as ``| head`` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "fleet_server.fleetctl", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


def fleetctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet_server.fleetctl", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, json_flag: list[str]) -> None:
    result = fleetctl_into_closed_pipe("keys", "init", "--dir", str(tmp_path / "keys"), *json_flag)
    assert result.stderr == ""
    assert result.returncode == 128 + 13  # as a tool that SIGPIPE ended


def test_help_into_a_closed_pipe_ends_quietly() -> None:
    result = fleetctl_into_closed_pipe("--help")
    assert result.stderr == ""


def test_fleetctl_alone_lists_the_command_groups() -> None:
    result = fleetctl()
    assert result.returncode == 2
    assert "required" not in result.stderr
    for group, description in (
        ("keys", "release keys"),
        ("bundle", "model bundles"),
        ("release", "the image repository"),
        ("devices", "the device registry"),
        ("drift", "drift per feature"),
        ("broker", "the MQTT broker"),
    ):
        line = next(line for line in result.stderr.splitlines() if line.strip().startswith(group))
        assert description in line, result.stderr


def test_version_is_printed() -> None:
    result = fleetctl("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("fleetctl ") and result.stdout.split()[1][0].isdigit()
