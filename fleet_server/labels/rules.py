"""The rules of labels, over plain data: which labels fit a window, as confusion counts."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fleet_server.errors import FleetError, NotFound, Unprocessable
from protocol.api.labels import WindowLabelsBody
from protocol.window import WindowCodecError, decode_window


class LabelsError(FleetError):
    """Labels the server cannot store; the message says why."""


class LabelsMismatch(Unprocessable, LabelsError):
    """The labels do not fit the window they name (its classes, its outputs, its bytes)."""


class WindowNotFound(NotFound, LabelsError):
    """The labels name a window the server does not hold."""


def confusion_counts(body: WindowLabelsBody, classes: Sequence[str]) -> list[list[int]]:
    """The body's labels as ``counts[actual][predicted]`` in the order of ``classes``."""
    width = len(classes)
    if body.counts is not None:
        if body.classes != list(classes):
            raise LabelsMismatch(
                f"window {body.window_id}: counts are given for classes {body.classes}, "
                f"the window's model has {list(classes)} (in this order)",
            )
        return [list(row) for row in body.counts]
    index = {name: i for i, name in enumerate(classes)}
    counts = [[0] * width for _ in range(width)]
    for label in body.labels or ():
        for name in (label.actual, label.predicted):
            if name not in index:
                raise LabelsMismatch(
                    f"window {body.window_id}: {name!r} is not a class of its model "
                    f"{list(classes)}",
                )
        counts[index[label.actual]][index[label.predicted]] += label.count
    return counts


def distinct_windows(bodies: Sequence[WindowLabelsBody]) -> list[str]:
    """The windows ``bodies`` label, in order; refused if one appears twice."""
    ids = list(dict.fromkeys(b.window_id for b in bodies))
    if len(ids) != len(bodies):
        raise LabelsMismatch("a window appears twice in one request; merge its labels")
    return ids


def missing_windows(ids: Sequence[str], held: Collection[str]) -> None:
    """Refuse labels for windows the server does not hold, naming the first."""
    missing = [i for i in ids if i not in held]
    if missing:
        raise WindowNotFound(
            f"no window {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""),
        )


@dataclass(frozen=True)
class Labelled:
    """A window's labels as stored: its model's classes, ``counts[actual][predicted]``."""

    classes: list[str]
    counts: list[list[int]]
    rows: int
    correct: int


def labelled(body: WindowLabelsBody, payload: bytes) -> Labelled:
    """The labels of ``body`` for the window stored as ``payload`` (refused if they do not fit)."""
    try:
        scores = decode_window(payload).scores
    except WindowCodecError as exc:  # stored windows were decoded once; be safe anyway
        raise LabelsMismatch(f"window {body.window_id} cannot be read: {exc}") from None
    if scores is None:
        raise LabelsMismatch(f"window {body.window_id}: its model has no score output to label")
    counts = confusion_counts(body, scores.classes)
    right = sum(counts[i][i] for i in range(len(counts)))
    # The class order travels with the counts: they mean nothing without it.
    return Labelled(list(scores.classes), counts, sum(map(sum, counts)), right)
