"""The installer's step function: every row of its transition table, and what no row allows.

Pure: no files, no processes, no clock but the ``now`` passed in.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.ota import step_events as ev
from agent.ota.answers import (
    Assigned,
    Changed,
    Downloaded,
    Refused,
    RollbackAssigned,
    Unassigned,
    Unavailable,
    parse_answer,
)
from agent.ota.journal import (
    DOWNGRADE,
    FLEET_ROLLBACK,
    ROLLBACK_REFUSED,
    HeldBundle,
    InstallTarget,
    Journal,
    Phase,
)
from agent.ota.steps import (
    MAX_RETRY_DELAY_S,
    TRANSITIONS,
    InstallerState,
    InvalidEvent,
    Policy,
    Retry,
    decide,
)

POLICY = Policy(poll_interval_s=60.0, health_period_s=300.0, max_trial_boots=2)
NOW = 1_000.0
FILE = "/data/downloads/p-2.0.0.bundle"
V2 = InstallTarget(
    path="p/p-2.0.0.bundle",
    name="p",
    version="2.0.0",
    release_counter=2_000_999,
    hashes={"sha256": "b" * 64},
    length=10,
)
V3 = V2.model_copy(
    update={"path": "p/p-3.0.0.bundle", "version": "3.0.0", "hashes": {"sha256": "c" * 64}}
)

# What the device ran before: 1.0.0 (active, slot b) committed over 0.9.0 (still in slot a).
V0 = V2.model_copy(
    update={
        "path": "p/p-0.9.0.bundle",
        "version": "0.9.0",
        "release_counter": 9_999,
        "hashes": {"sha256": "0" * 64},
    }
)
V1 = V2.model_copy(
    update={
        "path": "p/p-1.0.0.bundle",
        "version": "1.0.0",
        "release_counter": 1_000_999,
        "hashes": {"sha256": "1" * 64},
    }
)
OLDER = V2.model_copy(
    update={
        "path": "p/p-0.5.0.bundle",
        "version": "0.5.0",
        "release_counter": 5_999,
        "hashes": {"sha256": "5" * 64},
    }
)
RAN_V1_AFTER_V0 = Journal(
    installed=V1, installed_counter=V1.release_counter, previous=HeldBundle(slot="a", target=V0)
)
BACK = RollbackAssigned(target=V0, rollback_of=V1.bundle_id)

JOURNALS = {
    Phase.IDLE: RAN_V1_AFTER_V0,
    Phase.DOWNLOADING: Journal().start_download(V2),
    Phase.VERIFIED: Journal().start_download(V2).verified(FILE),
    Phase.STAGING: Journal().start_download(V2).verified(FILE).start_staging("b"),
    Phase.STAGED: Journal().start_download(V2).verified(FILE).start_staging("b").staged(),
    Phase.TRIAL: (
        Journal().start_download(V2).verified(FILE).start_staging("b").staged().switched(NOW)
    ),
}


def at(phase: Phase, **changes: object) -> InstallerState:
    return InstallerState(JOURNALS[phase].model_copy(update=changes))


def kinds(effects: list[ev.Effect]) -> list[type]:
    return [type(e) for e in effects]


SAMPLES: dict[type, ev.Event] = {
    ev.Started: ev.Started(),
    ev.Poll: ev.Poll(),
    ev.Tick: ev.Tick(),
    ev.Stopping: ev.Stopping(),
    ev.SlotChosen: ev.SlotChosen("b"),
    ev.SlotWritten: ev.SlotWritten(),
    ev.StagingFailed: ev.StagingFailed("invalid-bundle", "no manifest.json", True),
    ev.SelfTestPassed: ev.SelfTestPassed(latency_p95_ms=1.5, memory_mb=40.04),
    ev.SelfTestRefused: ev.SelfTestRefused("self-test-failed", "golden vector 3 differs"),
    ev.WatchdogTripped: ev.WatchdogTripped("5 of 9 requests NaN"),
    ev.SlotsRolledBack: ev.SlotsRolledBack("watchdog", "5 of 9 requests NaN"),
    Unassigned: Unassigned(),
    Assigned: Assigned(target=V2),
    Changed: Changed(target=V3),
    Downloaded: Downloaded(target=V2, path=FILE),
    Refused: Refused(reason="tampered-bundle", message="differs", about="download"),
    Unavailable: Unavailable(reason="repository-unavailable", message="timed out"),
    RollbackAssigned: BACK,
    ev.ReturnedToSlot: ev.ReturnedToSlot(),
    ev.ReturnRefused: ev.ReturnRefused("invalid-bundle", "slot a: model.tflite differs"),
}

# (phase, event, now, the phase it ends in, the effects in order): one case per row at least.
CASES: list[tuple[Phase, ev.Event, float, Phase, list[type]]] = [
    (Phase.IDLE, ev.Started(), NOW, Phase.IDLE, [ev.DiscardStaging, ev.LoadModels]),
    (Phase.DOWNLOADING, ev.Started(), NOW, Phase.DOWNLOADING, [ev.DiscardStaging, ev.LoadModels]),
    (Phase.VERIFIED, ev.Started(), NOW, Phase.VERIFIED, [ev.DiscardStaging, ev.LoadModels]),
    (
        Phase.STAGING,
        ev.Started(),
        NOW,
        Phase.VERIFIED,
        [ev.DiscardStaging, ev.LoadModels, ev.SaveJournal, ev.ChooseSlot],
    ),
    (
        Phase.STAGED,
        ev.Started(),
        NOW,
        Phase.STAGED,
        [ev.DiscardStaging, ev.LoadModels, ev.SelfTest],
    ),
    (
        Phase.TRIAL,
        ev.Started(),
        NOW,
        Phase.TRIAL,
        [ev.DiscardStaging, ev.SaveJournal, ev.LoadModels, ev.WatchTrial],
    ),
    (Phase.IDLE, ev.Poll(), NOW, Phase.IDLE, [ev.Check]),
    (Phase.DOWNLOADING, ev.Poll(), NOW, Phase.DOWNLOADING, [ev.Download]),
    (Phase.VERIFIED, ev.Poll(), NOW, Phase.VERIFIED, [ev.ChooseSlot]),
    (Phase.STAGING, ev.Poll(), NOW, Phase.STAGING, []),
    (Phase.STAGED, ev.Poll(), NOW, Phase.STAGED, []),
    (Phase.TRIAL, ev.Poll(), NOW, Phase.TRIAL, [ev.PollResult]),
    (Phase.IDLE, SAMPLES[Assigned], NOW, Phase.DOWNLOADING, [ev.SaveJournal, ev.Download]),
    (Phase.IDLE, Unassigned(), NOW, Phase.IDLE, [ev.PollResult]),
    (Phase.IDLE, SAMPLES[Refused], NOW, Phase.IDLE, [ev.Report, ev.PollResult]),
    (Phase.IDLE, SAMPLES[Unavailable], NOW, Phase.IDLE, [ev.Report, ev.PollResult]),
    (Phase.IDLE, BACK, NOW, Phase.IDLE, [ev.SaveJournal, ev.ReturnToSlot]),
    (Phase.IDLE, ev.ReturnedToSlot(), NOW, Phase.IDLE, [ev.SaveJournal, ev.PollResult]),
    (
        Phase.IDLE,
        SAMPLES[ev.ReturnRefused],
        NOW,
        Phase.IDLE,
        [ev.SaveJournal, ev.Report, ev.PollResult],
    ),
    (
        Phase.DOWNLOADING,
        SAMPLES[Downloaded],
        NOW,
        Phase.VERIFIED,
        [ev.SaveJournal, ev.Hold, ev.ChooseSlot],
    ),
    (Phase.DOWNLOADING, SAMPLES[Refused], NOW, Phase.IDLE, [ev.SaveJournal, ev.PollResult]),
    (Phase.DOWNLOADING, SAMPLES[Changed], NOW, Phase.IDLE, [ev.SaveJournal]),
    (Phase.DOWNLOADING, Unassigned(), NOW, Phase.IDLE, [ev.SaveJournal]),
    (Phase.DOWNLOADING, SAMPLES[Unavailable], NOW, Phase.DOWNLOADING, [ev.Report, ev.PollResult]),
    (Phase.VERIFIED, ev.SlotChosen("b"), NOW, Phase.STAGING, [ev.SaveJournal, ev.WriteSlot]),
    (Phase.STAGING, ev.SlotWritten(), NOW, Phase.STAGED, [ev.SaveJournal, ev.Hold, ev.SelfTest]),
    (Phase.STAGING, SAMPLES[ev.StagingFailed], NOW, Phase.IDLE, [ev.SaveJournal, ev.DeleteBundle]),
    (
        Phase.STAGED,
        SAMPLES[ev.SelfTestPassed],
        NOW,
        Phase.TRIAL,
        [ev.Report, ev.Switch, ev.WatchTrial, ev.SaveJournal, ev.Hold],
    ),
    (Phase.STAGED, SAMPLES[ev.SelfTestRefused], NOW, Phase.IDLE, [ev.SaveJournal, ev.DeleteBundle]),
    (Phase.TRIAL, ev.Tick(), NOW + 299.0, Phase.TRIAL, []),
    (
        Phase.TRIAL,
        ev.Tick(),
        NOW + 300.0,
        Phase.IDLE,
        [ev.SaveJournal, ev.EndTrial, ev.DeleteBundle],
    ),
    (Phase.TRIAL, SAMPLES[ev.WatchdogTripped], NOW, Phase.TRIAL, [ev.RollBack]),
    (Phase.TRIAL, SAMPLES[ev.SlotsRolledBack], NOW, Phase.IDLE, [ev.SaveJournal, ev.DeleteBundle]),
    (Phase.TRIAL, ev.Stopping(), NOW, Phase.TRIAL, [ev.SaveJournal]),
    *[(p, ev.Tick(), NOW, p, []) for p in Phase if p is not Phase.TRIAL],
    *[(p, ev.Stopping(), NOW, p, []) for p in Phase if p is not Phase.TRIAL],
]

# Effects that begin the work of a phase: the journal naming that phase is saved first.
WORK = (
    ev.Check,
    ev.Download,
    ev.ChooseSlot,
    ev.WriteSlot,
    ev.SelfTest,
    ev.Hold,
    ev.DeleteBundle,
    ev.ReturnToSlot,
)


def test_every_row_of_the_table_has_a_case() -> None:
    rows = {(t.phase, t.event) for t in TRANSITIONS}
    assert rows == {(phase, type(event)) for phase, event, *_ in CASES}
    assert len(rows) == len(TRANSITIONS), "one row per phase and event"


@pytest.mark.parametrize(
    ("phase", "event", "now", "to", "effects"),
    CASES,
    ids=[f"{c[0]}-{type(c[1]).__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_each_row_leads_where_the_table_says_with_its_effects_in_order(
    phase: Phase, event: ev.Event, now: float, to: Phase, effects: list[type]
) -> None:
    before = at(phase)
    after, done = decide(before, event, now, POLICY)
    assert after.journal.phase is to
    assert kinds(done) == effects
    [row] = [t for t in TRANSITIONS if (t.phase, t.event) == (phase, type(event))]
    assert to in row.to
    if after.journal != before.journal:
        # The crash-safety rule: the new journal is saved before the work it names starts.
        saves = [i for i, e in enumerate(done) if isinstance(e, ev.SaveJournal)]
        assert saves and done[saves[-1]].journal == after.journal  # type: ignore[union-attr]
        assert not any(isinstance(e, WORK) for e in done[: saves[-1]]), done


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(SAMPLES), ids=lambda t: t.__name__)
def test_an_event_no_row_names_is_refused(phase: Phase, event: type) -> None:
    if any((t.phase, t.event) == (phase, event) for t in TRANSITIONS):
        return
    with pytest.raises(InvalidEvent, match=f"{event.__name__} is not expected in {phase}"):
        decide(at(phase), SAMPLES[event], NOW, POLICY)


def test_a_crash_loop_in_the_trial_rolls_back_after_max_trial_boots() -> None:
    state = at(Phase.TRIAL, trial_boots=1)
    after, effects = decide(state, ev.Started(), NOW, POLICY)
    assert kinds(effects) == [ev.DiscardStaging, ev.LoadModels, ev.RollBack]
    assert effects[-1] == ev.RollBack(
        "crash-loop", "the agent restarted 2 times during the health period"
    )
    assert after.journal == state.journal


def test_a_restart_in_the_trial_is_counted_before_the_models_load() -> None:
    after, effects = decide(at(Phase.TRIAL), ev.Started(), NOW, POLICY)
    assert after.journal.trial_boots == 1
    assert effects[1] == ev.SaveJournal(
        after.journal, "restarted-in-trial", {"boots": 1, "clean": False}
    )
    clean = at(Phase.TRIAL, clean_shutdown=True)
    after, effects = decide(clean, ev.Started(), NOW, POLICY)
    assert after.journal.trial_boots == 0 and not after.journal.clean_shutdown


def test_an_installed_or_rejected_bundle_is_not_downloaded_again() -> None:
    installed = InstallerState(Journal(installed=V2))
    after, effects = decide(installed, Assigned(target=V2), NOW, POLICY)
    assert effects == [ev.PollResult("up to date")] and after.journal == installed.journal
    rejected = InstallerState(Journal(rejected={V2.bundle_id: "watchdog: NaN"}))
    _, effects = decide(rejected, Assigned(target=V2), NOW, POLICY)
    assert effects == [ev.PollResult("not retrying p 2.0.0: rejected before")]


def test_a_refusal_that_spares_the_bundle_is_retried_after_a_doubling_backoff() -> None:
    garbled = Refused(reason="tampered-bundle", message="differs", about="download")
    state = at(Phase.DOWNLOADING)
    for tries, delay in enumerate([60.0, 120.0, 240.0]):
        state, effects = decide(state, garbled, NOW, POLICY)
        assert state.retries[V2.bundle_id] == Retry(tries + 1, NOW + delay)
        assert effects[0].details["remembered"] is False  # type: ignore[union-attr]
        assert state.journal.rejected == {}
        _, effects = decide(state, Assigned(target=V2), NOW + delay - 1, POLICY)
        assert effects == [ev.PollResult("retrying p 2.0.0 in 1 s")]
        state = replace(state, journal=state.journal.start_download(V2))
    many = replace(state, retries={V2.bundle_id: Retry(30, 0.0)})
    after, _ = decide(many, garbled, NOW, POLICY)
    assert after.retries[V2.bundle_id].not_before == NOW + MAX_RETRY_DELAY_S


def test_a_verified_download_clears_the_backoff_and_keeps_the_fetchers_path() -> None:
    state = replace(at(Phase.DOWNLOADING), retries={V2.bundle_id: Retry(2, 0.0)})
    after, _ = decide(state, Downloaded(target=V2, path=FILE), NOW, POLICY)
    assert after.retries == {} and after.journal.bundle_file == FILE
    after, effects = decide(after, ev.SlotChosen("a"), NOW, POLICY)
    assert effects[-1] == ev.WriteSlot("a", FILE)


def test_a_condemning_refusal_remembers_the_bundle() -> None:
    bad = Refused(reason="manifest-mismatch", message="x", about="download", condemns_bundle=True)
    after, effects = decide(at(Phase.DOWNLOADING), bad, NOW, POLICY)
    assert V2.bundle_id in after.journal.rejected and after.retries == {}
    assert effects[-1] == ev.PollResult("refused: x")


def test_a_refused_assignment_gives_the_download_up_without_blaming_its_bundle() -> None:
    forged = Refused(reason="bundle-not-found", message="unsigned", about="assignment")
    after, effects = decide(at(Phase.DOWNLOADING), forged, NOW, POLICY)
    assert after.journal.phase is Phase.IDLE and after.journal.rejected == {}
    assert after.journal.last_outcome is None
    save = effects[0]
    assert (
        isinstance(save, ev.SaveJournal) and save.abandoned and save.event == "assignment-refused"
    )
    assert save.details == {
        "abandoned": "p 2.0.0",
        "abandoned_id": V2.bundle_id,
        "reason": "bundle-not-found",
        "message": "unsigned",
    }
    assert effects[-1] == ev.PollResult("assignment refused: unsigned")


def test_a_download_of_another_bundle_than_expected_is_given_up() -> None:
    after, effects = decide(at(Phase.DOWNLOADING), Downloaded(target=V3, path=FILE), NOW, POLICY)
    assert after.journal.phase is Phase.IDLE and after.journal.rejected == {}
    assert [e.event for e in effects if isinstance(e, ev.SaveJournal)] == ["assignment-changed"]


def test_the_same_check_refusal_is_reported_once() -> None:
    refused = Refused(reason="untrusted-root", message="damaged", about="assignment")
    state, effects = decide(at(Phase.IDLE), refused, NOW, POLICY)
    assert effects == [
        ev.Report("check-refused", {"reason": "untrusted-root", "message": "damaged"}),
        ev.PollResult("refused: damaged"),
    ]
    state, effects = decide(state, refused, NOW, POLICY)
    assert effects == [ev.PollResult("refused: damaged")]
    state, _ = decide(state, Unassigned(), NOW, POLICY)
    _, effects = decide(state, refused, NOW, POLICY)
    assert kinds(effects) == [ev.Report, ev.PollResult]


def test_commit_raises_the_counter_and_deletes_the_bundle_file() -> None:
    after, effects = decide(at(Phase.TRIAL), ev.Tick(), NOW + 300.0, POLICY)
    assert after.journal.installed == V2 and after.journal.installed_counter == V2.release_counter
    assert effects[-1] == ev.DeleteBundle(FILE)


def test_a_staging_failure_of_the_device_does_not_condemn_the_bundle() -> None:
    failed = ev.StagingFailed("staging-failed", "disk full", condemned=False)
    after, _ = decide(at(Phase.STAGING), failed, NOW, POLICY)
    assert after.journal.rejected == {} and V2.bundle_id in after.retries


def test_the_fetchers_answers_are_typed_and_garbage_is_refused() -> None:
    for answer in SAMPLES.values():
        if isinstance(
            answer,
            Unassigned | Assigned | RollbackAssigned | Changed | Downloaded | Refused | Unavailable,
        ):
            assert parse_answer(answer.model_dump_json()) == answer
    with pytest.raises(ValueError, match="not an answer of the update fetcher"):
        parse_answer('{"status": "assigned"}')
    with pytest.raises(ValueError):
        parse_answer("Traceback (most recent call last):")


def test_a_journal_written_before_the_bundle_file_was_kept_downloads_again() -> None:
    legacy = JOURNALS[Phase.STAGING].model_dump(exclude={"bundle_file"})
    journal = Journal.model_validate(legacy)
    assert journal.phase is Phase.DOWNLOADING and journal.slot is None
    trial = Journal.model_validate(JOURNALS[Phase.TRIAL].model_dump(exclude={"bundle_file"}))
    assert trial.phase is Phase.TRIAL


# -- the fleet rollback: one step back, exactly the previous bundle, the counter kept --------


def committed_over(journal: Journal, target: InstallTarget, slot: str) -> Journal:
    """``journal`` after installing and committing ``target`` into ``slot``."""
    staged = journal.start_download(target).verified(FILE).start_staging(slot).staged()
    return staged.switched(NOW).committed(NOW)


def test_a_commit_remembers_the_bundle_the_other_slot_still_holds() -> None:
    first = committed_over(Journal(), V0, "a")
    assert first.previous is None, "nothing was committed before the first bundle"
    second = committed_over(first, V1, "b")
    assert second.previous == HeldBundle(slot="a", target=V0)
    # Staging the next bundle overwrites that slot: no step back remains.
    staging = second.start_download(V2).verified(FILE).start_staging("a")
    assert staging.previous is None


def test_a_marked_rollback_returns_to_the_previous_slot_and_keeps_the_counter() -> None:
    state = InstallerState(committed_over(committed_over(Journal(), V0, "a"), V1, "b"))
    state, effects = decide(state, BACK, NOW, POLICY)
    assert state.journal.returning
    assert effects == [ev.SaveJournal(state.journal, None), ev.ReturnToSlot("a", V0)]
    after, effects = decide(state, ev.ReturnedToSlot(), NOW + 1, POLICY)
    journal = after.journal
    assert journal.installed == V0 and journal.previous is None
    assert journal.installed_counter == V1.release_counter, "the floor never goes down"
    assert journal.rejection(V1) is not None and journal.rejection(V1).startswith(FLEET_ROLLBACK)  # type: ignore[union-attr]
    outcome = journal.last_outcome
    assert outcome is not None and outcome.result == "rolled_back" and outcome.target == V1
    assert outcome.reason == FLEET_ROLLBACK
    save = effects[0]
    assert isinstance(save, ev.SaveJournal) and save.journal == journal
    assert save.event == "fleet-rolled-back"
    assert save.details["left_id"] == V1.bundle_id and save.details["to_id"] == V0.bundle_id
    # Named again, the bundle left is never retried; the one returned to is up to date.
    _, effects = decide(after, Assigned(target=V1), NOW, POLICY)
    assert effects == [ev.PollResult("not retrying p 1.0.0: rejected before")]
    _, effects = decide(after, BACK, NOW, POLICY)
    assert effects == [ev.PollResult("up to date")]


def refusal(state: InstallerState, answer: RollbackAssigned) -> tuple[str, str]:
    after, effects = decide(state, answer, NOW, POLICY)
    assert after.journal == state.journal, "a refused rollback changes nothing"
    [report, _] = effects
    assert isinstance(report, ev.Report) and report.event == "check-refused"
    return str(report.details["reason"]), str(report.details["message"])


def test_a_rollback_to_anything_but_the_previous_bundle_is_refused_naming_it() -> None:
    state = InstallerState(RAN_V1_AFTER_V0)
    reason, message = refusal(state, RollbackAssigned(target=OLDER, rollback_of=V1.bundle_id))
    assert reason == DOWNGRADE and "p 0.5.0" in message and OLDER.bundle_id in message
    assert "the other slot holds p 0.9.0" in message
    # The previous bundle, but replacing another bundle than the installed one.
    reason, message = refusal(state, RollbackAssigned(target=V0, rollback_of=V2.bundle_id))
    assert reason == ROLLBACK_REFUSED and V2.bundle_id in message and V1.bundle_id in message
    # After going back, the bundle left (in the other slot now) is no step back.
    back, _ = decide(state, BACK, NOW, POLICY)
    back, _ = decide(back, ev.ReturnedToSlot(), NOW, POLICY)
    reason, message = refusal(back, RollbackAssigned(target=V1, rollback_of=V0.bundle_id))
    assert reason == ROLLBACK_REFUSED and "no bundle committed before" in message
    # Nor is anything older: the floor is still 1.0.0's counter.
    reason, _ = refusal(back, RollbackAssigned(target=OLDER, rollback_of=V0.bundle_id))
    assert reason == DOWNGRADE
    # A journal written before the previous bundle was kept has no step back.
    legacy = Journal.model_validate(RAN_V1_AFTER_V0.model_dump(exclude={"previous"}))
    reason, _ = refusal(InstallerState(legacy), BACK)
    assert reason == DOWNGRADE


def test_a_previous_slot_that_fails_its_check_is_forgotten_and_reported_once() -> None:
    damaged = ev.ReturnRefused("invalid-bundle", "slot a: model.tflite differs")
    after, effects = decide(InstallerState(RAN_V1_AFTER_V0), damaged, NOW, POLICY)
    assert after.journal.previous is None and after.journal.installed == V1
    assert effects[0] == ev.SaveJournal(after.journal, None)
    assert effects[1] == ev.Report(
        "check-refused", {"reason": "invalid-bundle", "message": "slot a: model.tflite differs"}
    )
    reason, _ = refusal(after, BACK)
    assert reason == DOWNGRADE, "with no step back left, the previous bundle is a downgrade"


def test_a_fleet_rollback_a_restart_interrupted_is_carried_out_again() -> None:
    returning, _ = decide(InstallerState(RAN_V1_AFTER_V0), BACK, NOW, POLICY)
    after, effects = decide(returning, ev.Started(), NOW, POLICY)
    assert after == returning
    assert effects == [ev.DiscardStaging(), ev.LoadModels(), ev.ReturnToSlot("a", V0)]
    done, _ = decide(after, ev.ReturnedToSlot(), NOW, POLICY)
    assert not done.journal.returning and done.journal.installed == V0
    refused, _ = decide(after, SAMPLES[ev.ReturnRefused], NOW, POLICY)
    assert not refused.journal.returning and refused.journal.installed == V1
