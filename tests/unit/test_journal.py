"""The install journal's state machine and its recovery decisions (no I/O but the store's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.ota.journal import (
    InstallTarget,
    Journal,
    JournalError,
    Phase,
    recovery_action,
)
from agent.ota.journal_store import JournalStore

V2 = InstallTarget(
    path="p/p-2.0.0.bundle",
    name="p",
    version="2.0.0",
    release_counter=2_000_000,
    sha256="b" * 64,
    length=10,
)


def through_trial(j: Journal) -> Journal:
    return j.start_download(V2).verified().start_staging("b").staged().switched(now=100.0)


def test_a_full_install_commits_and_raises_the_counter() -> None:
    j = through_trial(Journal()).committed(now=400.0)
    assert j.phase is Phase.IDLE and j.installed == V2
    assert j.installed_counter == 2_000_000
    assert j.last_outcome is not None and j.last_outcome.result == "committed"


def test_steps_cannot_be_skipped() -> None:
    with pytest.raises(JournalError, match="cannot go from downloading to staging"):
        Journal().start_download(V2).start_staging("b")
    with pytest.raises(JournalError):
        Journal().start_download(V2).verified().start_staging("b").switched(now=1.0)


def test_a_refused_bundle_is_remembered_and_not_retried() -> None:
    j = Journal().start_download(V2).verified().start_staging("b").staged()
    j = j.refused("self-test-failed", "golden vector 3 differs", now=5.0)
    assert j.phase is Phase.IDLE and j.installed_counter == 0
    assert "self-test-failed" in j.rejected[V2.bundle_id]
    with pytest.raises(JournalError, match="rejected before"):
        j.start_download(V2)


def test_a_rolled_back_bundle_is_remembered_and_the_counter_stays() -> None:
    j = through_trial(Journal()).rolled_back("watchdog", "5 of 9 requests NaN", now=120.0)
    assert j.installed_counter == 0 and V2.bundle_id in j.rejected
    assert j.last_outcome is not None and j.last_outcome.reason == "watchdog"


@pytest.mark.parametrize(
    ("journal", "action"),
    [
        (Journal(), "none"),
        (Journal().start_download(V2), "resume_download"),
        (Journal().start_download(V2).verified(), "resume_download"),
        (Journal().start_download(V2).verified().start_staging("b"), "restage"),
        (Journal().start_download(V2).verified().start_staging("b").staged(), "self_test"),
        (through_trial(Journal()), "resume_trial"),
        (through_trial(Journal()).rebooted_in_trial(), "roll_back"),
    ],
)
def test_recovery_after_a_crash_at_each_phase(journal: Journal, action: str) -> None:
    assert recovery_action(journal, max_trial_boots=2) == action


def test_store_round_trips_and_keeps_events(tmp_path: Path) -> None:
    store = JournalStore(tmp_path)
    assert store.load() == Journal()
    j = Journal().start_download(V2)
    store.save(j)
    store.event(1.0, "download-started", bundle="p 2.0.0")
    assert JournalStore(tmp_path).load() == j
    assert store.events()[-1]["event"] == "download-started"


def test_a_torn_event_line_is_skipped(tmp_path: Path) -> None:
    store = JournalStore(tmp_path)
    store.event(1.0, "a")
    with store.events_path.open("a") as f:
        f.write('{"at": 2.0, "ev')
    assert [e["event"] for e in store.events()] == ["a"]


def test_a_corrupt_journal_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "journal.json").write_text('{"phase": "flying"}')
    with pytest.raises(JournalError, match="corrupt"):
        JournalStore(tmp_path).load()


def test_a_deliberate_stop_during_the_trial_is_not_a_crash() -> None:
    stopped = through_trial(Journal()).model_copy(update={"clean_shutdown": True})
    assert recovery_action(stopped, max_trial_boots=1) == "resume_trial"
    after = stopped.rebooted_in_trial()
    assert after.trial_boots == 0 and not after.clean_shutdown
    assert recovery_action(after, max_trial_boots=1) == "roll_back"


def test_a_refusal_that_does_not_condemn_the_bundle_is_reported_but_not_remembered() -> None:
    j = Journal().start_download(V2)
    j = j.refused("tampered-bundle", "what arrived differs", now=5.0, condemned=False)
    assert j.phase is Phase.IDLE and j.rejected == {}
    assert j.last_outcome is not None and j.last_outcome.reason == "tampered-bundle"
    assert j.start_download(V2).phase is Phase.DOWNLOADING


def test_a_bundle_is_named_by_its_strongest_signed_hash() -> None:
    both = V2.model_copy(update={"hashes": {"sha256": "b" * 64, "sha512": "c" * 128}})
    assert both.bundle_id == "sha512:" + "c" * 128
    only512 = V2.model_copy(update={"hashes": {"sha512": "c" * 128}})
    assert only512.bundle_id == "sha512:" + "c" * 128 and only512.sha256 is None
    assert both.same_bundle(only512) and both.same_bundle(V2)
    assert not only512.same_bundle(V2), "no hash in common: not known to be the same bytes"


def test_a_rejection_matches_any_signed_hash_of_the_bundle() -> None:
    j = Journal().start_download(V2).refused("invalid-bundle", "members differ", now=1.0)
    both = V2.model_copy(update={"hashes": {"sha512": "c" * 128, "sha256": "b" * 64}})
    assert j.rejection(both) is not None
    with pytest.raises(JournalError, match="rejected before"):
        j.start_download(both)


def test_a_journal_written_with_bare_sha256_keys_still_loads(tmp_path: Path) -> None:
    legacy = {
        "phase": "downloading",
        "target": {**V2.model_dump(exclude={"hashes"}), "sha256": "b" * 64},
        "rejected": {"a" * 64: "self-test-failed: slow"},
    }
    (tmp_path / "journal.json").write_text(json.dumps(legacy))
    j = JournalStore(tmp_path).load()
    assert j.target == V2
    assert j.rejected == {"sha256:" + "a" * 64: "self-test-failed: slow"}


def test_an_older_journals_refusals_about_an_answer_no_longer_block_the_bundle(
    tmp_path: Path,
) -> None:
    # The journal of a device hit by the forged-director bug: 3.0.0 was held against the
    # director's answer. After the upgrade only what condemns a bundle itself is kept.
    forged = "bundle-not-found: the director named face/face-6.6.6.bundle, unsigned"
    legacy = {
        "phase": "idle",
        "rejected": {
            "a" * 64: forged,
            "b" * 64: "tampered-bundle: hash mismatch on the wire",
            "c" * 64: "self-test-failed: golden vector 3 off by 0.4",
            "d" * 64: "watchdog: 3 failures in 200 requests",
            "e" * 64: "invalid-bundle: no manifest.json",
        },
    }
    (tmp_path / "journal.json").write_text(json.dumps(legacy))
    j = JournalStore(tmp_path).load()
    assert set(j.rejected) == {"sha256:" + c * 64 for c in "cde"}
    assert j.rejection(V2.model_copy(update={"hashes": {"sha256": "a" * 64}})) is None
