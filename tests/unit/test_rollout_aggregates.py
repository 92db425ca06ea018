"""Hourly per-device window aggregates: folding a window, summing deltas and stored rows."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from fleet_server.rollouts.aggregates import (
    LATENCY_BUCKETS,
    LATENCY_FIRST,
    LATENCY_SCALE,
    AggregateDelta,
    HourRow,
    ShadowRow,
    add,
    combine,
    combine_all,
    decode_counts,
    encode_classes,
    encode_counts,
    fold,
    fold_shadow,
    hour_of,
    latency_cells,
    sum_rows,
    sum_shadow_rows,
)
from protocol.histogram import ExponentialHistogram, quantile, record
from protocol.inference import StageName
from protocol.summary import SCORE_BIN_COUNT, score_histogram
from protocol.window import WindowSummary
from protocol.window.model import ShadowSummary

T0 = 1_780_000_000.0  # a time well inside an hour: 2026-05-28 20:26:40 UTC
CLASSES = ["ok", "fault", "unknown"]


def window(
    device: str = "d1",
    *,
    end: float = T0,
    requests: int = 60,
    served: dict[StageName, int] | None = None,
    latencies: list[float] | None = None,
    seed: int = 0,
    version: str = "2.0.0",
) -> WindowSummary:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=requests)
    lat = record(ExponentialHistogram(), latencies if latencies is not None else [])
    return WindowSummary(
        window_id=f"w-{device}-{seed}-{end}",
        device_id=device,
        model_name="vibration",
        model_version=version,
        baseline_id="b1",
        start=end - 60,
        end=end,
        requests=requests,
        errors=1,
        served=served if served is not None else {"active": requests},
        features=[],
        scores=score_histogram(probs, CLASSES),
        latency_ms=lat,
    )


def row_of(d: AggregateDelta) -> HourRow:
    return HourRow(
        device_id=d.device_id,
        windows=d.windows,
        requests=d.requests,
        fallbacks=d.fallbacks,
        errors=d.errors,
        unsummarised_requests=d.unsummarised_requests,
        latency_zero=d.latency_zero,
        latency_sum=d.latency_sum,
        latency_min=d.latency_min,
        latency_max=d.latency_max,
        latency=encode_counts(d.latency),
        score_classes=encode_classes(d.score_classes),
        scores=encode_counts(d.scores),
        labelled_rows=d.labelled_rows,
        labelled_correct=d.labelled_correct,
    )


def test_a_window_counts_in_the_utc_hour_its_end_falls_in() -> None:
    delta = fold(window(end=T0))
    assert delta.hour == datetime(2026, 5, 28, 20, tzinfo=UTC)
    assert delta.key == ("d1", "vibration", "2.0.0", delta.hour)
    assert hour_of(3600.0 * 5) == datetime.fromtimestamp(3600.0 * 5, UTC)
    assert hour_of(3600.0 * 5 - 0.001) == datetime.fromtimestamp(3600.0 * 4, UTC)


def test_fallbacks_are_the_requests_another_stage_than_the_active_model_answered() -> None:
    delta = fold(window(requests=60, served={"active": 50, "previous": 6, "safe_default": 4}))
    assert (delta.windows, delta.requests, delta.fallbacks, delta.errors) == (1, 60, 10, 1)
    assert fold(window(requests=60, served={"active": 60})).fallbacks == 0
    assert fold(window(requests=5, served={})).fallbacks == 0


def test_the_score_histogram_is_kept_cell_for_cell() -> None:
    w = window(requests=200, seed=3)
    delta = fold(w)
    assert delta.score_classes == tuple(CLASSES)
    assert w.scores is not None
    for c, row in enumerate(w.scores.counts):
        for k, count in enumerate(row):
            assert delta.scores.get(c * SCORE_BIN_COUNT + k, 0) == count
    assert sum(delta.scores.values()) == 200


def test_folded_latency_keeps_p95_within_a_bucket() -> None:
    rng = np.random.default_rng(7)
    latencies = list(rng.lognormal(math.log(40.0), 0.3, size=600))
    delta = fold(window(requests=600, latencies=latencies))
    aggregates = sum_rows([row_of(delta)])
    p95 = quantile(aggregates.latency_histogram(0), 0.95)
    true = float(np.quantile(latencies, 0.95))
    assert p95 is not None
    assert abs(math.log(p95 / true)) < math.log(2 ** (2**-LATENCY_SCALE))
    assert aggregates.latency[0].sum() == 600
    assert aggregates.latency_min[0] == min(latencies)
    assert aggregates.latency_max[0] == max(latencies)


def test_latency_outside_the_fixed_range_lands_in_the_end_buckets() -> None:
    cells = latency_cells(record(ExponentialHistogram(), [0.001, 0.002, 1e7]))
    assert cells == {0: 2, LATENCY_BUCKETS - 1: 1}


def test_a_coarser_window_histogram_counts_in_the_middle_of_each_bucket() -> None:
    # Scale 0: bucket 5 holds (32, 64] ms; at scale 2 that is buckets 20..23, the middle 22.
    coarse = ExponentialHistogram(scale=0, offset=5, counts=[7], sum=300.0, min=33.0, max=60.0)
    assert latency_cells(coarse) == {22 - LATENCY_FIRST: 7}


def test_deltas_of_one_row_add_up() -> None:
    a = fold(window(seed=1, served={"active": 55, "cloud": 5}, latencies=[10.0, 20.0]))
    b = fold(window(seed=2, served={"active": 60}, latencies=[5.0, 400.0]))
    both = combine(a, b)
    assert (both.windows, both.requests, both.fallbacks, both.errors) == (2, 120, 5, 2)
    assert (both.latency_min, both.latency_max) == (5.0, 400.0)
    assert sum(both.latency.values()) == 4
    assert sum(both.scores.values()) == 120


def test_deltas_of_different_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="different rows"):
        combine(fold(window("d1")), fold(window("d2")))
    with pytest.raises(ValueError, match="different rows"):
        combine(fold(window(end=T0)), fold(window(end=T0 + 3600)))


def test_scores_over_other_classes_are_left_out_not_mixed() -> None:
    a = fold(window(seed=1))
    b = AggregateDelta(*a.key, windows=1, requests=3, score_classes=("x", "y"), scores={0: 3})
    both = combine(a, b)
    assert both.score_classes == tuple(CLASSES)
    assert both.scores == a.scores
    assert both.requests == a.requests + 3
    # A row without scores takes the other's.
    empty = AggregateDelta(*a.key, windows=1)
    assert combine(empty, a).scores == a.scores


def test_encoded_counts_concatenate_to_their_sum() -> None:
    a, b = {0: 3, 7: 1, 79: 2}, {7: 4, 12: 5}
    assert decode_counts(encode_counts(a)) == a
    assert decode_counts(encode_counts(a) + encode_counts(b)) == {0: 3, 7: 5, 12: 5, 79: 2}
    assert encode_counts({}) == b""


def test_summed_rows_equal_the_sum_of_their_windows_per_device() -> None:
    windows = [
        window(
            device,
            end=T0 + 3600 * h,
            seed=10 * i + h,
            served={"active": 50, "previous": i + h},
            latencies=[float(5 + i + h), float(100 + 10 * h)],
        )
        for i, device in enumerate(["d3", "d1", "d2"])
        for h in range(4)
    ]
    per_hour = combine_all(fold(w) for w in windows)
    aggregates = sum_rows([row_of(d) for d in per_hour.values()])
    assert aggregates.device_ids == ["d1", "d2", "d3"]
    assert aggregates.classes == tuple(CLASSES)
    for device, i in aggregates.index().items():
        mine = [w for w in windows if w.device_id == device]
        assert aggregates.windows[i] == 4
        assert aggregates.requests[i] == sum(w.requests for w in mine)
        assert aggregates.fallbacks[i] == sum(w.served.get("previous", 0) for w in mine)
        assert aggregates.errors[i] == 4
        assert aggregates.latency[i].sum() == 8
        assert aggregates.latency_min[i] == min(w.latency_ms.min or 0 for w in mine)
        assert aggregates.latency_sum[i] == pytest.approx(sum(w.latency_ms.sum for w in mine))
        expected = np.sum([np.asarray(w.scores.counts) for w in mine if w.scores], axis=0)
        assert (aggregates.scores[i] == expected).all()
        assert (aggregates.predicted[i] == expected.sum(axis=1)).all()
        histogram = aggregates.score_histogram(i)
        assert histogram is not None and histogram.counts == expected.tolist()


def test_rows_may_come_several_per_device_or_already_summed() -> None:
    deltas = [fold(window("d1", end=T0 + 3600 * h, seed=h, latencies=[3.0])) for h in range(3)]
    one_by_one = sum_rows([row_of(d) for d in deltas])
    total = combine_all(
        AggregateDelta(**{**d.__dict__, "hour": deltas[0].hour}) for d in deltas
    ).popitem()[1]
    summed = sum_rows([row_of(total)])
    assert (one_by_one.latency == summed.latency).all()
    assert (one_by_one.scores == summed.scores).all()
    assert one_by_one.requests.tolist() == summed.requests.tolist() == [180]


def test_no_rows_give_no_devices_and_an_empty_latency_is_empty() -> None:
    assert len(sum_rows([])) == 0
    delta = AggregateDelta("d1", "m", "1", hour_of(T0), windows=1, requests=0)
    aggregates = sum_rows([row_of(delta)])
    assert aggregates.classes is None and aggregates.score_histogram(0) is None
    assert aggregates.latency_histogram(0).count == 0
    assert quantile(aggregates.latency_histogram(0), 0.95) is None


def test_kept_hours_plus_the_hours_read_now_equal_reading_them_all() -> None:
    deltas = [
        fold(window(device, end=T0 + 3600 * h, seed=h, latencies=[3.0 + h, 50.0 * (h + 1)]))
        for device in ("d1", "d2", "d3")
        for h in range(3)
    ]
    everything = sum_rows([row_of(d) for d in deltas])
    split = hour_of(T0 + 3600)
    early = [d for d in deltas if d.hour < split or d.device_id == "d2"]
    kept = sum_rows([row_of(d) for d in early])
    now = sum_rows([row_of(d) for d in deltas if d not in early])
    added = add(kept, now)
    assert added.device_ids == everything.device_ids
    for name in ("windows", "requests", "fallbacks", "latency", "scores", "latency_sum"):
        assert np.array_equal(getattr(added, name), getattr(everything, name)), name
    assert np.array_equal(added.latency_min, everything.latency_min)
    assert np.array_equal(added.latency_max, everything.latency_max)
    # The other way round: the hours read now lack a device the kept ones have.
    swapped = add(now, kept)
    assert swapped.device_ids == everything.device_ids
    for name in ("windows", "requests", "fallbacks", "latency", "scores"):
        assert np.array_equal(getattr(swapped, name), getattr(everything, name)), name
    # A device only one side has keeps its own values.
    only_new = add(sum_rows([]), now)
    assert only_new.device_ids == ["d1", "d3"] and only_new.classes == tuple(CLASSES)


def _shadowed(device: str, seed: int, agreements: int, errors: int) -> WindowSummary:
    rng = np.random.default_rng(seed)
    shadow = ShadowSummary(
        bundle_id="sha256:" + "ab" * 32,
        model_version="3.0.0",
        requests=30,
        agreements=agreements,
        errors=errors,
        latency_ms=record(ExponentialHistogram(), list(rng.lognormal(3.0, 0.2, size=30))),
    )
    return window(device, seed=seed, latencies=[10.0] * 60).model_copy(update={"shadow": shadow})


def test_a_shadow_section_counts_in_the_row_of_the_shadows_version_only() -> None:
    w = _shadowed("d1", 1, agreements=27, errors=2)
    active, shadow = fold(w), fold_shadow(w)
    assert fold_shadow(window("d1")) is None
    assert shadow is not None
    assert shadow.key == ("d1", "vibration", "3.0.0", hour_of(T0))
    assert (shadow.windows, shadow.requests, shadow.errors) == (0, 0, 0)
    assert (shadow.shadow_requests, shadow.shadow_agreements, shadow.shadow_errors) == (30, 27, 2)
    assert sum(shadow.shadow_latency.values()) == 30
    # The active model's numbers stay in its own row, without the shadow's.
    assert active.model_version == "2.0.0" and active.shadow_requests == 0
    both = combine(shadow, fold_shadow(_shadowed("d1", 2, agreements=30, errors=0)))  # type: ignore[arg-type]
    assert (both.shadow_requests, both.shadow_agreements, both.shadow_errors) == (60, 57, 2)
    assert sum(both.shadow_latency.values()) == 60


def test_shadow_rows_sum_per_device_and_keep_p95_within_a_bucket() -> None:
    deltas = [
        fold_shadow(_shadowed(d, k, agreements=28, errors=1)) for d in ("a", "b") for k in range(3)
    ]
    rows = [
        ShadowRow(d.device_id, d.shadow_requests, d.shadow_agreements, d.shadow_errors,
                  encode_counts(d.shadow_latency))
        for d in deltas if d is not None
    ] + [ShadowRow("c", 0, 0, 0, None)]  # fmt: skip
    sums = sum_shadow_rows(rows)
    assert sums.device_ids == ["a", "b"]  # a row without shadow requests counts for no device
    assert sums.requests.tolist() == [90, 90] and sums.agreements.tolist() == [84, 84]
    assert sums.errors.tolist() == [3, 3]
    exact = quantile(
        record(
            ExponentialHistogram(),
            [x for k in range(3) for x in np.random.default_rng(k).lognormal(3.0, 0.2, size=30)],
        ),
        0.95,
    )
    p95 = quantile(sums.latency_histogram(0), 0.95)
    assert exact is not None and p95 is not None
    assert abs(math.log(p95 / exact)) < math.log(2) / 2**LATENCY_SCALE + 1e-9
