"""What ``fleetctl`` prints: text for people, the same JSON for scripts with ``--json``.

Every command that prints gives :func:`emit` its answer twice, as data and as
text; ``--json`` (accepted by every command, before or after its name) picks
the data, written as indented JSON with sorted keys.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

JSON_HELP = "machine-readable output"


def json_flag() -> argparse.ArgumentParser:
    """The parent parser that gives a command ``--json``.

    Its default is SUPPRESS, so a ``--json`` given before the command's name is not reset.
    """
    leaf = argparse.ArgumentParser(add_help=False)
    leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
    return leaf


def emit(args: argparse.Namespace, data: Any, human: str, *, end: str = "\n") -> None:
    """Print ``data`` as JSON if the command was given ``--json``, else ``human``."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human, end=end)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, each column as wide as its widest cell."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def when(text: str | None) -> str:
    """An ISO time from the server as ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    return text[:19].replace("T", " ") if text else "-"


def number(value: float | None, digits: int = 4) -> str:
    """A figure with ``digits`` decimals, or ``-``."""
    return "-" if value is None else f"{value:.{digits}f}"


def p_value(value: float | None) -> str:
    """A p-value in two significant digits, or ``-``."""
    return "-" if value is None else f"{value:.2g}"


def percent(value: float | None) -> str:
    """A share as a percentage with one decimal, or ``-``."""
    return "-" if value is None else f"{value:.1%}"
