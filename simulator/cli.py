"""``fleet-sim``: the simulator's command line (``fleet-sim demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from simulator.demo import run_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-sim", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the end-to-end demo on zero-setup defaults")
    demo.add_argument("--workdir", default=".demo", help="where the demo writes (emptied first)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(Path(args.workdir))
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
