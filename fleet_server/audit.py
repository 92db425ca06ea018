"""The append-only, hash-chained audit log.

Every operator action and every rollout decision is one entry. Each entry's
hash covers its own fields and the previous entry's hash, so editing or
deleting any entry breaks the chain from there on, which :func:`verify_chain`
reports. Entries are appended under a lock on PostgreSQL (and SQLite's
single writer) so two replicas cannot fork the chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db.models import AuditEntry

GENESIS = "0" * 64
_LOCK_ID = 0x6564_6765  # advisory lock serialising appends across replicas


def entry_hash(
    prev_hash: str, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any]
) -> str:
    """The hash of one entry, chained to the previous one."""
    canonical = json.dumps(
        {
            "prev": prev_hash,
            "at": _timestamp(at),
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _timestamp(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite hands back naive datetimes
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


async def record(
    session: AsyncSession,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in the caller's transaction (it lands only if the change does)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    last = (
        await session.execute(select(AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1))
    ).scalar_one_or_none()
    prev = last or GENESIS
    at = datetime.now(UTC)
    body = json.loads(json.dumps(details or {}, default=str))
    entry = AuditEntry(
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        details=body,
        prev_hash=prev,
        hash=entry_hash(prev, at, actor, action, subject, body),
    )
    session.add(entry)
    await session.flush()
    return entry


@dataclass(frozen=True)
class ChainReport:
    """The result of checking the chain: ``ok``, or the first entry that breaks it."""

    ok: bool
    entries: int
    broken_at: int | None = None
    problem: str | None = None


async def verify_chain(session: AsyncSession) -> ChainReport:
    """Recompute every hash; report the first edited, inserted or deleted entry."""
    prev = GENESIS
    count = 0
    rows = await session.stream_scalars(select(AuditEntry).order_by(AuditEntry.seq))
    async for entry in rows:
        count += 1
        if entry.prev_hash != prev:
            return ChainReport(
                False, count, entry.seq, "it does not follow the entry before it (one was deleted?)"
            )
        expected = entry_hash(
            prev, entry.at, entry.actor, entry.action, entry.subject, entry.details
        )
        if entry.hash != expected:
            return ChainReport(False, count, entry.seq, "its content was changed")
        prev = entry.hash
    return ChainReport(True, count)
