"""The hybrid service's pure parts: folding windows into hourly stats, a device's demand from
them, and the checks that call for a re-plan (Wilson intervals, expiry, changes)."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.cli import build_parser, config_from_args
from fleet_server.hybrid.aggregates import NO_PLAN, combine, combine_all, fold_hybrid
from fleet_server.hybrid.demand import (
    device_inputs,
    fleet_demand,
    latency_p95_ms,
    scores_to_confidence,
)
from fleet_server.hybrid.watch import (
    Observed,
    agreement_reason,
    changed_reason,
    expiry_reason,
    load_reason,
    observed,
    offload_reason,
    wilson,
)
from fleet_server.server import hybrid_settings
from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary, calibrated_confidence
from protocol.summary import SCORE_BIN_COUNT, score_histogram
from protocol.window import WindowSummary

T0 = 1_780_000_800.0
CLASSES = ["a", "b", "c", "d"]


def window(
    device: str = "d1",
    *,
    end: float = T0,
    seconds: float = 60.0,
    hybrid: HybridSummary | None = None,
) -> WindowSummary:
    rng = np.random.default_rng(7)
    return WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device,
        model_name="m",
        model_version="1.0.0",
        baseline_id="b",
        start=end - seconds,
        end=end,
        requests=120,
        served={"active": 120},
        features=[],
        scores=score_histogram(rng.dirichlet([1.0] * 4, size=120), CLASSES),
        hybrid=hybrid,
    )


def summary(plan: str = "p-000000000001", **counts: int) -> HybridSummary:
    confidence = [0] * CONFIDENCE_BINS
    confidence[10] = 20
    confidence[45] = 100
    values: dict[str, Any] = {
        "local": 100,
        "escalated": 20,
        "cloud_answered": 18,
        "audits": 2,
        **counts,
    }
    return HybridSummary(
        plan_id=plan,
        mode="escalate",
        cloud_errors={"rate_limited": 1, "timeout": 1},
        cloud_latency_ms=record(ExponentialHistogram(), np.full(18, 40.0)),
        confidence=confidence,
        **values,
    )


def test_a_window_without_hybrid_section_counts_its_rate_and_scores_under_no_plan() -> None:
    d = fold_hybrid(window(seconds=60))
    assert d.plan_id == NO_PLAN and d.requests == 120 and d.seconds == 60
    assert d.score_classes == 4 and sum(d.scores) == 120 and len(d.scores) == SCORE_BIN_COUNT
    assert sum(d.confidence) == 0 and d.escalated == 0


def test_a_hybrid_section_counts_in_its_plans_row_and_rows_add() -> None:
    a = fold_hybrid(window(hybrid=summary()))
    b = fold_hybrid(window(end=T0 + 60, hybrid=summary()))
    assert a.plan_id == "p-000000000001" and a.escalated == 20 and sum(a.confidence) == 120
    both = combine(a, b)
    assert both.windows == 2 and both.requests == 240 and both.escalated == 40
    assert both.cloud_errors == {"rate_limited": 2, "timeout": 2}
    assert sum(both.cloud_latency.values()) == 36
    assert both.last_end == datetime.fromtimestamp(T0 + 60, UTC)
    assert len(combine_all([a, b, fold_hybrid(window())])) == 2
    with pytest.raises(ValueError, match="different rows"):
        combine(a, fold_hybrid(window()))


def test_wilson_holds_the_truth_and_narrows_with_n() -> None:
    lo, hi = wilson(20, 100, 0.99)
    assert lo < 0.2 < hi
    lo2, hi2 = wilson(200, 1000, 0.99)
    assert hi2 - lo2 < hi - lo
    assert wilson(0, 0, 0.95) == (0.0, 1.0)
    assert wilson(0, 50, 0.95)[0] == 0.0 and wilson(50, 50, 0.95)[1] == 1.0


def test_observed_offload_inside_its_interval_calls_for_nothing_outside_it_does() -> None:
    seen = observed([fold_hybrid(window(hybrid=summary()))] * 5)
    assert seen.offloaded == 5 * 22 and seen.requests == 600
    assert offload_reason(0.18, seen, 0.99) is None
    reason = offload_reason(0.05, seen, 0.99)
    assert reason is not None and "0.183" in reason and "600 requests" in reason
    assert offload_reason(0.9, Observed(requests=10, offloaded=0), 0.99) is None  # too few


def test_audit_agreement_is_held_against_what_calibration_promised() -> None:
    fine = Observed(audit_compared=200, audit_agreements=180, audit_confidence_sum=182.0)
    assert agreement_reason(fine, 0.99) is None
    off = Observed(audit_compared=200, audit_agreements=120, audit_confidence_sum=182.0)
    reason = agreement_reason(off, 0.99)
    assert reason is not None and "0.910 calibration promised" in reason


def test_load_expiry_and_changes_say_why() -> None:
    assert load_reason(9.0, 10.0) is None
    assert "exceeds the capacity 10.00/s" in (load_reason(12.0, 10.0) or "")
    now = datetime(2026, 12, 7, tzinfo=UTC)
    assert expiry_reason(now + timedelta(minutes=5), now, timedelta(minutes=3)) is None
    assert expiry_reason(now + timedelta(minutes=2), now, timedelta(minutes=3)) is not None
    assert changed_reason("capacity", 10.0, 10.0) is None
    assert changed_reason("capacity", 10.0, 5) == "capacity changed from 10.0 to 5"
    assert changed_reason("offload opt-out", False, True) is not None


def test_top_scores_map_through_the_temperature_exactly_for_two_classes() -> None:
    rng = np.random.default_rng(3)
    p = rng.dirichlet([0.7, 0.7], size=5000)
    hist = score_histogram(p, ["x", "y"])
    scores = [sum(col) for col in zip(*hist.counts, strict=True)]
    t = 2.0
    mapped = scores_to_confidence(scores, 2, t)
    truth = np.bincount(
        np.clip((calibrated_confidence(p, t) * CONFIDENCE_BINS).astype(int), 0, 49), minlength=50
    )
    assert mapped.sum() == 5000
    # Bin centres stand for their bins: the mapped mean is the true one within a bin's width.
    centres = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS
    assert abs((mapped * centres).sum() / 5000 - (truth * centres).sum() / 5000) < 0.03
    # T = 1 leaves scores where they are.
    same = scores_to_confidence(scores, 2, 1.0)
    assert (
        abs((same * centres).sum() - (np.array(scores) * ((np.arange(20) + 0.5) / 20)).sum())
        < 5000 / 100
    )


def test_a_devices_demand_prefers_hybrid_confidence_then_scores_then_none() -> None:
    plain = [fold_hybrid(window(seconds=60))]
    d = device_inputs("d1", weight=2.0, opted_out=False, temperature=1.5, recent=plain)
    assert d.source == "scores" and d.rate == pytest.approx(2.0) and d.confidence.sum() == 120
    assert math.isnan(d.link_latency_p95_ms) and d.link_errors == 0.0
    mixed = [*plain, fold_hybrid(window(hybrid=summary()))]
    d = device_inputs("d1", weight=2.0, opted_out=False, temperature=1.5, recent=mixed)
    assert d.source == "hybrid" and d.confidence.sum() == 120 and d.rate == pytest.approx(2.0)
    # One timeout of 22 cloud calls; the 429 is the cloud's refusal, not the link's.
    assert d.link_errors == pytest.approx(1 / 22)
    assert 40 <= d.link_latency_p95_ms <= 40 * 2**0.25
    none = device_inputs("d2", weight=1.0, opted_out=True, temperature=1.0, recent=[])
    assert none.source == "none" and none.rate == 0.0 and none.confidence.sum() == 0
    demand = fleet_demand([d, none])
    assert demand.device_ids == ["d1", "d2"] and demand.confidence.shape == (2, CONFIDENCE_BINS)
    assert demand.opted_out.tolist() == [False, True] and demand.weight.tolist() == [2.0, 1.0]
    assert math.isnan(latency_p95_ms({}))


def test_fleet_server_flags_set_the_planning_interval_ttl_capacity_and_cloud_model(
    tmp_path: Path,
) -> None:
    flags = ["--plan-interval", "2", "--plan-ttl", "120", "--cloud-capacity", "40"]
    args = build_parser().parse_args(["--data", str(tmp_path), *flags, "--cloud-model", "big"])
    config = config_from_args(args)
    assert (config.hybrid_interval_s, config.hybrid_plan_ttl_s) == (2.0, 120.0)
    assert (config.hybrid_capacity, config.hybrid_cloud_model) == (40.0, "big")
    settings = hybrid_settings(config)
    assert settings.ttl == timedelta(seconds=120) and settings.renew_before < settings.ttl
    assert settings.default_capacity == 40.0 and settings.cloud_model == "big"
    defaults = config_from_args(build_parser().parse_args(["--data", str(tmp_path)]))
    assert defaults.hybrid_capacity == 0.0 and defaults.hybrid_interval_s == 30.0


def test_the_link_is_judged_on_the_current_plans_windows_so_a_local_plan_tries_it_again() -> None:
    # Under p-1 every cloud call timed out; the device was then planned local (p-2), under
    # which it makes no calls. Judged on p-2's windows its link is unknown, not failing, so
    # its next plan may send requests again; judged on every recent window it never would.
    failing = summary("p-000000000001", escalated=20, cloud_answered=0)
    failing = failing.model_copy(update={"cloud_errors": {"timeout": 22}})
    local = HybridSummary(plan_id="p-000000000002", mode="local", local=120)
    recent = [fold_hybrid(window(hybrid=failing)), fold_hybrid(window(hybrid=local))]
    stale = device_inputs("d1", weight=1.0, opted_out=False, temperature=1.0, recent=recent)
    assert stale.link_errors == 1.0
    now = device_inputs(
        "d1",
        weight=1.0,
        opted_out=False,
        temperature=1.0,
        recent=recent,
        link_plans=["p-000000000002"],
    )
    assert now.link_errors == 0.0 and math.isnan(now.link_latency_p95_ms)
    assert now.rate == stale.rate  # the demand itself still counts every window
    under_failing = device_inputs(
        "d1",
        weight=1.0,
        opted_out=False,
        temperature=1.0,
        recent=recent,
        link_plans=["p-000000000001"],
    )
    assert under_failing.link_errors == 1.0
