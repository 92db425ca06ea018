"""``--json`` is the same everywhere in ``fleetctl``: every command takes it, one place prints.

Each command that runs (every command of the parser that is not a group waiting
for its command) is parsed from the examples in its epilog with ``--json`` after
the command and before it; and no module of the package but ``render`` writes to
standard output, so a command cannot print text that ``--json`` would not replace.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

import fleet_server.fleetctl
from fleet_server.fleetctl import build_parser
from fleet_server.fleetctl.render import emit

PACKAGE = Path(str(fleet_server.fleetctl.__file__)).parent


def _commands(path: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[str]]]:
    """Each command that runs, with the examples of its epilog (argv after ``fleetctl``)."""
    group = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    waits_for_command = group is not None and (
        group.required or group in getattr(parser, "_command_groups", [])
    )
    if path != "fleetctl" and not waits_for_command:
        lines = (parser.epilog or "").splitlines()
        examples = [line.strip() for line in lines if line.strip().startswith(f"{path} ")]
        yield path, [shlex.split(e)[1:] for e in examples]
    if group is not None:
        for name, sub in group.choices.items():
            yield from _commands(f"{path} {name}", sub)


COMMANDS = dict(_commands("fleetctl", build_parser()))


def test_the_walk_finds_the_commands_of_both_sides() -> None:
    assert {"fleetctl keys init", "fleetctl devices windows", "fleetctl alerts"} <= set(COMMANDS)
    assert "fleetctl devices" not in COMMANDS
    assert all(COMMANDS.values()), [c for c, examples in COMMANDS.items() if not examples]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_json_after_its_name_or_before_it(command: str) -> None:
    parser = build_parser()
    for example in COMMANDS[command]:
        argv = [a for a in example if a != "--json"]
        assert parser.parse_args(argv).json is False, argv
        assert parser.parse_args([*argv, "--json"]).json is True, argv
        assert parser.parse_args(["--json", *argv]).json is True, argv


def _writes_to_stdout(tree: ast.AST) -> list[int]:
    """Lines that print (``print`` without ``file=``) or write to ``sys.stdout``."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        prints = isinstance(f, ast.Name) and f.id == "print"
        if (prints and not any(k.arg == "file" for k in node.keywords)) or (
            isinstance(f, ast.Attribute)
            and f.attr == "write"
            and ast.unparse(f.value) == "sys.stdout"
        ):
            lines.append(node.lineno)
    return lines


def test_only_render_writes_to_standard_output() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "render.py" in sources and len(sources) > 10
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sources
        if path.name != "render.py" and (lines := _writes_to_stdout(ast.parse(path.read_text())))
    }
    assert not found, f"print through render.emit, so --json replaces it: {found}"


def test_emit_prints_the_data_as_sorted_json_or_the_text_as_is(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = {"b": [1, 2], "a": None}
    emit(argparse.Namespace(json=True), data, "human", end="")
    out = capsys.readouterr().out
    assert json.loads(out) == data and out.index('"a"') < out.index('"b"') and out.endswith("}\n")
    emit(argparse.Namespace(json=False), data, "w1\nw2\n", end="")
    assert capsys.readouterr().out == "w1\nw2\n"
    emit(argparse.Namespace(json=False), data, "a line")
    assert capsys.readouterr().out == "a line\n"
