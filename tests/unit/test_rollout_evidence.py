"""Rollout evidence: device aggregates to each gate's estimate, se and counts."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fleet_server.rollouts.evidence import (
    ACCURACY_ESTIMATED,
    ACCURACY_LABELLED,
    CLASS_MIX,
    FALLBACK_RATE,
    INSTALL_FAILURES,
    LATENCY_P95,
    DeviceAggregate,
    InstallRecord,
    InstallTally,
    MeanSums,
    RateSums,
    accuracy_evidence,
    class_mix_evidence,
    fallback_evidence,
    gather,
    install_tally,
    labelled_accuracy_evidence,
    latency_evidence,
    log_rate_ratio,
    mean_difference,
    reporting,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def device(i: int, arm: str = "treatment", **fields: object) -> DeviceAggregate:
    values: dict[str, object] = {"requests": 600, "windows": 10, **fields}
    return DeviceAggregate(f"dev-{i}", arm, **values)  # type: ignore[arg-type]


def fallbacks(arm: str, counts: list[int], expected: float = 10.0) -> list[DeviceAggregate]:
    return [
        device(i, arm, fallbacks=c, expected_fallbacks=expected)
        for i, c in enumerate(counts, start=0 if arm == "treatment" else 1000)
    ]


def test_no_devices_gives_nan_evidence_not_zero() -> None:
    for evidence in (
        fallback_evidence([]),
        latency_evidence([]),
        accuracy_evidence([]),
        labelled_accuracy_evidence([]),
        class_mix_evidence([]),
    ):
        assert math.isnan(evidence.estimate) and math.isnan(evidence.se)
        assert evidence.n_treatment == evidence.n_control == 0


def test_one_device_an_arm_is_not_enough_for_a_variance() -> None:
    evidence = fallback_evidence(fallbacks("treatment", [10]) + fallbacks("control", [10, 12]))
    assert math.isnan(evidence.se)
    assert (evidence.n_treatment, evidence.n_control) == (1, 2)


def test_fallback_ratio_is_the_log_of_the_rates_over_expected_counts() -> None:
    same = fallback_evidence(fallbacks("treatment", [10, 10]) + fallbacks("control", [10, 10]))
    double = fallback_evidence(fallbacks("treatment", [20, 20]) + fallbacks("control", [10, 10]))
    assert same.estimate == pytest.approx(0.0)
    assert double.estimate == pytest.approx(math.log(2.0))
    assert double.samples_treatment == 1200


def test_fallback_se_is_floored_at_the_poisson_variance() -> None:
    # Every device exactly at its arm's rate: no residual spread, the Poisson floor remains.
    evidence = fallback_evidence(fallbacks("treatment", [20, 20]) + fallbacks("control", [10, 10]))
    assert evidence.se == pytest.approx(math.sqrt(1 / 40 + 1 / 20))


def test_devices_that_differ_widen_the_fallback_se() -> None:
    even = fallback_evidence(
        fallbacks("treatment", [50, 50, 50, 50]) + fallbacks("control", [50] * 4)
    )
    spread = fallback_evidence(
        fallbacks("treatment", [5, 95, 10, 90]) + fallbacks("control", [50] * 4)
    )
    assert spread.estimate == pytest.approx(even.estimate)
    assert spread.se > 3 * even.se


def test_no_fallbacks_in_an_arm_is_not_an_estimate() -> None:
    evidence = fallback_evidence(fallbacks("treatment", [0, 0, 0]) + fallbacks("control", [5, 6]))
    assert math.isnan(evidence.estimate)


def test_devices_without_requests_or_a_baseline_are_left_out_of_fallbacks() -> None:
    devices = [
        *fallbacks("treatment", [10, 10]),
        device(7, "treatment", requests=0, fallbacks=0, expected_fallbacks=10.0),
        device(8, "treatment", fallbacks=3, expected_fallbacks=0.0),
        *fallbacks("control", [10, 10]),
    ]
    assert fallback_evidence(devices).n_treatment == 2


def test_latency_compares_each_devices_change_since_before_the_rollout() -> None:
    devices = [
        device(0, log_p95=4.1, pre_log_p95=4.0),
        device(1, log_p95=3.2, pre_log_p95=3.0),
        device(2, "control", log_p95=5.0, pre_log_p95=5.0),
        device(3, "control", log_p95=2.9, pre_log_p95=3.0),
    ]
    evidence = latency_evidence(devices)
    assert evidence.estimate == pytest.approx(0.15 - (-0.05))
    expected = math.sqrt(np.var([0.1, 0.2], ddof=1) / 2 + np.var([0.0, -0.1], ddof=1) / 2)
    assert evidence.se == pytest.approx(expected)


def test_missing_or_nan_values_are_left_out_not_counted_as_zero() -> None:
    devices = [
        device(0, accuracy=0.9, pre_accuracy=0.9),
        device(1, accuracy=0.8, pre_accuracy=0.9),
        device(2, accuracy=None, pre_accuracy=0.9),
        device(3, accuracy=math.nan, pre_accuracy=0.9),
        device(4, accuracy=0.9, pre_accuracy=None),
        device(5, "control", accuracy=0.9, pre_accuracy=0.9),
        device(6, "control", accuracy=0.9, pre_accuracy=0.8),
        device(7, "control", windows=0, accuracy=0.1, pre_accuracy=0.9),
    ]
    evidence = accuracy_evidence(devices)
    assert (evidence.n_treatment, evidence.n_control) == (2, 2)
    assert evidence.estimate == pytest.approx(-0.05 - 0.05)


def test_labelled_accuracy_is_correct_over_labelled_with_a_binomial_floor() -> None:
    devices = [
        device(0, labelled=100, correct=100),
        device(1, labelled=100, correct=100),
        device(2, "control", labelled=100, correct=100),
        device(3, "control", labelled=100, correct=100),
        device(4, "control"),  # no labels: not counted
    ]
    evidence = labelled_accuracy_evidence(devices)
    assert evidence.estimate == pytest.approx(0.0)
    assert evidence.se > 0  # all correct is not certainty
    assert (evidence.n_control, evidence.samples_control) == (2, 200)


def test_class_mix_is_the_total_variation_between_the_arms_mean_shares() -> None:
    def arm(name: str, first: list[int], start: int) -> list[DeviceAggregate]:
        return [device(start + i, name, classes=(c, 100 - c)) for i, c in enumerate(first)]

    close = class_mix_evidence(arm("treatment", [49, 51, 52], 0) + arm("control", [50, 50, 51], 9))
    moved = class_mix_evidence(arm("treatment", [78, 80, 82], 0) + arm("control", [48, 50, 52], 9))
    assert close.estimate == pytest.approx(1 / 300)
    assert moved.estimate == pytest.approx(0.3)
    # One value per device, (c - 50) / 100: sd 0.02 in each arm of 3.
    assert moved.se == pytest.approx(math.sqrt(2 * 0.02**2 / 3))


def test_class_mix_pads_devices_that_saw_fewer_classes() -> None:
    devices = [
        device(0, classes=(10,)),
        device(1, classes=(9, 1, 0)),
        device(2, "control", classes=(0, 10)),
        device(3, "control", classes=(1, 4, 5)),
    ]
    assert class_mix_evidence(devices).estimate == pytest.approx(0.9)


def test_class_mix_without_predictions_is_not_an_estimate() -> None:
    devices = [device(0), device(1), device(2, "control"), device(3, "control")]
    assert math.isnan(class_mix_evidence(devices).estimate)


def test_install_tally_counts_silence_after_install_as_failure() -> None:
    timeout = timedelta(minutes=15)
    now = T0 + timedelta(hours=1)
    records = [
        InstallRecord("committed", T0, "committed", now - timedelta(minutes=1)),
        InstallRecord("refused", T0, "failed", now),
        InstallRecord("silent-after-commit", T0, "committed", T0 + timedelta(minutes=5)),
        InstallRecord("never-heard", T0),
        InstallRecord("still-installing", now - timedelta(minutes=5)),
        InstallRecord("heard-but-no-outcome", T0, None, now),
    ]
    assert install_tally(records, now, timeout) == InstallTally(failures=4, installs=5)
    assert install_tally([], now, timeout) == InstallTally(0, 0)


def test_reporting_counts_devices_with_windows_per_arm() -> None:
    devices = [device(0), device(1, windows=0), device(2, "control"), device(3, "control")]
    assert reporting(devices) == (1, 2)


def test_array_sums_judge_many_rollouts_at_once_as_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    x = rng.poisson(5.0, (4, 50)).astype(float)
    e = rng.uniform(4.0, 6.0, (4, 50))
    arm = rng.random((4, 50)) < 0.3
    together = log_rate_ratio(RateSums.of(x, e, arm), RateSums.of(x, e, ~arm))
    means = mean_difference(MeanSums.of(e, arm), MeanSums.of(e, ~arm))
    for row in range(4):
        alone = log_rate_ratio(
            RateSums.of(x[row][arm[row]], e[row][arm[row]]),
            RateSums.of(x[row][~arm[row]], e[row][~arm[row]]),
        )
        assert together[0][row] == pytest.approx(float(alone[0]))
        assert together[1][row] == pytest.approx(float(alone[1]))
        mean_alone = mean_difference(MeanSums.of(e[row][arm[row]]), MeanSums.of(e[row][~arm[row]]))
        assert means[1][row] == pytest.approx(float(mean_alone[1]))


def test_gather_names_every_gates_evidence() -> None:
    evidence = gather([], InstallTally(1, 10))
    assert set(evidence) == {
        INSTALL_FAILURES,
        FALLBACK_RATE,
        LATENCY_P95,
        ACCURACY_ESTIMATED,
        ACCURACY_LABELLED,
        CLASS_MIX,
    }
    assert evidence[INSTALL_FAILURES] == InstallTally(1, 10)
