"""The README's commands, run as written on a fresh clone, so the README cannot drift from the code.

The quick start's ``make demo`` runs in a clone of its own while another
deployment's server uses the machine's Mosquitto (two deployments on one broker
must not see each other's messages); ``make test`` is what CI runs (``.ci/run``),
so it is not run again from inside itself. Every other ``sh`` block is one
walk-through, in order, in one shell: release engineer, device, operator. It
must leave nothing running, and no ``sh`` block may hold reference syntax
(``[--option]``, ``ID``, ``...``, ``<value>``) that cannot run as written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from testbed.mosquitto import free_port
from testbed.server_process import ServerProcess
from tests.support.readme import (
    README_PORTS,
    REPO,
    Block,
    fresh_clone,
    placeholders,
    shell_blocks,
    walkthrough_script,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARED_BROKER = "mqtt://127.0.0.1:1883"
WALKTHROUGH_TIMEOUT_S = 600


def _user_environment(home: Path) -> dict[str, str]:
    """A new user's shell: no virtual environment active, no edgefleet variables, own HOME."""
    venv_bin = str(REPO / ".venv" / "bin")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGEFLEET_", "VIRTUAL_ENV", "PYTEST_", "PYTHON"))
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(venv_bin)
    )
    env["HOME"] = str(home)
    return env


class Ran(NamedTuple):
    code: int
    output: str
    left_running: bool  # something the script started was still running when it ended


def _run(script: str, cwd: Path, env: dict[str, str], log: Path) -> Ran:
    """Run ``script`` with bash; whatever it left running in the background is stopped after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        left_running = False
        try:
            code = proc.wait(WALKTHROUGH_TIMEOUT_S)
            left_running = _alive(proc.pid)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            _stop_group(proc.pid)
    return Ran(code, log.read_text(errors="replace"), left_running)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int) -> None:
    """SIGTERM what is left in the process group, then SIGKILL what has not stopped in 10 s."""
    deadline = time.monotonic() + 10
    try:
        os.killpg(pgid, signal.SIGTERM)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def foreign_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Another deployment's fleet-server on the machine's shared Mosquitto, default settings.

    Only what a user must give: its folder, the broker and a free HTTP port; no
    --db, --replica-id or --mqtt-namespace.
    """
    tmp = tmp_path_factory.mktemp("foreign")
    server = ServerProcess(tmp, db_url=None, broker=SHARED_BROKER, replica_id="foreign")
    server.args = [a for a in server.args if a not in ("--replica-id", "foreign")]
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_the_quick_start_is_make_demo_and_make_test() -> None:
    shell = shell_blocks((REPO / "README.md").read_text())
    assert shell, "README.md has no sh blocks"
    assert shell[0].section == "Quick start", shell[0]
    assert shell[0].text == "make demo\nmake test\n", shell[0].text


def test_make_demo_runs_as_written_on_a_fresh_clone(
    tmp_path: Path, foreign_server: ServerProcess
) -> None:
    clone = fresh_clone(tmp_path / "edgefleet")
    code, output, _ = _run("make demo\n", clone, _user_environment(tmp_path), tmp_path / "demo.log")
    assert code == 0, output[-4000:]
    assert foreign_server.alive, foreign_server.log_tail()
    assert "a private " in output and SHARED_BROKER not in output
    assert "tampered-bundle" in output and "wrong-hardware" in output
    assert "Every genuine bundle verified" in output
    assert "device: committed 1.1.0" in output
    assert "device: refused 1.3.0: self-test-failed" in output
    assert "device: rolled_back 1.2.0: watchdog" in output
    assert " answered 200 from previous 1.1.0" in output
    # The fleet: v2 in gated waves, v3-bad stopped in wave 1, drift in eu, the capacity cut.
    assert "v2 promoted by its gates: 3 promotions, rollout completed" in output
    assert (
        "v3-bad stopped in wave 1 (6 of 12 devices): stop-gate failed: install_failures" in output
    )
    assert "devices on v2 (1.1.0) now: 24 of 24" in output
    assert "drift alert for region eu on 1.1.0:" in output
    assert "cloud capacity cut 20 -> 6 requests/s: the 24 plans now grant" in output
    assert "Dashboard: http://127.0.0.1:" in output
    assert (clone / ".demo").is_dir()


def test_every_walkthrough_command_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "edgefleet")
    shell = shell_blocks((clone / "README.md").read_text())
    walkthrough = shell[1:]
    sections = {b.section for b in walkthrough}
    for role in ("Release engineer", "Device", "Fleet server"):
        assert any(s.startswith(role) for s in sections), f"no walk-through for {role}: {sections}"
    script = walkthrough_script(walkthrough, {p: free_port() for p in README_PORTS})
    ran = _run(script, clone, _user_environment(tmp_path), tmp_path / "walkthrough.log")
    assert ran.code == 0, (
        f"exit {ran.code}; the last README block started is the one that failed:\n"
        + ran.output[-6000:]
        + _logs(clone)
    )
    assert ">>> README.md walk-through done" in ran.output
    assert "Traceback" not in ran.output + _logs(clone), ran.output[-6000:] + _logs(clone)
    assert not ran.left_running, "the walk-through ends with something still running"
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    written = [line for line in status if line[3:] != ".venv"]  # the test's own link
    assert not written, "the walk-through changed or wrote files .gitignore does not name:\n" + (
        "\n".join(written)
    )


def _logs(clone: Path) -> str:
    """The tails of the logs the walk-through's background processes wrote in the clone."""
    return "".join(
        f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:]
        for log in sorted(clone.glob("*.log"))
    )


def test_no_sh_block_holds_reference_syntax() -> None:
    """An sh block runs as written: options in brackets, ID, ... and <value> belong in prose."""
    found = [
        line for b in shell_blocks((REPO / "README.md").read_text()) for line in placeholders(b)
    ]
    assert not found, "sh blocks must run as written; move these to prose or a text block:\n" + (
        "\n".join(found)
    )


def test_reference_syntax_is_recognised() -> None:
    def flagged(text: str) -> bool:
        return bool(placeholders(Block("sh", 1, "", text)))

    for reference in ("x [--json]", "devices show ID", "--device a:f ...", "edgefleet/v1/<ns>/"):
        assert flagged(reference), reference
    for command in ("cat > a <<EOF", "x > log 2>&1 &", "fleetctl assignments cancel dev-3"):
        assert not flagged(command), command


def test_a_script_that_leaves_a_process_running_is_caught(tmp_path: Path) -> None:
    env = _user_environment(tmp_path)
    left = _run("sleep 600 &\n", tmp_path, env, tmp_path / "left.log")
    assert left.code == 0 and left.left_running
    stopped = _run("sleep 600 &\npid=$!\nkill $pid\nwait\n", tmp_path, env, tmp_path / "ok.log")
    assert stopped.code == 0 and not stopped.left_running
