"""The scenario check ``expectations`` names why a rollout ended otherwise than expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulator.checks import RunRecord, expectations
from simulator.scenario import load_scenario

DEMO = Path(__file__).parents[2] / "simulator" / "scenarios" / "demo.toml"


def _record(rollout: dict[str, Any]) -> RunRecord:
    scenario = load_scenario(DEMO)
    expect = scenario.expect.model_copy(update={"drift_alerts": None, "plans_adapt": False})
    scenario = scenario.model_copy(update={"expect": expect})

    def api(method: str, path: str, body: Any = None) -> Any:
        assert (method, path) == ("GET", "/rollouts/ro-1")
        return rollout

    return RunRecord(scenario, {}, {}, {}, rollouts=["ro-1"], api=api)


def test_an_unexpected_phase_is_named_with_the_rollouts_reason() -> None:
    reason = "inconclusive after 30s: accuracy_estimated devices"
    check = expectations(_record({"phase": "paused", "reason": reason, "stage": 1}))
    assert not check.passed
    assert f"rollout paused (expected rolled-back) ({reason})" in check.detail
    assert "stopped in wave 1 (expected 1)" in check.detail


def test_the_expected_phase_is_met_without_its_reason() -> None:
    reason = "stop-gate failed: install_failures shows harm"
    check = expectations(_record({"phase": "rolling_back", "reason": reason, "stage": 1}))
    assert check.passed, check.detail
    assert (
        check.detail
        == "rollout rolling_back (expected rolled-back); stopped in wave 1 (expected 1)"
    )
