"""Labels that arrive after the fact: the true classes of a window's predictions.

A device never uploads its inputs or its individual predictions, so labels
come back as what can be matched to a window without them: per window, the
confusion counts ``counts[actual][predicted]`` of its predictions whose true
class became known (a technician's inspection, a later sensor reading). The
server then shows the accuracy measured on the labelled windows beside the
estimate CBPE makes without labels (:mod:`fleet_server.drift.service`).

Rules:

- A request is all or nothing: every window must be one the server holds and
  carry a top-score histogram (only then does its model have classes), and
  every class named must be one of the window's model's; otherwise nothing is
  stored and the error names the first window that does not fit.
- Labels of a window posted again replace the earlier ones (a correction), and
  the audit log records every post with its totals.
- Labels are not checked against the window's own prediction counts: a
  window's histogram counts only the predictions it summarised, and labels may
  cover any number of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server import audit
from fleet_server.db.models import WindowLabels, WindowRow
from protocol.api import LabelsResult, WindowLabelsBody
from protocol.window import WindowCodecError, decode_window


class LabelsError(Exception):
    """Labels the server cannot store; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def confusion_counts(body: WindowLabelsBody, classes: Sequence[str]) -> list[list[int]]:
    """The body's labels as ``counts[actual][predicted]`` in the order of ``classes``."""
    width = len(classes)
    if body.counts is not None:
        if body.classes != list(classes):
            raise LabelsError(
                422,
                f"window {body.window_id}: counts are given for classes {body.classes}, "
                f"the window's model has {list(classes)} (in this order)",
            )
        return [list(row) for row in body.counts]
    index = {name: i for i, name in enumerate(classes)}
    counts = [[0] * width for _ in range(width)]
    for label in body.labels or ():
        for name in (label.actual, label.predicted):
            if name not in index:
                raise LabelsError(
                    422,
                    f"window {body.window_id}: {name!r} is not a class of its model "
                    f"{list(classes)}",
                )
        counts[index[label.actual]][index[label.predicted]] += label.count
    return counts


async def post_labels(
    session: AsyncSession, bodies: Sequence[WindowLabelsBody], actor: str
) -> LabelsResult:
    """Store the labels of ``bodies`` (see the module's rules), in the caller's transaction."""
    ids = list(dict.fromkeys(b.window_id for b in bodies))
    if len(ids) != len(bodies):
        raise LabelsError(422, "a window appears twice in one request; merge its labels")
    windows = {
        w.window_id: w
        for w in (await session.scalars(select(WindowRow).where(WindowRow.window_id.in_(ids))))
    }
    missing = [i for i in ids if i not in windows]
    if missing:
        raise LabelsError(
            404,
            f"no window {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""),
        )
    existing = {
        row.window_id: row
        for row in await session.scalars(
            select(WindowLabels).where(WindowLabels.window_id.in_(ids))
        )
    }
    now = datetime.now(UTC)
    stored = replaced = rows = correct = 0
    for body in bodies:
        window = windows[body.window_id]
        try:
            scores = decode_window(window.payload).scores
        except WindowCodecError as exc:  # stored windows were decoded once; be safe anyway
            raise LabelsError(422, f"window {body.window_id} cannot be read: {exc}") from None
        if scores is None:
            raise LabelsError(
                422, f"window {body.window_id}: its model has no score output to label"
            )
        counts = confusion_counts(body, scores.classes)
        total = sum(map(sum, counts))
        right = sum(counts[i][i] for i in range(len(counts)))
        row = existing.get(body.window_id)
        if row is None:
            row = WindowLabels(window_id=body.window_id)
            session.add(row)
            stored += 1
        else:
            replaced += 1
        # The class order travels with the counts: they mean nothing without it.
        row.classes = list(scores.classes)
        row.counts = counts
        row.rows = total
        row.correct = right
        row.posted_at = now
        row.posted_by = actor
        rows += total
        correct += right
    await audit.record(
        session,
        actor,
        "labels.post",
        ids[0] if len(ids) == 1 else f"{len(ids)} windows",
        {
            "windows": len(ids),
            "replaced": replaced,
            "rows": rows,
            "correct": correct,
            "window_ids": ids[:100],
        },
    )
    return LabelsResult(stored=stored, replaced=replaced, rows=rows, correct=correct)
