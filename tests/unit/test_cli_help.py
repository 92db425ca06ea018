"""Every command of every tool explains itself in its --help.

The parsers are the ones the entry points build (each tool's ``build_parser``),
walked down to every command: each option and argument has a help text, no
text carries reST or Markdown backticks, each command has examples in its
epilog that parse as written, a command group given without its command lists
its commands (exit 2), and every tool answers ``--version``. A command added
without these fails here, named with the option it misses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

import agent.cli
import fleet_server.cli
import fleet_server.fleetctl
import simulator.cli


class Tool(NamedTuple):
    build_parser: Callable[[], argparse.ArgumentParser]
    main: Callable[[Sequence[str]], int]
    module: str


TOOLS = {
    "fleetctl": Tool(
        fleet_server.fleetctl.build_parser, fleet_server.fleetctl.main, "fleet_server.fleetctl"
    ),
    "fleet-server": Tool(fleet_server.cli.build_parser, fleet_server.cli.main, "fleet_server.cli"),
    "edge-agent": Tool(agent.cli.build_parser, agent.cli.main, "agent.cli"),
    "fleet-sim": Tool(simulator.cli.build_parser, simulator.cli.main, "simulator.cli"),
}


class Command(NamedTuple):
    tool: str
    path: str  # as typed: "fleetctl devices list"
    parser: argparse.ArgumentParser

    @property
    def group(self) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
        return next(
            (a for a in self.parser._actions if isinstance(a, argparse._SubParsersAction)), None
        )


def _walk(tool: str, path: str, parser: argparse.ArgumentParser) -> Iterator[Command]:
    command = Command(tool, path, parser)
    yield command
    if command.group is not None:
        seen: set[int] = set()
        for name, sub in command.group.choices.items():
            if id(sub) not in seen:  # an alias names a parser already walked
                seen.add(id(sub))
                yield from _walk(tool, f"{path} {name}", sub)


def _needs_command(command: Command) -> bool:
    """A tool alone, or a group whose command is required (not one that also runs by itself)."""
    if command.group is None:
        return False
    # CommandParser keeps the groups declared required=True here.
    required = getattr(command.parser, "_command_groups", [])
    return command.path == command.tool or command.group.required or command.group in required


COMMANDS = [c for name, tool in TOOLS.items() for c in _walk(name, name, tool.build_parser())]
LEAVES = [c for c in COMMANDS if not _needs_command(c)]
GROUPS = [c for c in COMMANDS if _needs_command(c)]


def _ids(commands: list[Command]) -> list[str]:
    return [c.path for c in commands]


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or str(action.metavar or action.dest)


def _examples(command: Command) -> list[str]:
    lines = (command.parser.epilog or "").splitlines()
    return [line.strip() for line in lines if line.strip().startswith(f"{command.tool} ")]


def run_in_process(
    tool: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    """Run a tool's real entry point; its exit status, stdout and stderr."""
    try:
        status: object = TOOLS[tool].main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_every_tool_has_commands_to_check() -> None:
    assert {c.tool for c in COMMANDS} == set(TOOLS)
    assert "fleetctl devices list" in _ids(LEAVES)
    assert "fleetctl devices" in _ids(GROUPS)


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_every_option_and_argument_has_help(command: Command) -> None:
    missing = []
    for action in command.parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if (a.help or "").strip()}
            missing += [
                f"{command.path} {name}: the command has no help= in add_parser"
                for name in action.choices
                if name not in helped
            ]
        elif not (action.help or "").strip():
            missing.append(f"{command.path}: {_name(action)} has no help text")
    assert not missing, "\n".join(missing)
    assert (command.parser.description or "").strip(), f"{command.path}: no description"


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_help_has_no_backticks(command: Command) -> None:
    text = command.parser.format_help()  # also fails on a stray % in a help text
    quoted = [line.strip() for line in text.splitlines() if "`" in line]
    assert not quoted, f"{command.path} --help shows backticks (write plain text): {quoted}"


@pytest.mark.parametrize("command", LEAVES, ids=_ids(LEAVES))
def test_every_command_has_examples_of_itself(command: Command) -> None:
    examples = _examples(command)
    assert examples, (
        f"{command.path}: its epilog has no example (a line starting with '{command.tool} '); "
        f'add epilog=_examples("{command.path} ...") to its add_parser'
    )
    others = [e for e in examples if e != command.path and not e.startswith(f"{command.path} ")]
    assert not others, f"{command.path}: examples of another command in its epilog: {others}"


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_examples_parse_as_written(command: Command) -> None:
    tool = TOOLS[command.tool].build_parser()
    for example in _examples(command):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                tool.parse_args(shlex.split(example)[1:])
        except SystemExit as exc:
            pytest.fail(
                f"{command.path}: the example {example!r} does not parse (exit {exc.code}): "
                f"{stderr.getvalue().strip().splitlines()[-1:]}"
            )


@pytest.mark.parametrize("command", GROUPS, ids=_ids(GROUPS))
def test_a_group_alone_lists_its_commands(
    command: Command, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_in_process(command.tool, command.path.split()[1:], capsys)
    assert status == 2, f"{command.path}: exit {status}, not 2"
    assert out == ""
    assert "required" not in err and "error:" not in err, err
    shown = " ".join(err.split())
    assert command.group is not None
    for choice in command.group._choices_actions:
        listed = f"{choice.dest} {' '.join((choice.help or '').split())}"
        assert listed in shown, f"{command.path} alone does not list '{listed}':\n{err}"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_prints_its_version(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_in_process(tool, ["--version"], capsys)
    assert status == 0
    name, version = out.split()
    assert name == tool and version[0].isdigit(), out


@pytest.mark.parametrize(
    ("tool", "argv", "listed"),
    [("fleetctl", ["devices"], ["list", "register"]), ("edge-agent", [], ["verify", "run"])],
)
def test_a_group_alone_lists_its_commands_in_a_real_process(
    tool: str, argv: list[str], listed: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", TOOLS[tool].module, *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: {' '.join([tool, *argv])} ")
    assert "required" not in result.stderr
    commands = {line.split()[0] for line in result.stderr.splitlines() if line.startswith("    ")}
    assert set(listed) <= commands, result.stderr


_READS = re.compile(r"environ(?:\.get)?[\[(]\s*\"(EDGEFLEET_[A-Z_]+)\"")


@pytest.mark.parametrize("tool", TOOLS)
def test_the_tools_help_names_each_environment_variable_it_reads(tool: str) -> None:
    path = Path(str(sys.modules[TOOLS[tool].module].__file__))
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    source = "\n".join(f.read_text() for f in files)
    read = sorted(set(_READS.findall(source)))
    text = TOOLS[tool].build_parser().format_help()
    missing = [name for name in read if name not in text]
    assert not missing, f"{tool} --help does not name {missing}, which it reads"
    if read:
        assert "reads no environment variables" not in text, f"{tool} reads {read}"
