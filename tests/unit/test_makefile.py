"""The Makefile's virtualenv step says what it is doing before its silent minute of pip."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Stands in for python3 and for .venv/bin/python: ``-m venv DIR`` makes DIR/bin/python
# (this same script), anything else (the pip install) succeeds at once.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && chmod +x "$3/bin/python"
fi
exit 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "constraints.txt").write_text("")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def make_venv(project: Path) -> list[str]:
    result = subprocess.run(
        ["make", "--no-print-directory", f"PYTHON={project / 'fake-python'}", ".venv/.installed"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_creating_the_venv_is_announced_before_pip_runs(project: Path) -> None:
    lines = make_venv(project)
    assert lines[0] == "creating .venv and installing pinned dependencies (about a minute)..."
    pip = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert pip > 0
    assert (project / ".venv" / ".installed").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_reinstalling_into_an_existing_venv_says_so(project: Path) -> None:
    make_venv(project)
    # Newer constraints than the stamp: make re-runs the step into the existing venv.
    past = time.time() - 100
    os.utime(project / ".venv" / ".installed", (past, past))
    (project / "constraints.txt").write_text("# changed\n")
    lines = make_venv(project)
    assert lines[0] == "updating .venv: installing pinned dependencies (about a minute)..."
