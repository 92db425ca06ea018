"""The audit log's hash chain and its anchor checks, as plain rules over plain entries.

Each entry's hash covers its own fields and the previous entry's hash, so
editing or deleting any entry breaks the chain from there on. A chain alone
cannot show that its newest entries were deleted, so it is also checked
against an :class:`Anchor`, a head saved earlier. Nothing here reads a
database or a file: the server feeds its rows in (:mod:`fleet_server.audit.store`),
``fleetctl`` the pages the API serves, and the unit tests lists of entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from protocol.api.audit import SignedAuditHead
from protocol.messages import FreeformBounds

GENESIS = "0" * 64

# What an entry's details may hold: generous (an assignment to a tag lists every device it
# reached, rollout evidence is large); the depth bound is what keeps every reader (the
# API's serializer stops at about 255 levels) able to show it.
AUDIT_DETAILS_BOUNDS = FreeformBounds(
    max_depth=32, max_items=4_000_000, max_string=1 << 20, max_bytes=48 << 20
)


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

    def add_entry(self, e: ChainEntry) -> ChainReport | None:
        """:meth:`add` for an entry as :class:`ChainEntry` holds it."""
        return self.add(
            seq=e.seq,
            at=e.at,
            actor=e.actor,
            action=e.action,
            subject=e.subject,
            details=e.details,
            prev_hash=e.prev_hash,
            hash=e.hash,
            unreadable=e.unreadable,
        )

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


@dataclass(frozen=True)
class ChainEntry:
    """One stored entry: ``details`` as read (``None``, and ``unreadable`` why, if unparsable)."""

    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: Any
    prev_hash: str
    hash: str
    unreadable: str | None = None


def verify_entries(entries: Iterable[ChainEntry], anchor: Anchor | None = None) -> ChainReport:
    """Check ``entries`` (in sequence order) as a chain, against ``anchor`` if given."""
    check = ChainCheck(anchor)
    for e in entries:
        report = check.add_entry(e)
        if report is not None:
            return report
    return check.finish()


def anchor_of(signed: SignedAuditHead) -> Anchor:
    """The chain position a signed head vouches for."""
    h = signed.head
    return Anchor(seq=h.seq, hash=h.hash, entries=h.entries, signed_at=h.signed_at)
