"""The assignment planner over plain data: hardware, release counter, yanked, rule precedence."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleet_server.assignments.models import AssignmentConflict, AssignmentError, ReleaseYanked
from fleet_server.assignments.planner import (
    DeviceFacts,
    ReleaseFacts,
    RollbackFacts,
    RollbackPlan,
    RollbackRefused,
    RuleFacts,
    below_installed,
    check_assignment,
    plan_rollback,
    refuse_yanked,
    rule_skip_reason,
    rule_to_apply,
    winning_rule,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RELEASE = ReleaseFacts("kws/kws-1.2.0.bundle", "kws", "1.2.0", 5, ("pi4", "pi5"))
YANKED = ReleaseFacts(
    "kws/kws-1.1.0.bundle", "kws", "1.1.0", 4, ("pi4",), yanked_at=T0, yank_reason="bad accuracy"
)


def device(name: str, hardware: str = "pi4", counter: int | None = None) -> DeviceFacts:
    bundle = None if counter is None else f"kws 9.{counter}.0"
    return DeviceFacts(name, hardware, installed_counter=counter, active_bundle=bundle)


# -- assigning a release to devices --------------------------------------------


def test_a_release_goes_to_devices_of_its_hardware_at_or_below_its_counter() -> None:
    check_assignment(RELEASE, [device("a"), device("b", "pi5", 5), device("c", counter=4)], None)


def test_no_device_is_refused_and_a_tag_nobody_has_is_named() -> None:
    with pytest.raises(AssignmentError, match=r"^no device matches the assignment$"):
        check_assignment(RELEASE, [], None)
    with pytest.raises(AssignmentError, match="no device has the tag lab; tag one first"):
        check_assignment(RELEASE, [], "lab")


def test_another_hardware_is_refused_naming_the_devices() -> None:
    devices = [device("a"), device("b", "jetson"), device("c", "coral")]
    with pytest.raises(AssignmentError, match=r"not released for the hardware of b, c$") as err:
        check_assignment(RELEASE, devices, None)
    assert not isinstance(err.value, AssignmentConflict)


def test_a_counter_below_what_a_device_runs_is_a_conflict() -> None:
    devices = [device("a", counter=3), device("b", counter=6), device("c", counter=7)]
    with pytest.raises(AssignmentConflict, match=r"2 of the 3 devices run: b runs kws 9\.6\.0"):
        check_assignment(RELEASE, devices, None)
    assert below_installed(RELEASE, devices) == devices[1:]


def test_hardware_is_checked_before_the_counter() -> None:
    with pytest.raises(AssignmentError, match="not released for the hardware of b") as err:
        check_assignment(RELEASE, [device("a", counter=9), device("b", "coral")], None)
    assert not isinstance(err.value, AssignmentConflict)


def test_a_yanked_release_is_refused_with_its_reason() -> None:
    refuse_yanked(RELEASE)
    with pytest.raises(
        ReleaseYanked, match=r"kws 1\.1\.0 was yanked: bad accuracy; assign another"
    ):
        refuse_yanked(YANKED)


# -- tag rules: which applies to a device that gained tags -----------------------


def test_no_rule_applies_unless_a_gained_tag_has_one() -> None:
    rules = [RuleFacts(1, "lab")]
    assert rule_to_apply(rules, {"lab", "eu"}, {"eu"}, None, assigned=False) is None
    assert rule_to_apply(rules, {"lab"}, {"lab"}, None, assigned=False) == rules[0]
    # A tag gained and lost again (not held) applies nothing.
    assert rule_to_apply(rules, {"eu"}, {"lab"}, None, assigned=False) is None


def test_of_two_matching_rules_the_newest_wins_even_for_a_tag_held_before() -> None:
    rules = [RuleFacts(7, "lab"), RuleFacts(3, "eu")]
    assert rule_to_apply(rules, {"lab", "eu"}, {"eu"}, None, assigned=False) == rules[0]
    assert winning_rule(rules, {"eu"}) == rules[1]


def test_a_cancelled_rule_applies_to_nobody() -> None:
    rules = [RuleFacts(7, "lab", cancelled_at=T0), RuleFacts(3, "lab")]
    assert rule_to_apply(rules, {"lab"}, {"lab"}, None, assigned=False) == rules[1]
    only_cancelled = [RuleFacts(7, "lab", cancelled_at=T0)]
    assert rule_to_apply(only_cancelled, {"lab"}, {"lab"}, None, assigned=False) is None


def test_an_assignment_by_name_overrides_every_rule() -> None:
    rules = [RuleFacts(2, "lab")]
    assert rule_to_apply(rules, {"lab"}, {"lab"}, None, assigned=True) is None


def test_the_winning_rule_already_assigned_changes_nothing_an_older_one_is_replaced() -> None:
    rules = [RuleFacts(2, "lab"), RuleFacts(5, "eu")]
    assert rule_to_apply(rules, {"lab", "eu"}, {"eu"}, 5, assigned=True) is None
    assert rule_to_apply(rules, {"lab", "eu"}, {"eu"}, 2, assigned=True) == rules[1]


def test_a_cancelled_assignment_no_longer_overrides() -> None:
    rules = [RuleFacts(2, "lab")]
    assert rule_to_apply(rules, {"lab"}, {"lab"}, None, assigned=False) == rules[0]


# -- why a rule's release cannot go to a device --------------------------------


def test_a_rule_is_skipped_for_a_yanked_release_another_hardware_or_a_lower_counter() -> None:
    assert rule_skip_reason(RELEASE, device("a", counter=5)) is None
    assert rule_skip_reason(YANKED, device("a")) == "kws 1.1.0 was yanked: bad accuracy"
    assert rule_skip_reason(RELEASE, device("a", "coral")) == "kws 1.2.0 is not released for coral"
    why = rule_skip_reason(RELEASE, device("a", counter=6))
    assert why is not None and why.startswith(
        "kws 1.2.0 (release counter 5) is below what the device runs: a runs kws 9.6.0"
    )


def test_yanked_is_named_before_hardware_and_counter() -> None:
    why = rule_skip_reason(YANKED, device("a", "coral", counter=9))
    assert why == "kws 1.1.0 was yanked: bad accuracy"


# -- a fleet rollback: one step back, marked ---------------------------------------

NEWER = ReleaseFacts("kws/kws-1.3.0.bundle", "kws", "1.3.0", 6, ("pi4", "pi5"))
OLDEST = ReleaseFacts("kws/kws-1.0.0.bundle", "kws", "1.0.0", 3, ("pi4", "pi5"))
RAN_1_2_THEN_1_3 = RollbackFacts(
    "a", "pi4", running=NEWER.target_path, running_sha256="e" * 64, ran_before=RELEASE.target_path
)


def test_a_device_goes_back_to_the_release_it_ran_right_before_as_a_marked_rollback() -> None:
    plan = plan_rollback(RAN_1_2_THEN_1_3, RELEASE)
    assert plan == RollbackPlan("a", RELEASE.target_path, rollback_of="sha256:" + "e" * 64)
    # Below the device's counter, which an ordinary assignment may never be.
    with pytest.raises(AssignmentConflict):
        check_assignment(RELEASE, [device("a", counter=NEWER.release_counter)], None)


def test_a_rollback_to_anything_but_the_release_run_right_before_is_refused() -> None:
    with pytest.raises(
        RollbackRefused, match=r"did not run kws 1\.0\.0 right before .*\(it ran kws/kws-1\.2\.0"
    ):
        plan_rollback(RAN_1_2_THEN_1_3, OLDEST)
    with pytest.raises(RollbackRefused, match=r"runs kws 1\.3\.0 already"):
        plan_rollback(RAN_1_2_THEN_1_3, NEWER)
    unknown = RollbackFacts("a", "pi4", None, None, None)
    with pytest.raises(RollbackRefused, match="runs no release the server knows"):
        plan_rollback(unknown, RELEASE)
    first = RollbackFacts("a", "pi4", NEWER.target_path, "e" * 64, ran_before=None)
    with pytest.raises(RollbackRefused, match="it ran no release the server knows"):
        plan_rollback(first, RELEASE)


def test_a_rollback_to_a_yanked_release_or_for_other_hardware_is_refused() -> None:
    ran_yanked = RollbackFacts("a", "pi4", NEWER.target_path, "e" * 64, YANKED.target_path)
    with pytest.raises(RollbackRefused, match=r"kws 1.1.0 was yanked \(bad accuracy\)"):
        plan_rollback(ran_yanked, YANKED)
    jetson = RollbackFacts("j", "jetson", NEWER.target_path, "e" * 64, RELEASE.target_path)
    with pytest.raises(RollbackRefused, match="not released for jetson"):
        plan_rollback(jetson, RELEASE)
