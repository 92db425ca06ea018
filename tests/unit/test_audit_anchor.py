"""The audit chain against a saved head: each kind of tampering is named (pure, no database)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet_server.audit import (
    GENESIS,
    Anchor,
    AuditSigner,
    ChainCheck,
    ChainReport,
    entry_hash,
    head_signature_problem,
)
from protocol.api.audit import AuditHead

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


def chain(n: int, start_seq: int = 1, prev: str = GENESIS, t0: datetime = T0) -> list[Entry]:
    out = []
    for i in range(n):
        at = t0 + timedelta(minutes=i)
        details = {"i": i}
        h = entry_hash(prev, at, "admin", "device.register", f"d{i}", details)
        out.append(Entry(start_seq + i, at, "admin", "device.register", f"d{i}", details, prev, h))
        prev = h
    return out


def check(entries: list[Entry], anchor: Anchor | None) -> ChainReport:
    c = ChainCheck(anchor)
    for e in entries:
        if c.add(**vars(e)) is not None:
            break
    return c.finish()


def anchor_at(entries: list[Entry], index: int) -> Anchor:
    e = entries[index]
    return Anchor(seq=e.seq, hash=e.hash, entries=index + 1, signed_at=e.at + timedelta(seconds=1))


def test_a_log_that_grew_since_the_anchor_is_intact() -> None:
    entries = chain(10)
    report = check(entries, anchor_at(entries, 5))
    assert report.ok and report.entries == 10 and report.head_seq == 10


def test_a_deleted_tail_is_named() -> None:
    entries = chain(10)
    report = check(entries[:7], anchor_at(entries, 9))
    assert not report.ok and report.broken_at == 8
    assert report.problem is not None
    assert "ends at entry 7" in report.problem and "names entry 10" in report.problem
    assert "the newest 3 entries as of the anchor, after entry 7, were deleted" in report.problem
    # Without the anchor, the shortened log is a valid chain: that is the hole closed here.
    assert check(entries[:7], None).ok


def test_a_deleted_tail_then_new_entries_are_named() -> None:
    entries = chain(10)
    anchor = anchor_at(entries, 9)
    # Entries 9 and 10 deleted, then three appended, numbered on (PostgreSQL's sequence)...
    later = chain(3, start_seq=11, prev=entries[7].hash, t0=anchor.signed_at + timedelta(hours=1))
    report = check(entries[:8] + later, anchor)
    deleted = "the newest 2 entries as of the anchor, after entry 8, were deleted"
    assert not report.ok and report.broken_at == 11
    assert report.problem is not None and "the anchor names entry 10" in report.problem
    assert "written after the anchor" in report.problem and deleted in report.problem
    # ...or taking the deleted numbers again (SQLite reuses the highest rowid)...
    reused = chain(3, start_seq=9, prev=entries[7].hash, t0=anchor.signed_at + timedelta(hours=1))
    report = check(entries[:8] + reused, anchor)
    assert not report.ok and report.broken_at == 10
    assert report.problem is not None and deleted in report.problem
    # ...or ending before the anchored number.
    report = check(entries[:8] + reused[:1], anchor)
    assert not report.ok and report.broken_at == 9
    assert report.problem is not None and "holds no entry 10" in report.problem
    assert deleted in report.problem
    # Without times to go by (an entry numbered past the anchor, yet older), the gap shows.
    renumbered = [replace(e, seq=e.seq + 5) if e.seq > 8 else e for e in entries[:9]]
    report = check(renumbered, anchor)
    assert not report.ok and report.broken_at == 14
    assert report.problem is not None and "entry 10, the newest" in report.problem
    assert "is missing" in report.problem


def test_a_rewritten_and_rehashed_chain_is_named() -> None:
    entries = chain(10)
    anchor = anchor_at(entries, 9)
    # Same times, other content: re-hashed from entry 5 on, so the chain alone holds.
    rewritten = [replace(e, subject="forged") if e.seq == 5 else e for e in entries]
    prev = entries[3].hash
    rehashed = entries[:4]
    for e in rewritten[4:]:
        h = entry_hash(prev, e.at, e.actor, e.action, e.subject, e.details)
        rehashed.append(replace(e, prev_hash=prev, hash=h))
        prev = h
    assert check(rehashed, None).ok
    report = check(rehashed, anchor)
    assert not report.ok and report.broken_at == 10
    assert report.problem is not None and "rewritten" in report.problem


def test_an_edit_without_rehashing_is_found_before_the_anchor() -> None:
    entries = chain(10)
    edited = [replace(e, details={"i": 99}) if e.seq == 3 else e for e in entries]
    report = check(edited, anchor_at(entries, 9))
    assert (report.ok, report.broken_at) == (False, 3)
    assert report.problem == "its content was changed"


def test_an_empty_log_anchor_holds_for_any_chain() -> None:
    anchor = Anchor(seq=0, hash=GENESIS, entries=0, signed_at=T0)
    assert check(chain(3), anchor).ok and check([], anchor).ok


def test_a_head_verifies_only_under_its_own_key_and_unaltered() -> None:
    signer = AuditSigner(Ed25519PrivateKey.generate())
    head = AuditHead(seq=4, hash="ab" * 32, entries=4, signed_at=T0, key_id=signer.key_id)
    signed = signer.sign(head)
    assert head_signature_problem(signed) is None
    altered = signed.model_copy(update={"head": head.model_copy(update={"seq": 3})})
    assert "does not verify" in (head_signature_problem(altered) or "")
    other = AuditSigner(Ed25519PrivateKey.generate())
    swapped = signed.model_copy(update={"public_key": other.public_key})
    assert "key id" in (head_signature_problem(swapped) or "")
