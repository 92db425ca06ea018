"""Window summaries on the device: the recorder against summarize() on the same rows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.telemetry import WindowPolicy, WindowRecorder, WindowRecordError
from model_runtime import LoadedModel, default_runtime
from protocol.bundle import read_bundle
from protocol.derivation import InputDerivation, derive_features
from protocol.drift.bins import g_statistic
from protocol.drift.distributions import chi2_quantile
from protocol.histogram import ExponentialHistogram, record
from protocol.inference import StageName
from protocol.manifest import Manifest
from protocol.summary import FeatureSummary, edges_id, quantile_edges, score_histogram, summarize
from protocol.window import WindowSummary, decode_window, encode_window, merge_windows
from testbed.images import MODELS

BASELINE = np.load(MODELS / "baseline.npy")
T0 = 1_700_000_000.0
# Every request summarised: what summarize() over the same rows gives.
EXACT = WindowPolicy(max_overhead=None)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def manifest(bundles: dict[str, Path]) -> Manifest:
    with bundles["v2"].open("rb") as f:
        return read_bundle(f)[0]


@pytest.fixture(scope="module")
def v2() -> LoadedModel:
    return default_runtime().load(MODELS / "v2.tflite")


@pytest.fixture(scope="module")
def scores(v2: LoadedModel) -> npt.NDArray[np.float32]:
    """v2's real class probabilities for every baseline row."""
    return np.asarray(v2.run({"features": BASELINE})["scores"])


def edges_of(m: Manifest) -> list[list[float]]:
    return [b.edges for b in m.baseline.features]


def ranges_of(m: Manifest) -> list[tuple[float | None, float | None]]:
    return [(f.valid_min, f.valid_max) for f in m.features]


def baseline_ranges_of(m: Manifest) -> list[tuple[float | None, float | None]]:
    return [(b.summary.min, b.summary.max) for b in m.baseline.features]


def batches(sizes: list[int], start: int = 0) -> Iterator[slice]:
    for size in sizes:
        yield slice(start, start + size)
        start += size


def recorded(
    m: Manifest,
    rows: npt.NDArray[Any],
    scores: npt.NDArray[Any],
    sizes: list[int],
    policy: WindowPolicy | None = None,
    latencies: npt.NDArray[np.float64] | None = None,
) -> WindowSummary:
    """One window over ``rows``, recorded as requests of ``sizes`` rows."""
    clock = FakeClock()
    recorder = WindowRecorder(
        m, "pump-0042", policy or WindowPolicy(max_overhead=None, max_requests=10**6), clock=clock
    )
    for i, part in enumerate(batches(sizes)):
        latency = 0.002 if latencies is None else float(latencies[i])
        recorder.record({"features": rows[part]}, {"scores": scores[part]}, "active", latency)
    clock.now += 30.0
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    return window


def assert_same_features(got: list[FeatureSummary], expected: list[FeatureSummary]) -> None:
    assert len(got) == len(expected)
    for j, (g, e) in enumerate(zip(got, expected, strict=True)):
        exact = (g.n, g.nan, g.out_of_range, g.min, g.max, g.counts)
        assert exact == (e.n, e.nan, e.out_of_range, e.min, e.max, e.counts), f"feature {j}"
        if e.below_baseline is not None:  # summarize() counted against the baseline
            beyond = (g.below_baseline, g.above_baseline)
            assert beyond == (e.below_baseline, e.above_baseline), f"feature {j} beyond"
        assert g.mean == pytest.approx(e.mean, rel=1e-12, abs=1e-12), f"feature {j} mean"
        assert g.m2 == pytest.approx(e.m2, rel=1e-9, abs=1e-9), f"feature {j} m2"


# -- the summary equals summarize() over the same rows ---------------------------


def test_window_equals_summarize_over_the_same_rows(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    # Requests of 1-7 rows, and two larger than the 64-row buffer.
    rng = np.random.default_rng(11)
    sizes = [*rng.integers(1, 8, 400).tolist(), 150, *rng.integers(1, 8, 100).tolist(), 700]
    rows = int(sum(sizes))
    latencies = rng.lognormal(-6.0, 0.7, len(sizes))
    window = recorded(
        manifest,
        BASELINE[:rows],
        scores[:rows],
        sizes,
        WindowPolicy(max_overhead=None, max_requests=10**6, buffer_rows=64),
        latencies,
    )
    assert_same_features(
        window.features,
        summarize(
            BASELINE[:rows], edges_of(manifest), ranges_of(manifest), baseline_ranges_of(manifest)
        ),
    )
    assert window.scores == score_histogram(scores[:rows], manifest.classes or [])
    assert window.latency_ms == record(ExponentialHistogram(), latencies * 1000.0)
    assert (window.requests, window.served, window.errors) == (
        len(sizes),
        {"active": len(sizes)},
        0,
    )
    assert (window.model_name, window.model_version) == (manifest.name, manifest.version)
    assert window.baseline_id == manifest.baseline.id == edges_id(edges_of(manifest))
    assert (window.device_id, window.start, window.end) == ("pump-0042", T0, T0 + 30.0)
    assert len(window.window_id) == 32 and int(window.window_id, 16) >= 0


def test_many_small_requests_equal_one_big_batch(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    one = recorded(manifest, BASELINE[:2000], scores[:2000], [2000])
    many = recorded(manifest, BASELINE[:2000], scores[:2000], [1] * 2000)
    assert_same_features(many.features, one.features)
    assert many.scores == one.scores
    assert many.requests == 2000 and one.requests == 1


def test_buffer_size_does_not_change_the_summary(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    sizes = [3] * 333
    windows = [
        recorded(
            manifest,
            BASELINE,
            scores,
            sizes,
            WindowPolicy(max_overhead=None, max_requests=10**6, buffer_rows=b),
        )
        for b in (1, 7, 64, 4096)
    ]
    for w in windows[1:]:
        assert_same_features(w.features, windows[0].features)
        assert w.scores == windows[0].scores


def test_out_of_range_values_are_counted_against_the_valid_range(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    rows = BASELINE[:300].copy()
    rows[::7, 2] = -55.0  # ambient temperature below its valid minimum
    rows[::11, 0] = 7000.0  # shaft speed above its valid maximum
    window = recorded(manifest, rows, scores[:300], [5] * 60)
    expected = summarize(rows, edges_of(manifest), ranges_of(manifest))
    assert_same_features(window.features, expected)
    assert window.features[2].out_of_range == len(range(0, 300, 7))
    assert window.features[0].out_of_range == len(range(0, 300, 11))


def test_nan_inputs_are_counted_in_nan_and_in_no_bin(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    # Validation refuses NaN before a model runs; the recorder still counts it right.
    rows = BASELINE[:400].copy()
    rows[::5, 3] = np.nan
    rows[1::9, 4] = np.inf
    rows[7, :] = np.nan
    window = recorded(manifest, rows, scores[:400], [4] * 50 + [200])
    expected = summarize(rows, edges_of(manifest), ranges_of(manifest))
    assert_same_features(window.features, expected)
    assert window.features[3].nan == len(range(0, 400, 5)) + 1
    assert window.features[4].nan == len(set(range(1, 400, 9)) | {7})
    assert sum(window.features[3].counts) == window.features[3].n == 400 - window.features[3].nan


def test_nan_scores_are_errors_and_stay_out_of_the_score_histogram(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    bad = scores[:100].copy()
    bad[[2, 3, 50], 1] = np.nan  # rows 2 and 3 are one request, row 50 another
    window = recorded(manifest, BASELINE[:100], bad, [2] * 50)
    assert window.errors == 2
    finite = np.isfinite(bad).all(axis=1)
    assert window.scores == score_histogram(bad[finite], manifest.classes or [])
    assert window.features[0].n == 100  # the inputs still count


# -- who answered ------------------------------------------------------------------


def test_only_the_windows_own_model_is_scored(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=FakeClock())
    x, s = BASELINE[:2], scores[:2]
    recorder.record({"features": x}, {"scores": s}, "active", 0.001)
    recorder.record({"features": x}, {"scores": s}, "active", 0.001, model_version="2.0.0")
    recorder.record({"features": x}, {"scores": s}, "previous", 0.001, model_version="1.0.0")
    recorder.record({"features": x}, {"scores": s}, "cloud", 0.02, model_version="2.0.0")
    recorder.record({"features": x}, {"scores": s}, "safe_default", 0.0)
    recorder.record({"features": x}, {"scores": s}, "active", 0.001, error=True)
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    assert window.served == {"active": 3, "previous": 1, "cloud": 1, "safe_default": 1}
    assert window.errors == 1
    assert window.scores == score_histogram(np.concatenate([s, s]), manifest.classes or [])
    assert window.features[0].n == 12
    assert window.latency_ms.count == 6 and window.latency_ms.zero_count == 1


def test_requests_without_an_answer_count_as_errors(manifest: Manifest) -> None:
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=FakeClock())
    recorder.record_error(0.0005)
    recorder.record_error()
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    assert (window.requests, window.errors, window.served) == (2, 2, {})
    assert window.latency_ms.count == 1
    assert all(f.n == 0 and f.min is None for f in window.features)


def test_an_empty_batch_is_a_request_without_rows(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=FakeClock())
    recorder.record({"features": BASELINE[:0]}, {"scores": scores[:0]}, "active", 0.001)
    recorder.record({"features": BASELINE[:2]}, {"scores": scores[:2]}, "active", 0.001)
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    assert (window.requests, window.features[0].n) == (2, 2)
    assert window.scores == score_histogram(scores[:2], manifest.classes or [])


def test_quantized_scores_are_summarised_as_the_probabilities_they_stand_for(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    data = manifest.model_dump()
    data["outputs"] = [
        {
            "name": "scores",
            "dtype": "uint8",
            "shape": [1, 4],
            "shape_signature": [-1, 4],
            "quantization": (1 / 256, 0),
        }
    ]
    quantized_manifest = Manifest.model_validate(data)
    quantized = np.clip(np.round(scores[:500] * 256), 0, 255).astype(np.uint8)
    window = recorded(quantized_manifest, BASELINE[:500], quantized, [5] * 100)
    expected = score_histogram(quantized.astype(np.float64) / 256, manifest.classes or [])
    assert window.scores == expected


def test_a_request_that_breaks_the_manifest_is_refused_and_changes_nothing(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=FakeClock())
    good = {"features": BASELINE[:3]}
    recorder.record(good, {"scores": scores[:3]}, "active", 0.001)
    refused: list[tuple[dict[str, Any], dict[str, Any], Any, float]] = [
        ({"other": BASELINE[:3]}, {"scores": scores[:3]}, "active", 0.001),
        ({"features": BASELINE[:3, :15]}, {"scores": scores[:3]}, "active", 0.001),
        ({"features": BASELINE[0]}, {"scores": scores[:1]}, "active", 0.001),
        (good, {"scores": scores[:2]}, "active", 0.001),
        (good, {}, "active", 0.001),
        (good, {"scores": scores[:3]}, "somewhere", 0.001),
        (good, {"scores": scores[:3]}, "active", -1.0),
        (good, {"scores": scores[:3]}, "active", float("nan")),
    ]
    for inputs, outputs, stage, latency in refused:
        with pytest.raises(WindowRecordError):
            recorder.record(inputs, outputs, stage, latency)
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    assert window.requests == 1 and window.features[0].n == 3
    assert_same_features(
        window.features, summarize(BASELINE[:3], edges_of(manifest), ranges_of(manifest))
    )


def test_nothing_is_recorded_before_a_model_is_installed() -> None:
    recorder = WindowRecorder(None, "pump-0042", EXACT, clock=FakeClock())
    with pytest.raises(WindowRecordError, match="no model"):
        recorder.record({"features": BASELINE[:1]}, {}, "active", 0.001)
    recorder.record_error(0.001)
    recorder.close_window()
    assert recorder.poll() is None


# -- when windows close --------------------------------------------------------------


def test_windows_close_by_count_exactly(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    clock = FakeClock()
    recorder = WindowRecorder(
        manifest, "pump-0042", WindowPolicy(max_overhead=None, max_requests=100), clock=clock
    )
    for i in range(250):
        clock.now = T0 + i
        recorder.record(
            {"features": BASELINE[i : i + 1]}, {"scores": scores[i : i + 1]}, "active", 0.001
        )
    windows = []
    while (w := recorder.poll(T0 + 250)) is not None:
        windows.append(w)
    assert [w.requests for w in windows] == [100, 100]
    assert [(w.start, w.end) for w in windows] == [(T0, T0 + 99), (T0 + 100, T0 + 199)]
    assert recorder.requests == 50
    assert len({w.window_id for w in windows}) == 2
    # The two windows hold exactly the first 200 rows between them.
    merged = merge_windows(windows)
    assert_same_features(
        merged.features, summarize(BASELINE[:200], edges_of(manifest), ranges_of(manifest))
    )


def test_windows_close_by_time_and_an_empty_window_never_closes(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    clock = FakeClock()
    policy = WindowPolicy(max_overhead=None, max_requests=10**6, max_seconds=60.0)
    recorder = WindowRecorder(manifest, "pump-0042", policy, clock=clock)
    assert recorder.poll() is None
    clock.now += 600.0
    assert recorder.poll() is None  # idle: nothing to say
    opened = clock.now
    recorder.record({"features": BASELINE[:2]}, {"scores": scores[:2]}, "active", 0.001)
    clock.now += 59.9
    assert recorder.poll() is None
    recorder.record({"features": BASELINE[2:4]}, {"scores": scores[2:4]}, "active", 0.001)
    clock.now = opened + 60.0
    window = recorder.poll()
    assert window is not None
    assert (window.start, window.end, window.requests) == (opened, opened + 60.0, 2)
    assert recorder.poll() is None
    clock.now += 3600.0
    assert recorder.poll() is None


def test_a_new_model_version_closes_the_window_first(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    clock = FakeClock()
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=clock)
    recorder.record({"features": BASELINE[:5]}, {"scores": scores[:5]}, "active", 0.001)
    # The same version again (a reloaded manifest) keeps the window open.
    recorder.set_manifest(manifest.model_copy())
    assert recorder.poll() is None and recorder.requests == 1
    clock.now += 10.0
    recorder.set_manifest(manifest.model_copy(update={"version": "2.1.0"}))
    recorder.record({"features": BASELINE[5:8]}, {"scores": scores[5:8]}, "active", 0.001)
    old = recorder.poll()
    assert old is not None and recorder.poll() is None
    assert (old.model_version, old.requests, old.features[0].n, old.end) == (
        "2.0.0",
        1,
        5,
        T0 + 10.0,
    )
    recorder.close_window()
    new = recorder.poll()
    assert new is not None
    assert (new.model_version, new.requests, new.features[0].n) == ("2.1.0", 1, 3)


def test_a_new_cohort_closes_the_window_and_labels_the_next(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = WindowRecorder(manifest, "pump-0042", EXACT, clock=FakeClock())
    recorder.record({"features": BASELINE[:1]}, {"scores": scores[:1]}, "active", 0.001)
    recorder.set_cohort("canary", "plan-7")
    recorder.record({"features": BASELINE[1:2]}, {"scores": scores[1:2]}, "active", 0.001)
    recorder.close_window()
    first, second = recorder.poll(), recorder.poll()
    assert first is not None and second is not None
    assert (first.cohort_id, first.plan_id) == (None, None)
    assert (second.cohort_id, second.plan_id) == ("canary", "plan-7")


def test_uncollected_windows_are_dropped_oldest_first_and_counted(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    from agent.telemetry.window import MAX_CLOSED_WINDOWS

    clock = FakeClock()
    recorder = WindowRecorder(
        manifest, "pump-0042", WindowPolicy(max_overhead=None, max_requests=1), clock=clock
    )
    for i in range(MAX_CLOSED_WINDOWS + 3):
        clock.now = T0 + i
        recorder.record(
            {"features": BASELINE[i : i + 1]}, {"scores": scores[i : i + 1]}, "active", 0.001
        )
    assert recorder.dropped_windows == 3
    first = recorder.poll()
    assert first is not None and first.start == T0 + 3


# -- the wire ------------------------------------------------------------------------


def test_a_closed_window_round_trips_through_the_codec(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    rng = np.random.default_rng(5)
    window = recorded(
        manifest, BASELINE[:600], scores[:600], [1] * 600, latencies=rng.lognormal(-6, 0.5, 600)
    )
    data = encode_window(window)
    back = decode_window(data)
    assert back.window_id == window.window_id
    assert back.model_dump(exclude={"features"}) == window.model_dump(exclude={"features"})
    for b, w in zip(back.features, window.features, strict=True):
        assert (b.n, b.nan, b.out_of_range, b.min, b.max, b.counts) == (
            w.n,
            w.nan,
            w.out_of_range,
            w.min,
            w.max,
            w.counts,
        )
        assert b.mean == pytest.approx(w.mean, rel=1e-6)
    assert len(data) < 1500  # 16 features, 600 requests


# -- values beyond the baseline's range -------------------------------------------------


def test_values_beyond_the_baselines_range_are_counted_per_side(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    low = np.array([b.summary.min for b in manifest.baseline.features])
    high = np.array([b.summary.max for b in manifest.baseline.features])
    rows = BASELINE[:500].copy()
    rows[::13, 1] = high[1] + 1.0  # a new value above the training maximum
    rows[::29, 1] = low[1] - 0.5  # and one below its minimum
    rows[3::17, 5] = high[5] + np.arange(len(range(3, 500, 17)))  # the max, then new values
    rows[::41, 5] = np.nan  # with NaN and infinities, which are no values
    rows[5::61, 5] = np.inf
    rows[9::61, 5] = -np.inf
    rows[100:150, 0] = high[0]  # the maximum itself is not beyond it
    # Folds of 64 rows, requests larger than the buffer, and single rows.
    sizes = [1] * 100 + [150] + [3] * 50 + [100]
    window = recorded(
        manifest,
        rows,
        scores[:500],
        sizes,
        WindowPolicy(max_overhead=None, max_requests=10**6, buffer_rows=64),
    )
    expected = summarize(
        rows, edges_of(manifest), ranges_of(manifest), baseline_ranges_of(manifest)
    )
    assert_same_features(window.features, expected)
    finite = np.where(np.isfinite(rows), rows, np.nan)
    with np.errstate(invalid="ignore"):
        below = (finite < low).sum(axis=0).tolist()
        above = (finite > high).sum(axis=0).tolist()
    got = [(f.below_baseline, f.above_baseline) for f in window.features]
    assert got == list(zip(below, above, strict=True))
    beyond_1 = set(range(0, 500, 13)) | set(range(0, 500, 29))
    assert got[1] == (len(range(0, 500, 29)), len(beyond_1) - len(range(0, 500, 29)))
    new_5 = set(range(20, 500, 17)) - set(range(0, 500, 41)) - set(range(5, 500, 61))
    assert got[5] == (0, len(new_5 - set(range(9, 500, 61))))
    assert got[0] == (0, 0)
    # The window carries them in codec version 3; one with nothing beyond keeps version 1.
    data = encode_window(window)
    assert data[3] == 3
    back = decode_window(data)
    assert [(f.below_baseline, f.above_baseline) for f in back.features] == got
    quiet = recorded(manifest, BASELINE[:200], scores[:200], [4] * 50)
    assert all((f.below_baseline, f.above_baseline) == (0, 0) for f in quiet.features)
    assert encode_window(quiet)[3] == 1


# -- large inputs are summarised through derived features -----------------------------


def test_large_inputs_are_summarised_through_derived_features(manifest: Manifest) -> None:
    rng = np.random.default_rng(8)
    images = rng.normal(0.5, 0.2, (300, 12, 12, 3)).astype(np.float32)
    derivations = [InputDerivation(input="image", method="channel_moments")]
    derived = derive_features(derivations, {"image": images})
    edges = [quantile_edges(derived[:, j]) for j in range(derived.shape[1])]
    image = {
        "name": "image",
        "dtype": "float32",
        "shape": [1, 12, 12, 3],
        "shape_signature": [-1, 12, 12, 3],
    }
    data = manifest.model_dump()
    data.update(
        inputs=[image],
        derivations=[d.model_dump() for d in derivations],
        features=[{"name": f"image.c{c}_{s}"} for c in range(3) for s in ("mean", "std")],
        baseline={
            "id": edges_id(edges),
            "rows": 300,
            "features": [
                {"edges": e, "summary": s.model_dump()}
                for e, s in zip(edges, summarize(derived, edges), strict=True)
            ],
        },
        fallback={"safe_default": {"scores": [1, 0, 0, 0]}},
    )
    m = Manifest.model_validate(data)
    # A 4 kB buffer holds two of these images: the buffer shrinks, results do not.
    policy = WindowPolicy(
        max_overhead=None, max_requests=10**6, buffer_rows=64, max_buffer_bytes=4096
    )
    recorder = WindowRecorder(m, "cam-1", policy, clock=FakeClock())
    for part in batches([1, 2, 3, 1, 5] * 25):
        recorder.record({"image": images[part]}, {}, "active", 0.001)
    recorder.close_window()
    window = recorder.poll()
    assert window is not None and window.scores is None
    assert_same_features(window.features, summarize(derived, edges))


# -- bounded overhead: a random sample of the requests is summarised ------------------


class Stopwatch:
    """A fake ``timer``: every reading is ``step`` seconds after the one before.

    Whatever the recorder times between two readings (a summarised request,
    a fold, the loop that times its fast path) therefore takes ``step`` seconds.
    """

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


SUMMARY_COST = 100e-6  # seconds the fake timer says summarising a request takes


def sampling_recorder(
    m: Manifest,
    *,
    max_requests: int = 10**6,
    seed: int = 1,
    timer: Stopwatch | None = None,
    clock: FakeClock | None = None,
) -> WindowRecorder:
    """A recorder held to 20 % of inference, summaries costing ``SUMMARY_COST`` unless told."""
    policy = WindowPolicy(max_requests=max_requests, buffer_rows=16, max_overhead=0.2)
    return WindowRecorder(
        m,
        "pump-0042",
        policy,
        clock=clock or FakeClock(),
        timer=timer or Stopwatch(SUMMARY_COST),
        seed=seed,
    )


def single_rows(
    recorder: WindowRecorder,
    scores: npt.NDArray[np.float32],
    latency: float,
    requests: int,
) -> None:
    """``requests`` single-row requests of baseline rows, each answered in ``latency`` s."""
    for i in range(requests):
        row = i % BASELINE.shape[0]
        recorder.record(
            {"features": BASELINE[row : row + 1]},
            {"scores": scores[row : row + 1]},
            "active",
            latency,
        )


def closed(recorder: WindowRecorder) -> WindowSummary:
    recorder.close_window()
    window = recorder.poll()
    assert window is not None
    return window


def test_the_share_summarised_follows_the_cost_of_summarising_next_to_inference(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    timer = Stopwatch(SUMMARY_COST)
    recorder = sampling_recorder(manifest, timer=timer)
    assert recorder.sample_rate == 1.0
    # A model of 1 ms: summarising (0.1 ms) is within 20 % of it, every request is summarised.
    single_rows(recorder, scores, 1e-3, 2000)
    assert recorder.sample_rate == 1.0
    assert closed(recorder).unsummarised_requests == 0
    # A model of 0.1 ms: 20 % of it is 20 µs, a fifth of a summary (less the counting).
    single_rows(recorder, scores, 100e-6, 20_000)
    assert recorder.sample_rate == pytest.approx(0.2 * 100e-6 / SUMMARY_COST, rel=0.05)
    window = closed(recorder)
    single_rows(recorder, scores, 100e-6, 20_000)
    steady = closed(recorder)
    share = steady.summarised_requests / steady.requests
    assert steady.requests == 20_000
    assert share == pytest.approx(recorder.sample_rate, abs=4 * (0.2 * 0.8 / 20_000) ** 0.5)
    assert window.summarised_requests < window.requests == 20_000
    # Cheaper summaries (a faster machine): a larger share.
    timer.step = SUMMARY_COST / 2
    single_rows(recorder, scores, 100e-6, 20_000)
    assert recorder.sample_rate == pytest.approx(0.2 * 100e-6 / (SUMMARY_COST / 2), rel=0.05)
    # A slow model again: back to every request.
    single_rows(recorder, scores, 2e-3, 2000)
    assert recorder.sample_rate == 1.0
    closed(recorder)
    single_rows(recorder, scores, 2e-3, 500)
    assert closed(recorder).unsummarised_requests == 0


def test_the_last_fold_of_a_window_counts_only_when_requests_filled_it(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    # Windows of 10 requests: filled by busy traffic, or closed by time for quiet traffic.
    busy = sampling_recorder(manifest, max_requests=10)
    clock = FakeClock()
    quiet = sampling_recorder(manifest, clock=clock)
    for _ in range(300):
        single_rows(busy, scores, 100e-6, 10)
        single_rows(quiet, scores, 100e-6, 10)
        clock.now += 60.0
        while busy.poll() is not None or quiet.poll() is not None:
            pass
    assert quiet.sample_rate == pytest.approx(0.2 * 100e-6 / SUMMARY_COST, rel=0.05)
    # A busy window's last fold is a cost of its requests: a smaller share fits the budget.
    assert busy.sample_rate < 0.75 * quiet.sample_rate


def test_counting_alone_over_the_budget_keeps_a_minimum_sample(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    from agent.telemetry.budget import MIN_SAMPLE_RATE

    # The fake fast path costs 1e-3 / 256 s, above 20 % of a 1 µs model.
    recorder = sampling_recorder(manifest, timer=Stopwatch(1e-3))
    single_rows(recorder, scores, 1e-6, 5000)
    assert recorder.sample_rate == MIN_SAMPLE_RATE


def test_every_request_is_counted_when_few_are_summarised(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    clock = FakeClock()
    recorder = sampling_recorder(manifest, max_requests=1000, clock=clock)
    stages: list[StageName] = ["active", "active", "active", "previous", "cloud", "safe_default"]
    rng = np.random.default_rng(3)
    latencies = rng.lognormal(np.log(50e-6), 0.3, 4500)
    errors = rng.random(4500) < 0.05
    unanswered = 0
    for i in range(4500):
        clock.now = T0 + i * 0.01
        if i % 97 == 0:
            recorder.record_error(float(latencies[i]))
            unanswered += 1
            continue
        rows = slice(2 * i % 4998, 2 * i % 4998 + 2)
        recorder.record(
            {"features": BASELINE[rows]},
            {"scores": scores[rows]},
            stages[i % len(stages)],
            float(latencies[i]),
            error=bool(errors[i]),
        )
    assert recorder.sample_rate < 0.25
    assert recorder.requests == 500
    windows = []
    while (w := recorder.poll()) is not None:
        windows.append(w)
    windows.append(closed(recorder))
    assert [w.requests for w in windows] == [1000, 1000, 1000, 1000, 500]
    assert [w.start for w in windows] == [T0 + 10.0 * k for k in range(5)]
    merged = merge_windows(windows)
    answered = [i for i in range(4500) if i % 97]
    assert merged.requests == 4500
    assert merged.errors == unanswered + int(errors[answered].sum())
    assert merged.served == {
        s: sum(1 for i in answered if stages[i % len(stages)] == s) for s in set(stages)
    }
    assert merged.latency_ms == record(ExponentialHistogram(), latencies * 1000.0)
    # What the window summarised, it says: two rows for each answer summarised
    # (unanswered requests have no rows and count as summarised).
    assert 0 < merged.summarised_requests - unanswered < 0.3 * len(answered)
    assert merged.features[0].n == 2 * (merged.summarised_requests - unanswered)
    assert merged.unsummarised_requests == sum(w.unsummarised_requests for w in windows)
    for w in windows:
        assert all(f.n == w.features[0].n for f in w.features)
    assert merged.scores is not None
    scored = sum(map(sum, merged.scores.counts))
    assert 0 < scored < merged.features[0].n  # only the own model's good answers


def test_a_long_sampled_window_keeps_every_latency(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    from agent.telemetry.window import LATENCY_BUFFER

    recorder = sampling_recorder(manifest)
    latencies = np.random.default_rng(4).lognormal(np.log(100e-6), 0.5, 3 * LATENCY_BUFFER)
    for i, latency in enumerate(latencies):
        recorder.record(
            {"features": BASELINE[i % 5000 : i % 5000 + 1]},
            {"scores": scores[i % 5000 : i % 5000 + 1]},
            "active",
            float(latency),
        )
    window = closed(recorder)
    assert window.requests == latencies.size and window.unsummarised_requests > 0
    expected = record(ExponentialHistogram(), latencies * 1000.0)
    assert window.latency_ms.model_dump(exclude={"sum"}) == expected.model_dump(exclude={"sum"})
    assert window.latency_ms.sum == pytest.approx(expected.sum, rel=1e-12)


def test_a_sampled_window_is_an_unbiased_sample_of_the_rows(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = sampling_recorder(manifest, seed=7)
    single_rows(recorder, scores, 100e-6, 2000)  # until the rate has settled
    closed(recorder)
    rows = BASELINE.shape[0]
    single_rows(recorder, scores, 100e-6, rows)
    window = closed(recorder)
    n = window.features[0].n
    assert (
        n == window.summarised_requests == pytest.approx(0.2 * rows, abs=6 * (rows * 0.16) ** 0.5)
    )
    everything = summarize(BASELINE, edges_of(manifest), ranges_of(manifest))

    def homogeneous(chosen: list[int], all_counts: list[int]) -> bool:
        """The chosen rows' bin counts and the others' could come from one distribution."""
        rest = np.subtract(all_counts, chosen)
        g, df = g_statistic(chosen, rest)
        return g < chi2_quantile(0.999, df)

    for j, (got, full) in enumerate(zip(window.features, everything, strict=True)):
        assert homogeneous(got.counts, full.counts), f"feature {j}"
    assert window.scores is not None
    full_scores = score_histogram(scores, manifest.classes or [])
    flat = [c for row in window.scores.counts for c in row]
    assert homogeneous(flat, [c for row in full_scores.counts for c in row])
    # The check has the power to see a sample chosen by value: as many rows, the larger ones.
    by_value = np.sort(BASELINE[:, 0])[-n:]
    chosen = summarize(by_value[:, None], edges_of(manifest)[:1])[0].counts
    assert not homogeneous(chosen, everything[0].counts)


def test_the_same_seed_summarises_the_same_requests(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    windows = []
    for seed in (5, 5, 6):
        recorder = sampling_recorder(manifest, seed=seed)
        single_rows(recorder, scores, 100e-6, 3000)
        windows.append(closed(recorder))
    same, again, other = (w.model_dump(exclude={"window_id"}) for w in windows)
    assert same == again
    assert other != same


def test_without_max_overhead_every_request_is_summarised_however_costly(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    policy = WindowPolicy(max_requests=10**6, buffer_rows=16, max_overhead=None)
    timer = Stopwatch(1.0)  # a second per summary, for a model of a microsecond
    recorder = WindowRecorder(manifest, "pump-0042", policy, clock=FakeClock(), timer=timer)
    single_rows(recorder, scores, 1e-6, 3000)
    assert recorder.sample_rate == 1.0
    window = closed(recorder)
    assert window.unsummarised_requests == 0
    expected = summarize(BASELINE[:3000], edges_of(manifest), ranges_of(manifest))
    assert_same_features(window.features, expected)
    assert timer.now == 0.0  # nothing timed


def test_a_new_model_is_summarised_in_full_until_its_costs_are_measured(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = sampling_recorder(manifest)
    single_rows(recorder, scores, 100e-6, 3000)
    assert recorder.sample_rate < 0.5
    recorder.set_manifest(manifest.model_copy(update={"version": "2.1.0"}))
    assert recorder.sample_rate == 1.0
    old = recorder.poll()
    assert old is not None and old.model_version == "2.0.0" and old.requests == 3000


def test_a_request_left_out_is_still_refused_for_its_stage_or_latency(
    manifest: Manifest, scores: npt.NDArray[np.float32]
) -> None:
    recorder = sampling_recorder(manifest)
    single_rows(recorder, scores, 100e-6, 3000)
    before = recorder.requests
    refused: list[tuple[Any, float]] = [("somewhere", 1e-4), ("active", -1.0), ("active", math.nan)]
    for _ in range(50):  # the fast path and the full one both refuse them
        for stage, latency in refused:
            with pytest.raises(WindowRecordError):
                recorder.record({"features": BASELINE[:1]}, {"scores": scores[:1]}, stage, latency)
    assert recorder.requests == before
    assert closed(recorder).requests == before
