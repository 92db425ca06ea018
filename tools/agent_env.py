"""The agent-only install: a fresh virtual environment with only what a device runs.

``python -m tools.agent_env create VENV [--runtime agent|litert]`` makes VENV and
installs the working tree's ``edgefleet[agent]`` (tflite-runtime, numpy 1.26, pinned by
``constraints.txt``) or ``edgefleet[litert]`` (LiteRT, numpy 2, pinned by
``constraints-litert.txt``) into it, from a copy of the tree so that the build leaves
nothing in the checkout. ``python -m tools.agent_env size VENV`` prints what the
environment takes on disk, largest distribution first.

Standard library only: it also runs under a bare Debian ``python3`` (``make check-arm64``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = {"agent": "constraints.txt", "litert": "constraints-litert.txt"}
# What the build needs from the checkout; everything else (.git, .venv, tests) stays out.
SOURCES = (
    "pyproject.toml",
    "README.md",
    "agent",
    "protocol",
    "model_runtime",
    "fleet_server",
    "simulator",
    "testbed",
    "firmware_images",
)
# Distributions only the fleet server and the release tooling use: never on a device.
SERVER_ONLY = ("sqlalchemy", "aiohttp", "alembic", "asyncpg", "aiosqlite", "amqtt", "tflite")

SIZES = """
import importlib.metadata as m, json, os, sys
out = {}
for d in m.distributions():
    total = 0
    for f in d.files or ():
        p = d.locate_file(f)
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    out[d.metadata["Name"]] = total
print(json.dumps(out))
"""


def copy_sources(source: Path, into: Path) -> Path:
    """The files the build reads, copied from ``source`` to ``into``; returns ``into``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, into / name, ignore=ignore)
        else:
            shutil.copy2(path, into / name)
    return into


def create(
    venv: Path,
    runtime: str = "agent",
    source: Path = ROOT,
    python: str = "",
    compile: bool = True,
) -> None:
    """A new virtual environment ``venv`` holding ``edgefleet[runtime]`` from ``source``.

    ``compile=False`` leaves out the bytecode pip writes at install time (quicker; the
    interpreter writes what it imports later).
    """
    if runtime not in RUNTIMES:
        raise SystemExit(f"agent_env: unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if venv.exists():
        raise SystemExit(f"agent_env: {venv} exists; give a new folder")
    subprocess.run([python or sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-src-") as tmp:
        tree = copy_sources(source, Path(tmp))
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                *(() if compile else ("--no-compile",)),
                "-c",
                str(source / RUNTIMES[runtime]),
                f"{tree}[{runtime}]",
            ],
            check=True,
            env={**os.environ, "PIP_NO_INPUT": "1"},
        )


def sizes(venv: Path) -> dict[str, int]:
    """Bytes on disk of each distribution installed in ``venv``, by name."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SIZES], capture_output=True, text=True, check=True
    )
    return {str(k): int(v) for k, v in json.loads(done.stdout).items()}


def disk_usage(path: Path) -> int:
    """Bytes of every file under ``path`` (symbolic links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def report(venv: Path) -> str:
    by_name = sorted(sizes(venv).items(), key=lambda kv: -kv[1])
    lines = [f"{venv}: {disk_usage(venv) / 1e6:.1f} MB on disk"]
    lines += [f"  {size / 1e6:6.1f} MB  {name}" for name, size in by_name]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.agent_env", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("create", help="make a virtual environment with the agent only")
    make.add_argument("venv", type=Path)
    make.add_argument("--runtime", choices=sorted(RUNTIMES), default="agent")
    make.add_argument("--python", default="", help="the interpreter to make it with")
    size = sub.add_parser("size", help="what an environment takes on disk")
    size.add_argument("venv", type=Path)
    args = parser.parse_args(argv)
    if args.command == "create":
        create(args.venv, args.runtime, python=args.python)
    print(report(args.venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
