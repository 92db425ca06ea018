"""Every transition of the alert lifecycle, decided from results and open alerts alone."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fleet_server.drift.lifecycle import Decision, decide, notified, open_key
from fleet_server.drift.models import Accuracy, Scope
from protocol.cbpe import AccuracyEstimate, AccuracyVerdict
from tests.support.drift_results import feature, result

DEVICE = Scope("device", "pump-17")
DRIFT_KEY = open_key(DEVICE, "pump-health", "1.0.0", "drift")
ACCURACY_KEY = open_key(DEVICE, "pump-health", "1.0.0", "accuracy")


def accuracy(verdict: AccuracyVerdict, estimated: float = 0.7) -> Accuracy:
    estimate = AccuracyEstimate(
        accuracy=estimated, low=estimated - 0.05, high=estimated + 0.05, confidence=0.95,
        n=900, unseen_share=0.0,
    )  # fmt: skip
    return Accuracy(estimate=estimate, reference=0.9, threshold=0.85, verdict=verdict)


def listed(decision: Decision) -> list[tuple[int, list[str]]]:
    return [(f["feature"], f["reasons"]) for f in decision.evidence["features"]]


def changes(decisions: list[Decision]) -> list[tuple[str, str, str]]:
    return [(d.change, d.cause, d.key) for d in decisions]


def test_drift_with_no_open_alert_opens_one_listing_the_drifting_tests() -> None:
    [opened] = decide(DEVICE, [result(feature(0, distribution="drift"), feature(1))], {})
    assert (opened.change, opened.cause, opened.key) == ("opened", "drift", DRIFT_KEY)
    assert (opened.model_name, opened.model_version) == ("pump-health", "1.0.0")
    assert opened.evidence["verdict"] == "drift" and listed(opened) == [(0, ["distribution"])]


def test_drift_on_an_open_alert_updates_it_with_every_drifting_test() -> None:
    [opened] = decide(DEVICE, [result(feature(0, distribution="drift"))], {})
    [updated] = decide(
        DEVICE,
        [result(feature(0, distribution="drift"), feature(2, missing="drift"))],
        {DRIFT_KEY: opened.evidence},
    )
    assert (updated.change, updated.cause, updated.key) == ("updated", "drift", DRIFT_KEY)
    assert listed(updated) == [(0, ["distribution"]), (2, ["missing-values"])]


def test_a_recovered_test_leaves_the_open_alert_which_stays_open_while_one_remains() -> None:
    [opened] = decide(
        DEVICE, [result(feature(0, distribution="drift"), feature(1, distribution="drift"))], {}
    )
    [updated] = decide(DEVICE, [result(feature(0), feature(1, distribution="drift"))],
                       {DRIFT_KEY: opened.evidence})  # fmt: skip
    assert updated.change == "updated" and listed(updated) == [(1, ["distribution"])]


def test_the_last_recovered_test_closes_the_alert_with_what_cleared() -> None:
    [opened] = decide(DEVICE, [result(feature(0, distribution="drift"))], {})
    [closed] = decide(DEVICE, [result(feature(0))], {DRIFT_KEY: opened.evidence})
    assert (closed.change, closed.cause, closed.key) == ("closed", "drift", DRIFT_KEY)
    assert closed.evidence["verdict"] == "no_drift"
    assert listed(closed) == [(0, ["distribution"])]
    assert closed.evidence["features"][0]["tests"]["distribution"]["verdict"] == "no_drift"


def test_too_little_data_keeps_an_open_alert_as_it_was_and_opens_none() -> None:
    [opened] = decide(DEVICE, [result(feature(0, distribution="drift"))], {})
    thin = result(feature(0, distribution="not_enough_data", missing="not_enough_data"))
    [kept] = decide(DEVICE, [thin], {DRIFT_KEY: opened.evidence})
    assert kept.change == "updated"
    assert kept.evidence["features"] == opened.evidence["features"]
    assert decide(DEVICE, [thin], {}) == []


def test_no_drift_without_an_open_alert_changes_nothing() -> None:
    assert decide(DEVICE, [result(feature(0), feature(1))], {}) == []


def test_a_result_with_a_problem_changes_nothing() -> None:
    [opened] = decide(DEVICE, [result(feature(0, distribution="drift"))], {})
    broken = replace(result(feature(0)), problem="no release pump-health@1.0.0")
    assert decide(DEVICE, [broken], {DRIFT_KEY: opened.evidence}) == []
    assert decide(DEVICE, [replace(broken, accuracy=accuracy("below"))], {}) == []


@pytest.mark.parametrize(
    ("verdict", "is_open", "expected"),
    [
        ("below", False, "opened"),
        ("below", True, "updated"),
        ("within", True, "closed"),
        ("within", False, None),
        ("uncertain", True, None),
        ("uncertain", False, None),
        ("not_enough_data", True, None),
        ("not_enough_data", False, None),
    ],
)
def test_accuracy_verdicts_open_update_close_or_change_nothing(
    verdict: AccuracyVerdict, is_open: bool, expected: str | None
) -> None:
    found = accuracy(verdict)
    open_evidence: dict[str, dict[str, Any]] = (
        {ACCURACY_KEY: {"verdict": "below"}} if is_open else {}
    )
    decisions = decide(DEVICE, [result(accuracy=found)], open_evidence)
    if expected is None:
        assert decisions == []
        return
    [decision] = decisions
    assert (decision.change, decision.cause, decision.key) == (expected, "accuracy", ACCURACY_KEY)
    assert decision.evidence["verdict"] == verdict
    assert decision.evidence["estimated"] == found.estimate.accuracy
    assert decision.evidence["threshold"] == 0.85


def test_drift_and_accuracy_of_one_version_are_two_alerts_decided_together() -> None:
    both = result(feature(0, distribution="drift"), accuracy=accuracy("below"))
    assert changes(decide(DEVICE, [both], {})) == [
        ("opened", "drift", DRIFT_KEY),
        ("opened", "accuracy", ACCURACY_KEY),
    ]


def test_each_scope_has_its_own_alerts() -> None:
    drifting = result(feature(0, distribution="drift"))
    [opened] = decide(DEVICE, [drifting], {})
    fleet_key = open_key(Scope("fleet"), "pump-health", "1.0.0", "drift")
    [fleet] = decide(Scope("fleet"), [drifting], {DRIFT_KEY: opened.evidence})
    assert (fleet.change, fleet.key) == ("opened", fleet_key)


def test_one_pass_sees_its_own_earlier_decisions() -> None:
    # Two results of one model version in one pass: each sees what the one before decided.
    drifting = result(feature(0, distribution="drift"))
    assert changes(decide(DEVICE, [drifting, drifting], {})) == [
        ("opened", "drift", DRIFT_KEY),
        ("updated", "drift", DRIFT_KEY),
    ]
    recovered = result(feature(0))
    assert changes(decide(DEVICE, [drifting, recovered, recovered], {})) == [
        ("opened", "drift", DRIFT_KEY),
        ("closed", "drift", DRIFT_KEY),
    ]


def test_opened_and_closed_alerts_are_notified_unless_suppressed_updates_never() -> None:
    assert notified("opened", suppressed=False) and notified("closed", suppressed=False)
    assert not notified("updated", suppressed=False)
    assert not notified("opened", suppressed=True) and not notified("closed", suppressed=True)
