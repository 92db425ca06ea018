"""The assignment rules as pure functions: which tag rule wins, refusals named, refusals matched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet_server.assignments import (
    AssignmentConflict,
    AssignmentError,
    Refusal,
    below_installed,
    counter_refusal,
    parse_assignment_id,
    refusal_of,
    refusal_warning,
    winning_rule,
)
from fleet_server.assignments.planner import refuse_cancelled
from fleet_server.db.models import AssignmentRule, Device, Release

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rule(rule_id: int, tag: str, cancelled: bool = False) -> AssignmentRule:
    return AssignmentRule(
        id=rule_id,
        tag=tag,
        target_path=f"m/m-{rule_id}.0.0.bundle",
        created_at=T0,
        actor="op",
        cancelled_at=T0 if cancelled else None,
    )


def release(version: str, counter: int) -> Release:
    return Release(
        target_path=f"pump-health/pump-health-{version}.bundle",
        name="pump-health",
        version=version,
        release_counter=counter,
        hardware_ids=["hw"],
    )


def device(device_id: str, counter: int, running: str | None = None) -> Device:
    return Device(id=device_id, hardware_id="hw", installed_counter=counter, active_bundle=running)


def test_the_newest_active_rule_of_the_device_tags_wins() -> None:
    rules = [rule(1, "a"), rule(2, "b"), rule(3, "c"), rule(4, "a", cancelled=True)]
    assert winning_rule(rules, ["a", "b"]) is rules[1]
    assert winning_rule(rules, ["a"]) is rules[0]  # rule 4 is cancelled
    assert winning_rule(rules, ["z"]) is None


def test_a_release_below_a_device_counter_is_refused_naming_a_few_and_counting_the_rest() -> None:
    old = release("1.1.0", 1001000999)
    fleet = [device(f"d{i}", 1003000999, "pump-health 1.3.0") for i in range(5)]
    fleet.append(device("fresh", 0))
    fleet.append(device("same", 1001000999, "pump-health 1.1.0"))
    below = below_installed(old, fleet)
    assert [d.id for d in below] == ["d0", "d1", "d2", "d3", "d4"]
    line = counter_refusal(old, below, len(fleet), "canary")
    assert "\n" not in line
    assert "pump-health 1.1.0 (release counter 1001000999)" in line
    assert "5 of the 7 devices it matches (tag canary)" in line
    assert "d0 runs pump-health 1.3.0 (release counter 1003000999)" in line
    assert "d2 runs" in line and "d3 runs" not in line and "and 2 more" in line
    assert "fleetctl release add --re-release-of pump-health@1.1.0" in line
    one = counter_refusal(old, below[:1], 1, None)
    assert "what the device runs: d0 runs pump-health 1.3.0" in one


def test_a_refusal_matches_the_assigned_bundle_only_by_its_name_and_version_since_assigned() -> (
    None
):
    assigned = release("1.1.0", 1001000999)

    def refusal(minutes: int, bundle: str | None, message: str) -> Refusal:
        at = T0 + timedelta(minutes=minutes)
        return Refusal(at, at, "refused", "r", bundle, message)

    since = T0 + timedelta(minutes=10)
    assert refusal_of([refusal(5, "pump-health 1.1.0", "x")], assigned, since) is None
    newer = refusal(15, None, "pump-health 1.1.0 has release counter 1, below the installed 2")
    assert refusal_of([newer], assigned, since) is newer
    other = refusal(15, None, "pump-health 1.1.0-rc.1 has release counter 1, below 2")
    assert refusal_of([other], assigned, since) is None
    named = refusal(20, "pump-health 1.1.0", "self-test failed")
    assert refusal_of([named, newer], assigned, since) is named


@pytest.mark.parametrize("text", ["dev-0", "tag-", "rule-3", "dev-3x", "3", "dev-6432747602"])
def test_assignment_ids_are_dev_or_tag_and_a_number(text: str) -> None:
    with pytest.raises(AssignmentError, match="dev-N"):
        parse_assignment_id(text)


def test_assignment_ids_parse() -> None:
    assert parse_assignment_id("dev-12") == ("dev", 12)
    assert parse_assignment_id("tag-3") == ("tag", 3)


def test_a_rollback_of_the_assigned_bundle_warns_as_a_rollback() -> None:
    assigned = release("1.2.0", 1002000999)
    at = T0 + timedelta(minutes=1)
    rolled = Refusal(at, at, "rolled-back", "watchdog", "pump-health 1.2.0", "3 failures")
    assert refusal_of([rolled], assigned, T0) is rolled
    line = refusal_warning("pump-1", assigned, rolled)
    assert line.startswith("pump-1 rolled back the assigned pump-health 1.2.0 at 2026-01-01")
    assert "(watchdog: 3 failures)" in line


def test_cancelling_twice_names_who_cancelled_and_when() -> None:
    refuse_cancelled("dev-3", None, None)
    with pytest.raises(AssignmentConflict) as refused:
        refuse_cancelled("tag-2", T0, "token:ab:ci")
    said = "tag-2 was already cancelled by token:ab:ci at 2026-01-01 00:00:00Z"
    assert str(refused.value) == said
