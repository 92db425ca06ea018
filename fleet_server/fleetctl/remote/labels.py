"""``fleetctl labels post``: labels that arrived later, per window."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, percent

LABELS_PER_REQUEST = 1000


def read_labels_file(path: Path) -> list[dict[str, Any]]:
    """Per-window label bodies from a file.

    ``.json``: the API's body (or its list of windows); ``.csv``: columns
    ``window_id,actual,predicted`` (class names) and optionally ``count``.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path} is not JSON: {exc}") from None
        windows = data.get("windows") if isinstance(data, dict) else data
        if not isinstance(windows, list):
            raise CommandError(f'{path} must hold {{"windows": [...]}} or a list of windows')
        return windows
    if path.suffix.lower() != ".csv":
        raise CommandError(
            f"{path}: give labels as .csv (window_id,actual,predicted[,count]) or .json"
        )
    reader = csv.DictReader(io.StringIO(text))
    needed = {"window_id", "actual", "predicted"}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise CommandError(f"{path} needs a header with columns window_id,actual,predicted[,count]")
    by_window: dict[str, list[dict[str, Any]]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            count = int(row.get("count") or 1)
        except ValueError:
            raise CommandError(
                f"{path}:{line}: count {row['count']!r} is not a whole number"
            ) from None
        by_window.setdefault(row["window_id"], []).append(
            {"actual": row["actual"], "predicted": row["predicted"], "count": count}
        )
    return [{"window_id": w, "labels": labels} for w, labels in by_window.items()]


def cmd_labels_post(args: argparse.Namespace) -> None:
    windows = read_labels_file(Path(args.file))
    if not windows:
        raise CommandError(f"{args.file} holds no labels")
    client = api_client(args)
    totals = {"stored": 0, "replaced": 0, "rows": 0, "correct": 0}
    for i in range(0, len(windows), LABELS_PER_REQUEST):
        result = client.post("/labels", {"windows": windows[i : i + LABELS_PER_REQUEST]})
        for key in totals:
            totals[key] += result[key]
    share = totals["correct"] / totals["rows"] if totals["rows"] else None
    emit(
        args,
        totals,
        f"Labels of {totals['stored'] + totals['replaced']} windows stored "
        f"({totals['replaced']} replaced earlier ones): {totals['rows']} predictions, "
        f"{totals['correct']} right ({percent(share)})",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``labels post``."""
    labels = add_group(groups, "labels", "labels that arrived later, per window (server)")
    p = add_command(
        labels,
        "post",
        cmd_labels_post,
        parents,
        "post labels: .csv window_id,actual,predicted[,count] or the API's .json body",
        "fleetctl labels post labels.csv",
        "fleetctl labels post labels.json",
    )
    p.add_argument("file", help=".csv with a header window_id,actual,predicted[,count], or .json")
