"""The README's commands, run as written on a fresh clone, so the README cannot drift from the code.

The quick start's ``make demo`` runs in a clone of its own while another
deployment's server uses the machine's Mosquitto (two deployments on one broker
must not see each other's messages); ``make test`` is what CI runs (``.ci/run``),
so it is not run again from inside itself. Every other ``sh`` block is one
walk-through, in order, in one shell: release engineer, device, operator
(``test_readme_walkthrough.py``, a module of its own so that it runs beside
``make demo``). No ``sh`` block may hold reference syntax (``[--option]``,
``ID``, ``...``, ``<value>``) that cannot run as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.server_process import ServerProcess
from tests.support.readme import (
    REPO,
    Block,
    fresh_clone,
    placeholders,
    run_script,
    shell_blocks,
    user_environment,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARED_BROKER = "mqtt://127.0.0.1:1883"


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
    code, output, _ = run_script(
        "make demo\n", clone, user_environment(tmp_path), tmp_path / "demo.log"
    )
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
    env = user_environment(tmp_path)
    left = run_script("sleep 600 &\n", tmp_path, env, tmp_path / "left.log")
    assert left.code == 0 and left.left_running
    stopped = run_script(
        "sleep 600 &\npid=$!\nkill $pid\nwait\n", tmp_path, env, tmp_path / "ok.log"
    )
    assert stopped.code == 0 and not stopped.left_running
