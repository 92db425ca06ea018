"""The operators' REST API under ``/api/v1``: devices, releases, assignments, tokens, audit.

Each handler does one thing in one transaction, through the service modules
(registry, releases, director, auth, audit), and answers with a model of
:mod:`protocol.api`. Work that must follow the commit (creating a device's
director repository, announcing an assignment over MQTT) runs after it, and
its failure is logged without undoing what was committed: the device finds
its assignment at its next poll either way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from sqlalchemy import Text, cast, select, text
from tuf.api import exceptions as tuf_exc

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import (
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.audit import (
    AUDIT_DETAILS_BOUNDS,
    AuditKeyError,
    AuditSigner,
    HeadRecord,
    verify_and_record,
)
from fleet_server.auth import create_token, list_tokens, revoke_token
from fleet_server.db.models import (
    ApiToken,
    AuditEntry,
    Release,
)
from fleet_server.publishing import ReleaseError
from fleet_server.stored_json import show_object
from protocol.api import (
    API_PREFIX,
    AuditEntryView,
    AuditPage,
    AuditQuery,
    AuditVerification,
    Health,
    ReleaseList,
    ReleasePush,
    ReleasePushResult,
    ReleaseQuery,
    ReleaseView,
    SignedAuditHead,
    TokenCreated,
    TokenList,
    TokenRequest,
    TokenView,
)

log = logging.getLogger(__name__)

MAX_PUSH_BODY = 512 << 20  # base64 of the pushed files, in JSON
_VERSIONED_METADATA = re.compile(r"metadata/\d+\.[a-z]+\.json")


def release_view(r: Release) -> ReleaseView:
    return ReleaseView(
        target_path=r.target_path,
        name=r.name,
        version=r.version,
        release_counter=r.release_counter,
        hardware_ids=list(r.hardware_ids),
        sha256=r.sha256,
        length=r.length,
        released_at=r.released_at,
        yanked_at=r.yanked_at,
        yank_reason=r.yank_reason,
    )


def token_view(t: ApiToken) -> TokenView:
    return TokenView(
        id=t.id,
        name=t.name,
        role=t.role,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


# -- health --------------------------------------------------------------------


async def health(request: web.Request) -> web.StreamResponse:
    try:
        async with request.app[SERVER].db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:  # any database failure means "not ready", never a crash
        log.warning("health check: the database does not answer: %s", exc)
        raise ApiError(503, "the database does not answer", {"Retry-After": "5"}) from None
    return answer(Health())


# -- releases ------------------------------------------------------------------


async def list_releases(request: web.Request) -> web.StreamResponse:
    q = query(request, ReleaseQuery)
    statement = select(Release).order_by(Release.name, Release.release_counter)
    if q.name is not None:
        statement = statement.where(Release.name == q.name)
    async with request.app[SERVER].db.session() as session:
        rows = (await session.scalars(statement)).all()
        return answer(ReleaseList(releases=[release_view(r) for r in rows]))


def check_push(repository: Path, files: Mapping[str, bytes]) -> None:
    """Refuse pushed paths that would clash with the repository's files.

    A path may not be both a file and a directory, and versioned metadata
    (``N.root.json``, ``N.targets.json``, …) never changes once published:
    a device that has seen version N must never find different bytes there.
    """
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files or (repository / prefix).is_file():
                raise ApiError(409, f"files: {prefix} is a file, so {rel} cannot be under it")
        dest = repository / rel
        if dest.is_dir():
            raise ApiError(409, f"files: {rel} is a directory on the server")
        if _VERSIONED_METADATA.fullmatch(rel) and dest.is_file() and dest.read_bytes() != data:
            raise ApiError(
                409,
                f"files: {rel} differs from the published one; versioned metadata never "
                "changes (sign a new version instead)",
            )


async def push_release(request: web.Request) -> web.StreamResponse:
    b = body(request, ReleasePush)
    server = request.app[SERVER]
    files = dict(b.files)
    check_push(server.releases.repository.path, files)
    try:
        async with server.db.session() as session:
            rows = await server.releases.publish(session, files, request[PRINCIPAL].actor)
            published = [release_view(r) for r in rows]
    except (tuf_exc.RepositoryError, ValueError) as exc:
        # Metadata so broken that python-tuf cannot even load it as a trusted root.
        raise ReleaseError(f"the pushed metadata does not verify: {exc}") from None
    result = ReleasePushResult(published=published, files=len(files))
    return answer(result, 201 if published else 200)


# -- tokens --------------------------------------------------------------------


async def create_api_token(request: web.Request) -> web.StreamResponse:
    b = body(request, TokenRequest)
    async with request.app[SERVER].db.session() as session:
        row, bearer = await create_token(
            session, name=b.name, role=b.role, actor=request[PRINCIPAL].actor
        )
        return answer(TokenCreated(token=bearer, info=token_view(row)), 201)


async def list_api_tokens(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        return answer(TokenList(tokens=[token_view(t) for t in await list_tokens(session)]))


async def revoke_api_token(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        row = await revoke_token(
            session, request.match_info["token_id"], actor=request[PRINCIPAL].actor
        )
        return answer(token_view(row))


# -- audit ---------------------------------------------------------------------


async def list_audit(request: web.Request) -> web.StreamResponse:
    q = query(request, AuditQuery)
    statement = select(
        AuditEntry.seq,
        AuditEntry.at,
        AuditEntry.actor,
        AuditEntry.action,
        AuditEntry.subject,
        cast(AuditEntry.details, Text),  # as stored: unreadable details become a note
        AuditEntry.prev_hash,
        AuditEntry.hash,
    ).where(AuditEntry.seq > q.after)
    if q.action is not None:
        statement = statement.where(AuditEntry.action == q.action)
    statement = statement.order_by(AuditEntry.seq).limit(q.limit + 1)
    async with request.app[SERVER].db.session() as session:
        rows = list((await session.execute(statement)).all())
    page = rows[: q.limit]
    entries = []
    for seq, at, actor, action, subject, raw, prev_hash, hash_ in page:
        details = show_object(raw, AUDIT_DETAILS_BOUNDS, "details")
        entries.append(
            AuditEntryView(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                subject=subject,
                details=details.value,
                details_omitted=details.omitted,
                prev_hash=prev_hash,
                hash=hash_,
            )
        )
    more = len(rows) > q.limit
    return answer(AuditPage(entries=entries, next_after=page[-1][0] if more else None))


def _audit_signer(request: web.Request) -> AuditSigner:
    try:
        return AuditSigner.in_folder(request.app[SERVER].config.data_dir)
    except AuditKeyError as exc:
        log.error("%s", exc)
        raise ApiError(503, "the server's audit key is unavailable; see its log") from None


async def verify_audit(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    signer = _audit_signer(request)
    async with server.db.session() as session:
        report, _ = await verify_and_record(
            session, signer, HeadRecord.in_folder(server.config.data_dir)
        )
    return answer(
        AuditVerification(
            ok=report.ok, entries=report.entries, broken_at=report.broken_at, problem=report.problem
        )
    )


async def audit_head(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    signer = _audit_signer(request)
    async with server.db.session() as session:
        # The server's own head record moves on only while the log extends it; a broken
        # log's head is still handed out, and fleetctl's check against a saved one says why.
        report, signed = await verify_and_record(
            session, signer, HeadRecord.in_folder(server.config.data_dir)
        )
    if not report.ok:
        log.warning("audit log broken at entry %s: %s", report.broken_at, report.problem)
    return answer(signed)


# -- the table -----------------------------------------------------------------

_AUTH_ERRORS = (401, 403)
V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/healthz", health, "health", "Is the server up, its database reachable",
        tag="meta", auth="public", response=Health, errors=(503,),
    ),
    Operation(
        "GET", f"{V}/releases", list_releases, "listReleases", "List released bundles",
        tag="releases", auth="viewer", query=ReleaseQuery, response=ReleaseList,
        errors=(*_AUTH_ERRORS, 422),
    ),
    Operation(
        "POST", f"{V}/releases", push_release, "pushRelease",
        "Push signed image-repository files; published only if they verify",
        tag="releases", auth="operator", body=ReleasePush, response=ReleasePushResult,
        status=201, other_success=(200,), errors=(400, *_AUTH_ERRORS, 409, 413, 422),
        body_limit=MAX_PUSH_BODY,
    ),
    Operation(
        "GET", f"{V}/tokens", list_api_tokens, "listTokens", "List API tokens",
        tag="tokens", auth="admin", response=TokenList, errors=_AUTH_ERRORS,
    ),
    Operation(
        "POST", f"{V}/tokens", create_api_token, "createToken",
        "Create an API token; the token is in the answer, only there",
        tag="tokens", auth="admin", body=TokenRequest, response=TokenCreated, status=201,
        errors=(400, *_AUTH_ERRORS, 413, 422),
    ),
    Operation(
        "DELETE", f"{V}/tokens/{{token_id}}", revoke_api_token, "revokeToken",
        "Revoke an API token",
        tag="tokens", auth="admin", response=TokenView, errors=(*_AUTH_ERRORS, 404, 409),
    ),
    Operation(
        "GET", f"{V}/audit", list_audit, "listAudit", "A page of the audit log, oldest first",
        tag="audit", auth="viewer", query=AuditQuery, response=AuditPage,
        errors=(*_AUTH_ERRORS, 422),
    ),
    Operation(
        "GET", f"{V}/audit/verify", verify_audit, "verifyAudit",
        "Recompute the audit log's hash chain and check it extends the last head the server "
        "recorded (which then moves to the current head)",
        tag="audit", auth="viewer", response=AuditVerification, errors=(*_AUTH_ERRORS, 503),
    ),
    Operation(
        "GET", f"{V}/audit/head", audit_head, "getAuditHead",
        "The audit log's newest entry, signed with the server's audit key: save it as an "
        "anchor (fleetctl audit head --out FILE) to detect later deletion or rewriting",
        tag="audit", auth="viewer", response=SignedAuditHead, errors=(*_AUTH_ERRORS, 503),
    ),
)
# fmt: on
