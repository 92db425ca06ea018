"""The README's shell blocks, and a fresh clone of this checkout to run them in.

Every fenced block marked ``sh`` in README.md is a command someone will paste;
:func:`shell_blocks` returns them in order with their line numbers, and
:func:`walkthrough_script` joins them into one bash script that stops at the
first failing command and says which block it was in. Other fences (``toml``,
``text``) are not commands.

Ports are the one thing a test changes: on a shared machine the ports the
README uses (the server's 8080, the cloud endpoint's 8090, the devices' 8500
and 8501) may be taken, so :data:`README_PORTS` lists them and the test maps
each to a free one, everywhere it appears.

Every ``sh`` block runs as written, so none may hold reference syntax such as
``[--option]``, ``ID``, ``...`` or ``<value>``: :func:`placeholders` finds it.
Sample output is fenced ``text``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
README_PORTS = (8080, 8090, 8500, 8501)
_FENCE = re.compile(r"^```(\S*)\s*$")
SCRIPT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the first command line, 1-based
    section: str  # the nearest level-2 heading above it
    text: str


def blocks(readme: str) -> list[Block]:
    """Every fenced block of ``readme`` with its language, first line and section."""
    found: list[Block] = []
    section = ""
    fence: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(readme.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif match:
                fence, body = (match.group(1), number + 1), []
        elif line.strip() == "```":
            found.append(Block(fence[0], fence[1], section, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise AssertionError(f"README.md: the block opened before line {fence[1]} is never closed")
    return found


def shell_blocks(readme: str) -> list[Block]:
    return [b for b in blocks(readme) if b.language == "sh"]


# Reference syntax, not a command: an optional option, an upper-case ID
# placeholder, an ellipsis, a <value> (a heredoc's << and <( are shell).
_PLACEHOLDER = re.compile(r"\[--|(?<![\w-])ID\b|\.\.\.|…|(?<![<(])<(?![<(])")


def placeholders(block: Block) -> list[str]:
    """Each line of ``block`` holding reference syntax, as ``README.md:LINE: text``."""
    return [
        f"README.md:{block.line + i}: {line.strip()}"
        for i, line in enumerate(block.text.splitlines())
        if _PLACEHOLDER.search(line)
    ]


def walkthrough_script(shell: list[Block], ports: dict[int, int]) -> str:
    """One bash script running ``shell`` in order, ``set -euo pipefail``, ports mapped."""
    parts = ["set -euo pipefail"]
    for block in shell:
        text = block.text
        for old, new in ports.items():
            text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
        parts.append(f"echo '>>> README.md block at line {block.line} ({block.section})' >&2")
        parts.append(text)
    parts.append("echo '>>> README.md walk-through done' >&2")
    return "\n".join(parts) + "\n"


def fresh_clone(destination: Path) -> Path:
    """A ``git clone`` of this checkout's HEAD, sharing its virtual environment.

    The clone's ``.venv`` is a link to this checkout's, whose editable install
    runs the same commit. Its build inputs are dated before the environment's
    install stamp, so ``make`` in the clone does not reinstall into it.
    """
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(destination)],
        check=True,
        capture_output=True,
    )
    (destination / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    stamp = (REPO / ".venv" / ".installed").stat().st_mtime
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(destination / name, (stamp - 60, stamp - 60))
    return destination


def uncommitted_readme() -> bool:
    """Whether README.md differs from HEAD (the clone runs what is committed)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(out.stdout.strip())


def user_environment(home: Path) -> dict[str, str]:
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


def run_script(script: str, cwd: Path, env: dict[str, str], log: Path) -> Ran:
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
            code = proc.wait(SCRIPT_TIMEOUT_S)
            left_running = alive(proc.pid)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            stop_group(proc.pid)
    return Ran(code, log.read_text(errors="replace"), left_running)


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int) -> None:
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


def clone_logs(clone: Path) -> str:
    """The tails of the logs the walk-through's background processes wrote in the clone."""
    return "".join(
        f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:]
        for log in sorted(clone.glob("*.log"))
    )
