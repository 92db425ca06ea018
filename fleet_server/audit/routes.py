"""The audit feature's REST operations: a page of the log, its verification, its signed head.

Each handler parses nothing itself (its :class:`Operation` declares the query)
and calls the service (:mod:`fleet_server.audit.service`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import AUTH_ERRORS, SERVER, Operation, answer, query
from fleet_server.audit import service
from fleet_server.audit.chain import ChainReport
from fleet_server.audit.signing import AuditKeyError, AuditSigner, HeadRecord
from protocol.api.audit import AuditPage, AuditQuery, AuditVerification, SignedAuditHead
from protocol.api.base import API_PREFIX

log = logging.getLogger(__name__)


async def list_audit(request: web.Request) -> web.StreamResponse:
    q = query(request, AuditQuery)
    async with request.app[SERVER].db.session() as session:
        page = await service.audit_page(session, q.after, q.action, q.limit)
    return answer(page)


async def _verified(request: web.Request) -> tuple[ChainReport, SignedAuditHead]:
    """The chain checked against the server's head record (which moves on if it holds)."""
    server = request.app[SERVER]
    try:
        signer = AuditSigner.in_folder(server.config.data_dir)
    except AuditKeyError as exc:
        log.error("%s", exc)
        raise ApiError(503, "the server's audit key is unavailable; see its log") from None
    async with server.db.session() as session:
        return await service.verify_and_record(
            session, signer, HeadRecord.in_folder(server.config.data_dir)
        )


async def verify_audit(request: web.Request) -> web.StreamResponse:
    report, _ = await _verified(request)
    return answer(
        AuditVerification(
            ok=report.ok, entries=report.entries, broken_at=report.broken_at, problem=report.problem
        )
    )


async def audit_head(request: web.Request) -> web.StreamResponse:
    # The server's own head record moves on only while the log extends it; a broken
    # log's head is still handed out, and fleetctl's check against a saved one says why.
    report, signed = await _verified(request)
    if not report.ok:
        log.warning("audit log broken at entry %s: %s", report.broken_at, report.problem)
    return answer(signed)


V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", f"{V}/audit", list_audit, "listAudit", "A page of the audit log, oldest first",
        tag="audit", auth="viewer", query=AuditQuery, response=AuditPage,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "GET", f"{V}/audit/verify", verify_audit, "verifyAudit",
        "Recompute the audit log's hash chain and check it extends the last head the server "
        "recorded (which then moves to the current head)",
        tag="audit", auth="viewer", response=AuditVerification, errors=(*AUTH_ERRORS, 503),
    ),
    Operation(
        "GET", f"{V}/audit/head", audit_head, "getAuditHead",
        "The audit log's newest entry, signed with the server's audit key: save it as an "
        "anchor (fleetctl audit head --out FILE) to detect later deletion or rewriting",
        tag="audit", auth="viewer", response=SignedAuditHead, errors=(*AUTH_ERRORS, 503),
    ),
)
# fmt: on
