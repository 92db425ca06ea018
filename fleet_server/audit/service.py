"""The audit feature's service: pages of the log, verification against the server's head record."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit.chain import AUDIT_DETAILS_BOUNDS, ChainReport
from fleet_server.audit.signing import AuditSigner, HeadRecord
from fleet_server.audit.store import current_head, stored_page, verify_chain
from fleet_server.db import Database
from fleet_server.stored_json import show_object
from protocol.api.audit import AuditEntryView, AuditPage, SignedAuditHead

log = logging.getLogger(__name__)


async def audit_page(
    session: AsyncSession, after: int, action: str | None, limit: int
) -> AuditPage:
    """At most ``limit`` entries after ``after`` (of ``action`` only), oldest first.

    Details that cannot be shown (unreadable, or beyond the bounds) become a note.
    """
    rows = await stored_page(session, after, action, limit + 1)
    page = rows[:limit]
    entries = []
    for seq, at, actor, action_, subject, raw, prev_hash, hash_ in page:
        details = show_object(raw, AUDIT_DETAILS_BOUNDS, "details")
        entries.append(
            AuditEntryView(
                seq=seq,
                at=at,
                actor=actor,
                action=action_,
                subject=subject,
                details=details.value,
                details_omitted=details.omitted,
                prev_hash=prev_hash,
                hash=hash_,
            )
        )
    more = len(rows) > limit
    return AuditPage(entries=entries, next_after=page[-1][0] if more else None)


async def verify_and_record(
    session: AsyncSession, signer: AuditSigner, record: HeadRecord
) -> tuple[ChainReport, SignedAuditHead]:
    """Check the chain against the server's head record, then move the record to the head.

    The record moves only if the chain holds; a broken chain leaves it as
    evidence. Returns the report and the current head, signed.
    """
    anchor, problem = record.load(signer)
    if problem is not None:
        report = await verify_chain(session)
        if report.ok:
            report = ChainReport(False, report.entries, None, problem, report.head_seq)
        return report, await current_head(session, signer)
    report = await verify_chain(session, anchor)
    head = await current_head(session, signer)
    if report.ok:
        try:
            record.save(head)
        except OSError as exc:
            log.error("cannot update the audit head record %s: %s", record.path, exc)
    return report, head


async def anchor_once(db: Database, data_dir: Path) -> ChainReport:
    """Check the log against the server's head record and, if it holds, move the record on.

    Run at start, periodically and at a clean stop, so a tail deleted through
    the database alone is found even if no operator asked for the head since.
    """
    signer = AuditSigner.in_folder(data_dir)
    async with db.session() as session:
        report, _ = await verify_and_record(session, signer, HeadRecord.in_folder(data_dir))
    return report
