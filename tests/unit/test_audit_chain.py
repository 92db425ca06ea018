"""The audit chain's rules over a plain list of entries (no database): verify_entries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from fleet_server.audit.chain import GENESIS, Anchor, ChainEntry, entry_hash, verify_entries

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def chain(n: int) -> list[ChainEntry]:
    out, prev = [], GENESIS
    for i in range(n):
        at = T0 + timedelta(minutes=i)
        details = {"i": i}
        h = entry_hash(prev, at, "admin", "release.publish", f"r{i}", details)
        out.append(ChainEntry(i + 1, at, "admin", "release.publish", f"r{i}", details, prev, h))
        prev = h
    return out


def test_an_intact_chain_verifies_and_names_its_head() -> None:
    entries = chain(4)
    report = verify_entries(entries)
    assert report.ok
    assert report.entries == 4
    assert (report.head_seq, report.head_hash) == (4, entries[-1].hash)


def test_an_empty_log_verifies_with_the_genesis_head() -> None:
    report = verify_entries([])
    assert report.ok and report.entries == 0
    assert report.head_seq is None and report.head_hash == GENESIS


def test_an_edited_entry_breaks_the_chain_there() -> None:
    entries = chain(4)
    entries[2] = replace(entries[2], details={"i": 99})
    report = verify_entries(entries)
    assert not report.ok
    assert report.broken_at == 3
    assert report.problem == "its content was changed"


def test_a_deleted_entry_is_found_at_the_next_one() -> None:
    entries = chain(4)
    del entries[1]
    report = verify_entries(entries)
    assert not report.ok
    assert report.broken_at == 3
    assert report.problem is not None and "one was deleted" in report.problem


def test_unreadable_details_are_a_changed_entry() -> None:
    entries = chain(3)
    entries[1] = replace(entries[1], details=None, unreadable="are not JSON")
    report = verify_entries(entries)
    assert not report.ok
    assert report.broken_at == 2
    assert report.problem == "its content was changed: what its details hold are not JSON"


def test_a_deleted_tail_is_found_against_an_anchor() -> None:
    entries = chain(5)
    newest = entries[-1]
    anchor = Anchor(newest.seq, newest.hash, 5, newest.at + timedelta(seconds=1))
    assert verify_entries(entries, anchor).ok
    report = verify_entries(entries[:3], anchor)
    assert not report.ok
    assert report.problem is not None and "the newest 2 entries" in report.problem
