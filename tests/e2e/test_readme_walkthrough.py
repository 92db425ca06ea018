"""The README's walk-through, every ``sh`` block after the quick start, run as written in
order in one shell on a fresh clone: release engineer, device, operator, simulator. It must
leave nothing running and write nothing ``.gitignore`` does not name. (The quick start's
``make demo``, and the rules every ``sh`` block follows: ``test_readme.py``.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.mosquitto import free_port
from tests.support.readme import (
    README_PORTS,
    clone_logs,
    fresh_clone,
    run_script,
    shell_blocks,
    user_environment,
    walkthrough_script,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_walkthrough_command_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "edgefleet")
    shell = shell_blocks((clone / "README.md").read_text())
    walkthrough = shell[1:]
    sections = {b.section for b in walkthrough}
    for role in ("Release engineer", "Device", "Fleet server"):
        assert any(s.startswith(role) for s in sections), f"no walk-through for {role}: {sections}"
    script = walkthrough_script(walkthrough, {p: free_port() for p in README_PORTS})
    ran = run_script(script, clone, user_environment(tmp_path), tmp_path / "walkthrough.log")
    assert ran.code == 0, (
        f"exit {ran.code}; the last README block started is the one that failed:\n"
        + ran.output[-6000:]
        + clone_logs(clone)
    )
    assert ">>> README.md walk-through done" in ran.output
    assert "Traceback" not in ran.output + clone_logs(clone), ran.output[-6000:] + clone_logs(clone)
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
