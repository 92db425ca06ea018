"""The append-only, hash-chained audit log, and its signed head.

Every operator action and every rollout decision is one entry. Each entry's
hash covers its own fields and the previous entry's hash, so editing or
deleting any entry breaks the chain from there on, which :func:`verify_chain`
reports. Entries are appended under a lock on PostgreSQL (and SQLite's
single writer) so two replicas cannot fork the chain.

A chain alone cannot show that its newest entries were deleted: what is left
is still a valid chain. So the server signs its *head* (the newest entry's
sequence number and hash) with an audit key of its own, kept in its data
folder, and hands the signed head out (``GET /api/v1/audit/head``). An
operator saves heads outside the server (``fleetctl audit head --out FILE``);
checking the chain against a saved head (:class:`ChainCheck` with an
:class:`Anchor`) then finds a deleted tail, a rewritten entry, or a head that
another key signed. The checks are pure: the server runs them over its rows,
``fleetctl`` over the pages the API serves, so an operator need not take the
server's word for it. The server also keeps the last head it handed out or
verified in its data folder (:class:`HeadRecord`), so its own verification
finds a deleted tail done through the database alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import ValidationError
from sqlalchemy import Text, cast, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.db import Database
from fleet_server.db.models import AuditEntry
from fleet_server.stored_json import load_json
from protocol.api import AuditHead, SignedAuditHead
from protocol.messages import FreeformBounds, freeform_problem

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_LOCK_ID = 0x6564_6765  # advisory lock serialising appends across replicas

AUDIT_KEY_FILE = "audit-key.pem"
# Signatures over a head start with this, so no other message of ours can pass for one.
_HEAD_CONTEXT = b"edgefleet audit head v1\n"

# What an entry's details may hold: generous (an assignment to a tag lists every device it
# reached, rollout evidence is large); the depth bound is what keeps every reader (the
# API's serializer stops at about 255 levels) able to show it.
AUDIT_DETAILS_BOUNDS = FreeformBounds(
    max_depth=32, max_items=4_000_000, max_string=1 << 20, max_bytes=48 << 20
)


class AuditKeyError(Exception):
    """The audit key in the data folder cannot be read or created."""


def entry_hash(
    prev_hash: str, at: datetime, actor: str, action: str, subject: str, details: Any
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
    return at.astimezone(UTC).isoformat(timespec="microseconds")


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
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
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


# -- checking the chain -------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A head saved earlier: the log had ``entries`` entries, the newest ``seq`` with ``hash``."""

    seq: int
    hash: str
    entries: int
    signed_at: datetime


@dataclass(frozen=True)
class ChainReport:
    """The result of checking the chain: ``ok``, or the first entry that breaks it."""

    ok: bool
    entries: int
    broken_at: int | None = None
    problem: str | None = None
    head_seq: int | None = None
    head_hash: str = GENESIS


class ChainCheck:
    """Checks entries fed in sequence order; with an ``anchor``, that the log still extends it.

    Pure: :meth:`add` each entry (``details`` as stored, or ``None`` if they are
    unreadable, with ``unreadable`` saying why), then :meth:`finish`. The first
    problem found is the answer; later entries are not looked at. Entry times
    only shape the wording of a problem already found (replicas' clocks may
    differ a little), never whether there is one.
    """

    def __init__(self, anchor: Anchor | None = None) -> None:
        self.anchor = anchor
        self.entries = 0
        self.prev = GENESIS
        self.last_seq: int | None = None
        self.anchor_seen = anchor is None or anchor.seq == 0
        # The entries written before the anchor was signed: how many, the newest's number.
        self.before_count = 0
        self.before_last = 0
        self.report: ChainReport | None = None

    def _broken(self, seq: int, problem: str) -> ChainReport:
        self.report = ChainReport(False, self.entries, seq, problem, self.last_seq, self.prev)
        return self.report

    def add(
        self,
        *,
        seq: int,
        at: datetime,
        actor: str,
        action: str,
        subject: str,
        details: Any,
        prev_hash: str,
        hash: str,
        unreadable: str | None = None,
    ) -> ChainReport | None:
        """Take the next entry; the report if it breaks the chain or the anchor."""
        if self.report is not None:
            return self.report
        anchor = self.anchor
        if anchor is not None and not self.anchor_seen and seq > anchor.seq:
            return self._broken(seq, self._cut(seq, at))
        self.entries += 1
        if prev_hash != self.prev:
            return self._broken(seq, "it does not follow the entry before it (one was deleted?)")
        if unreadable is not None:
            return self._broken(seq, f"its content was changed: what its details hold {unreadable}")
        if hash != entry_hash(self.prev, at, actor, action, subject, details):
            return self._broken(seq, "its content was changed")
        self.prev = hash
        self.last_seq = seq
        if anchor is None:
            return None
        if at <= anchor.signed_at:
            self.before_count, self.before_last = self.entries, seq
        if seq == anchor.seq:
            self.anchor_seen = True
            if hash != anchor.hash and at > anchor.signed_at:
                return self._broken(seq, self._cut(seq, at))
            if hash != anchor.hash:
                return self._broken(
                    seq,
                    f"it is not the entry the anchor names (hash {hash[:16]}…, anchored "
                    f"{anchor.hash[:16]}…): it or an entry before it was rewritten and the "
                    "chain re-hashed",
                )
        return None

    def _cut(self, seq: int, at: datetime) -> str:
        """Entry ``seq`` stands where the anchored entry should: say what was deleted."""
        anchor = self.anchor
        assert anchor is not None
        when = _when(anchor.signed_at)
        if at > anchor.signed_at:
            return (
                f"entry {seq} was written after the anchor was signed ({when}) and follows "
                f"entry {self.before_last}, where the anchor names entry {anchor.seq}: "
                f"{self._deleted()}"
            )
        return (
            f"entry {anchor.seq}, the newest when the anchor was signed ({when}), is missing: "
            "it was deleted and the entries after it re-chained"
        )

    def _deleted(self) -> str:
        assert self.anchor is not None
        gone = self.anchor.entries - self.before_count
        count = (
            f"the newest {gone} entries" if gone > 1 else "the newest entry" if gone else "entries"
        )
        return f"{count} as of the anchor, after entry {self.before_last}, were deleted"

    def finish(self) -> ChainReport:
        """The verdict once every entry was added."""
        if self.report is not None:
            return self.report
        anchor = self.anchor
        if anchor is not None and not self.anchor_seen:
            last = self.last_seq if self.last_seq is not None else 0
            if self.entries > self.before_count:
                problem = (
                    f"the log holds no entry {anchor.seq}, which the anchor signed "
                    f"{_when(anchor.signed_at)} names, and the entries after entry "
                    f"{self.before_last} were written after it: {self._deleted()}"
                )
            else:
                problem = (
                    f"the log ends at entry {last} ({self.entries} entries), but the anchor "
                    f"signed {_when(anchor.signed_at)} names entry {anchor.seq} "
                    f"({anchor.entries} entries): {self._deleted()}"
                )
            return self._broken(self.before_last + 1, problem)
        self.report = ChainReport(True, self.entries, head_seq=self.last_seq, head_hash=self.prev)
        return self.report


def _when(at: datetime) -> str:
    return _timestamp(at)[:19].replace("T", " ") + " UTC"


async def verify_chain(session: AsyncSession, anchor: Anchor | None = None) -> ChainReport:
    """Recompute every hash; report the first edited, inserted or deleted entry.

    Details are read as the text the database holds, so an entry whose details
    no longer parse is reported as changed instead of failing the check.
    """
    check = ChainCheck(anchor)
    rows = await session.stream(
        select(
            AuditEntry.seq,
            AuditEntry.at,
            AuditEntry.actor,
            AuditEntry.action,
            AuditEntry.subject,
            cast(AuditEntry.details, Text),
            AuditEntry.prev_hash,
            AuditEntry.hash,
        ).order_by(AuditEntry.seq)
    )
    async for seq, at, actor, action, subject, raw, prev_hash, hash_ in rows:
        loaded = load_json(raw)
        report = check.add(
            seq=seq,
            at=at,
            actor=actor,
            action=action,
            subject=subject,
            details=loaded.value,
            prev_hash=prev_hash,
            hash=hash_,
            unreadable=loaded.problem,
        )
        if report is not None:
            return report
    return check.finish()


# -- the signed head ----------------------------------------------------------------


class AuditSigner:
    """The server's audit key: an Ed25519 key in its data folder, created on first use."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = public_hex(private.public_key())
        self.key_id = key_id(self.public_key)

    @classmethod
    def in_folder(cls, data_dir: Path) -> AuditSigner:
        """The key in ``data_dir`` (made there, readable by the owner only, if missing)."""
        path = data_dir / AUDIT_KEY_FILE
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(pem)
                # A hard link appears whole or not at all, and never replaces a key: replicas
                # sharing the folder keep whichever key was made first.
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise AuditKeyError(f"cannot create the audit key {path}: {exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise AuditKeyError(f"cannot read the audit key {path}: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise AuditKeyError(f"{path} is not an Ed25519 key")
        return cls(private)

    def sign(self, head: AuditHead) -> SignedAuditHead:
        """``head`` with this key's signature and public key."""
        signature = self._private.sign(_HEAD_CONTEXT + canonical_head(head))
        return SignedAuditHead(head=head, signature=signature.hex(), public_key=self.public_key)


def public_hex(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def key_id(public_key_hex: str) -> str:
    """The id a public key goes by: the SHA-256 of its raw bytes."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def canonical_head(head: AuditHead) -> bytes:
    """The bytes a head's signature covers."""
    return json.dumps(head.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def head_signature_problem(signed: SignedAuditHead) -> str | None:
    """``None`` if the signature is the head's key's over this head, else what is wrong."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(signed.public_key))
        if key_id(signed.public_key) != signed.head.key_id:
            return "its key id is not the id of the public key it carries"
        public.verify(bytes.fromhex(signed.signature), _HEAD_CONTEXT + canonical_head(signed.head))
    except (ValueError, InvalidSignature):
        return "its signature does not verify: the head was altered after it was signed"
    return None


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


def anchor_of(signed: SignedAuditHead) -> Anchor:
    """The chain position a signed head vouches for."""
    h = signed.head
    return Anchor(seq=h.seq, hash=h.hash, entries=h.entries, signed_at=h.signed_at)


# -- the server's own record of its head ----------------------------------------------

AUDIT_HEAD_FILE = "audit-head.json"


@dataclass(frozen=True)
class HeadRecord:
    """The last head the server vouched for, kept in its data folder, beside the audit key.

    Out of reach of someone who can only edit the database, it lets the
    server's own verification find a deleted tail too: each time the head is
    handed out or the log verified, the chain is checked against the record
    and, if it holds, the record moves on to the current head.
    """

    path: Path

    @classmethod
    def in_folder(cls, data_dir: Path) -> HeadRecord:
        return cls(data_dir / AUDIT_HEAD_FILE)

    def load(self, signer: AuditSigner) -> tuple[Anchor | None, str | None]:
        """The recorded head as an anchor, or what is wrong with the record (none: both None)."""
        try:
            signed = SignedAuditHead.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None, None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "the record"
            return (
                None,
                f"the server's head record {self.path} cannot be read: {where}: {err['msg']}",
            )
        except (OSError, ValueError) as exc:
            return None, f"the server's head record {self.path} cannot be read: {exc}"
        problem = head_signature_problem(signed)
        if problem is None and signed.head.key_id != signer.key_id:
            problem = "another key than the server's audit key signed it"
        if problem is not None:
            return None, f"the server's head record {self.path} is not genuine: {problem}"
        return anchor_of(signed), None

    def save(self, signed: SignedAuditHead) -> None:
        """Replace the record atomically (the caller checked the log extends the old one)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(signed.model_dump_json(indent=2) + "\n")
        tmp.replace(self.path)


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
