"""How a ``fleetctl`` module declares its commands: groups, and commands with their examples."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from protocol.cli import examples


def add_group(groups: Any, name: str, help: str) -> Any:
    """A group of commands (``fleetctl NAME COMMAND``); given alone, it lists them."""
    return groups.add_parser(name, help=help).add_subparsers(dest="cmd", required=True)


def add_command(
    group: Any,
    name: str,
    func: Callable[[argparse.Namespace], None],
    parents: list[argparse.ArgumentParser],
    help: str,
    *example_lines: str,
    epilog: str = "",
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A command that runs ``func``; its epilog is ``epilog`` then its examples, if any."""
    if example_lines:
        epilog += examples(*example_lines)
    parser: argparse.ArgumentParser = group.add_parser(
        name, parents=parents, help=help, epilog=epilog, **kwargs
    )
    parser.set_defaults(func=func)
    return parser
