"""``fleet-sim``: the simulator's command line (``fleet-sim demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.cli import CommandParser, edgefleet_version
from simulator.demo import run_demo


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fleet-sim",
        description=__doc__.splitlines()[0].replace("``", ""),
        epilog="examples:\n  fleet-sim demo",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {edgefleet_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the end-to-end demo on zero-setup defaults",
        epilog="It needs nothing running: the demo starts its own broker, server and devices\n"
        "on free ports, and exits 0 when every step went as the story says.\n\n"
        "examples:\n  fleet-sim demo\n  fleet-sim demo --workdir /tmp/edgefleet-demo",
    )
    demo.add_argument(
        "--workdir",
        default=".demo",
        help="where the demo writes (emptied first; default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(Path(args.workdir))
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
