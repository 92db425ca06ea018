"""Storing labels: the rules of :mod:`fleet_server.labels.rules` over the stored windows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server import audit
from fleet_server.db.models import WindowLabels
from fleet_server.labels import store
from fleet_server.labels.rules import distinct_windows, labelled, missing_windows
from fleet_server.rollouts.store import add_labels
from protocol.api.labels import LabelsResult, WindowLabelsBody


async def post_labels(
    session: AsyncSession, bodies: Sequence[WindowLabelsBody], actor: str
) -> LabelsResult:
    """Store the labels of ``bodies`` in the caller's transaction.

    The rules are the package's (:mod:`fleet_server.labels`).
    """
    ids = distinct_windows(bodies)
    windows = await store.windows(session, ids)
    missing_windows(ids, windows)
    existing = await store.labels_of(session, ids)
    now = datetime.now(UTC)
    stored = replaced = rows = correct = 0
    for body in bodies:
        window = windows[body.window_id]
        labels = labelled(body, window.payload)
        row = existing.get(body.window_id)
        # The rollout gates read labelled accuracy from the hourly aggregates: a
        # correction adds its difference to the labels it replaces.
        await add_labels(
            session,
            window.device_id,
            window.model_name,
            window.model_version,
            window.end,
            labels.rows - (row.rows if row else 0),
            labels.correct - (row.correct if row else 0),
        )
        if row is None:
            row = WindowLabels(window_id=body.window_id)
            session.add(row)
            stored += 1
        else:
            replaced += 1
        row.classes = labels.classes
        row.counts = labels.counts
        row.rows = labels.rows
        row.correct = labels.correct
        row.posted_at = now
        row.posted_by = actor
        rows += labels.rows
        correct += labels.correct
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
