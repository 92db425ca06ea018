"""The ``audit_log`` table: appending entries, reading them back, the current head."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit.chain import (
    AUDIT_DETAILS_BOUNDS,
    GENESIS,
    Anchor,
    ChainCheck,
    ChainEntry,
    ChainReport,
    entry_hash,
)
from fleet_server.audit.signing import AuditSigner
from fleet_server.db.dialects import serialise_on
from fleet_server.db.models import AuditEntry
from fleet_server.stored_json import load_json
from protocol.api.audit import AuditHead, SignedAuditHead
from protocol.messages import freeform_problem

log = logging.getLogger(__name__)

_LOCK_ID = 0x6564_6765  # advisory lock serialising appends across replicas

# An entry's columns, its details as the text the database holds.
_COLUMNS = (
    AuditEntry.seq,
    AuditEntry.at,
    AuditEntry.actor,
    AuditEntry.action,
    AuditEntry.subject,
    cast(AuditEntry.details, Text),
    AuditEntry.prev_hash,
    AuditEntry.hash,
)


async def record(
    session: AsyncSession,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in the caller's transaction (it lands only if the change does).

    Details beyond :data:`AUDIT_DETAILS_BOUNDS` are replaced by a note saying
    so (and logged), so that no entry is ever stored that a reader cannot show.
    """
    # The head read below is the one appended to: no other append between the two.
    await serialise_on(session, _LOCK_ID)
    last = (
        await session.execute(select(AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1))
    ).scalar_one_or_none()
    prev = last or GENESIS
    at = datetime.now(UTC)
    body = json.loads(json.dumps(details or {}, default=str))
    problem = freeform_problem(body, AUDIT_DETAILS_BOUNDS)
    if problem is not None:
        log.warning("audit %s %s: details not stored, they %s", action, subject, problem.message)
        body = {"details_omitted": f"not recorded: what was given {problem.message}"}
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


async def stored_entries(session: AsyncSession) -> AsyncIterator[ChainEntry]:
    """Every stored entry, in sequence order.

    Details are read as the text the database holds, so an entry whose details
    no longer parse comes with ``unreadable`` saying why instead of failing.
    """
    rows = await session.stream(select(*_COLUMNS).order_by(AuditEntry.seq))
    async for seq, at, actor, action, subject, raw, prev_hash, hash_ in rows:
        loaded = load_json(raw)
        yield ChainEntry(
            seq, at, actor, action, subject, loaded.value, prev_hash, hash_, loaded.problem
        )


async def stored_page(
    session: AsyncSession, after: int, action: str | None, limit: int
) -> list[tuple[Any, ...]]:
    """At most ``limit`` rows after ``after`` (of ``action`` only), details as stored text."""
    statement = select(*_COLUMNS).where(AuditEntry.seq > after)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    statement = statement.order_by(AuditEntry.seq).limit(limit)
    return [tuple(row) for row in (await session.execute(statement)).all()]


async def verify_chain(session: AsyncSession, anchor: Anchor | None = None) -> ChainReport:
    """Recompute every hash; report the first edited, inserted or deleted entry."""
    check = ChainCheck(anchor)
    async for e in stored_entries(session):
        report = check.add_entry(e)
        if report is not None:
            return report
    return check.finish()


async def current_head(session: AsyncSession, signer: AuditSigner) -> SignedAuditHead:
    """The log's newest entry, signed now (an empty log's head is entry 0, the genesis hash)."""
    # One statement, so the count and the newest number are of the same moment.
    count, newest = (await session.execute(select(func.count(), func.max(AuditEntry.seq)))).one()
    seq, hash_ = 0, GENESIS
    if newest is not None:
        seq = newest
        found = await session.scalar(select(AuditEntry.hash).where(AuditEntry.seq == newest))
        hash_ = found or GENESIS
    head = AuditHead(
        seq=seq,
        hash=hash_,
        entries=count,
        signed_at=datetime.now(UTC),
        key_id=signer.key_id,
    )
    return signer.sign(head)
