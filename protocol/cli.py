"""What every edgefleet command-line tool does alike: command groups, examples, exits.

``edge-agent``, ``fleetctl``, ``fleet-server`` and ``fleet-sim`` share these
conventions, so a user learns them once: a group given without its command
lists its commands and exits 2; every command's epilog holds examples that
parse as written; a reader that stops early (``| head``) ends the tool quietly
with status 141, as SIGPIPE ends any Unix tool.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13


class CommandParser(argparse.ArgumentParser):
    """An argument parser for a tool of command groups.

    A group given without its command (``fleetctl devices``) prints the group's help,
    which lists each command with its one-line help, and exits 2, where argparse would
    only say "the following arguments are required". A command's description defaults
    to its one-line help, and descriptions and epilogs keep their line breaks, so the
    examples in an epilog stay one to a line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._command_groups: list[argparse.Action] = []

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("title", "commands")
        kwargs.setdefault("metavar", "COMMAND")
        kwargs.setdefault("action", _CommandGroup)
        required = kwargs.pop("required", False)
        group = super().add_subparsers(**kwargs)
        if required and group.dest != argparse.SUPPRESS:
            # Checked after parsing instead, where the group's help can be shown.
            self._command_groups.append(group)
        else:
            group.required = required
        return group

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for group in self._command_groups:
            if getattr(parsed, group.dest, None) is None:
                self.print_help(sys.stderr)
                self.exit(EXIT_USAGE)
        return parsed, extras


class _CommandGroup(argparse._SubParsersAction):  # type: ignore[type-arg]
    """The commands of a group; each command's description defaults to its help."""

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("description", kwargs.get("help"))
        return super().add_parser(name, **kwargs)


def examples(*commands: str) -> str:
    """An epilog of example commands, one to a line; each must parse as written."""
    return "examples:\n" + "\n".join(f"  {command}" for command in commands)


def silence_stdout() -> None:
    """Point stdout at /dev/null, after its reader went away, so later flushes do not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def edgefleet_version() -> str:
    """The installed edgefleet distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "unknown (not installed)"
