"""plan_sync: what brings a device's director metadata in line with the database."""

from __future__ import annotations

from fleet_server.assignments import Committed, SyncStep, plan_sync
from fleet_server.director import Signed

A = "pump-health/pump-health-1.0.0.bundle"
B = "pump-health/pump-health-2.0.0.bundle"


def test_a_device_never_assigned_needs_nothing_whatever_its_metadata_says() -> None:
    assert plan_sync(Committed("d", None, 0), Signed(None, 1)) is None
    assert plan_sync(Committed("d", None, 0), Signed(A, 3)) is None


def test_metadata_naming_the_committed_assignment_at_its_version_needs_nothing() -> None:
    assert plan_sync(Committed("d", A, 4), Signed(A, 4)) is None


def test_a_committed_assignment_not_yet_signed_is_signed_at_the_recorded_version() -> None:
    assert plan_sync(Committed("d", B, 5), Signed(A, 4)) == SyncStep(True, 5, False)
    assert plan_sync(Committed("d", A, 2), Signed(None, 0)) == SyncStep(True, 2, False)
    assert plan_sync(Committed("d", A, 2), Signed(None, 1)) == SyncStep(True, 2, False)


def test_metadata_ahead_of_the_database_is_signed_back_to_it_at_a_newer_version() -> None:
    # Signed 5 names B, but the database never committed B: sign A as 6 and record 6.
    assert plan_sync(Committed("d", A, 4), Signed(B, 5)) == SyncStep(True, 6, True)
    assert plan_sync(Committed("d", A, 4), Signed(B, 4)) == SyncStep(True, 5, True)


def test_the_same_target_at_a_newer_signed_version_is_only_recorded() -> None:
    assert plan_sync(Committed("d", A, 4), Signed(A, 6)) == SyncStep(False, 6, True)


def test_a_withdrawn_assignment_is_signed_empty_at_the_recorded_version() -> None:
    # A yank or a decommission recorded "nothing" at version 5; the metadata still names A.
    assert plan_sync(Committed("d", None, 5), Signed(A, 4)) == SyncStep(True, 5, False)
    # Signed empty already: nothing to do.
    assert plan_sync(Committed("d", None, 5), Signed(None, 5)) is None


def test_metadata_naming_a_target_after_a_withdrawal_is_signed_empty_at_a_newer_version() -> None:
    assert plan_sync(Committed("d", None, 5), Signed(A, 5)) == SyncStep(True, 6, True)


def test_a_cancelled_assignment_is_signed_as_an_empty_one() -> None:
    # Cancelled at version 5 while the metadata still names A at 4: sign "nothing" as 5.
    assert plan_sync(Committed("d", None, 5), Signed(A, 4)) == SyncStep(True, 5, False)
    # The metadata got ahead naming A: sign "nothing" above it and record that version.
    assert plan_sync(Committed("d", None, 5), Signed(A, 5)) == SyncStep(True, 6, True)
    # Already signed as nothing: done.
    assert plan_sync(Committed("d", None, 5), Signed(None, 5)) is None


def test_a_shadow_beside_the_assignment_is_signed_and_dropped_like_one() -> None:
    # A shadow of B recorded at 5 beside A; the metadata names A alone at 4: sign both as 5.
    assert plan_sync(Committed("d", A, 5, shadow_path=B), Signed(A, 4)) == SyncStep(True, 5, False)
    assert plan_sync(Committed("d", A, 5, shadow_path=B), Signed(A, 5, B)) is None
    # A shadow alone, on a device assigned nothing.
    assert plan_sync(Committed("d", None, 3, shadow_path=B), Signed(None, 2)) == SyncStep(
        True, 3, False
    )
    assert plan_sync(Committed("d", None, 3, shadow_path=B), Signed(None, 3, B)) is None
    # Dropped at 6 while the metadata still lists it at 5: signed without it.
    assert plan_sync(Committed("d", A, 6), Signed(A, 5, B)) == SyncStep(True, 6, False)
    assert plan_sync(Committed("d", None, 6), Signed(None, 5, B)) == SyncStep(True, 6, False)
    # Metadata listing a shadow the database never committed is signed back without it.
    assert plan_sync(Committed("d", A, 4), Signed(A, 4, B)) == SyncStep(True, 5, True)
