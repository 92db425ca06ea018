"""Window summaries: latency histograms, merging windows, and the compact wire codec."""

from __future__ import annotations

import contextlib
import lzma
import math
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from firmware_images.datagen import CLASSES, FEATURES, generate
from protocol.histogram import (
    MAX_SCALE,
    ExponentialHistogram,
    downscale,
    merge_histograms,
    quantile,
    record,
)
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary, merge_hybrid
from protocol.summary import (
    FeatureSummary,
    edges_id,
    quantile_edges,
    score_histogram,
    summarize,
)
from protocol.window import (
    WINDOW_CODEC_VERSION,
    WINDOW_MAGIC,
    ShadowSummary,
    WindowAggregate,
    WindowCodecError,
    WindowMergeError,
    WindowSummary,
    decode_window,
    encode_window,
    merge_windows,
)

MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
BASELINE = np.load(MODELS / "baseline.npy").astype(np.float64)
EDGES_16 = [quantile_edges(BASELINE[:, j]) for j in range(BASELINE.shape[1])]
RANGES_16 = [(f.valid_min, f.valid_max) for f in FEATURES]

# One window a minute must stay under 2 MB a day (2,000,000 bytes, 1,440 windows).
DAILY_BUDGET = 2_000_000
WINDOWS_PER_DAY = 1440
# Bytes on the wire per window beyond the payload: an MQTT 3.1.1 QoS 1 PUBLISH
# (fixed header and remaining length 3, topic length 2, a 57-character topic such
# as "edgefleet/v1/fleet-3c5a0e9d21b7/devices/pump-0042/windows" in a default
# namespace, packet id 2 = 64), a TLS 1.3 record (header 5, content type 1, AEAD
# tag 16 = 22) and TCP/IPv4 headers with timestamps (52): 138, rounded up.
# Keep-alives and the PUBACK coming back are not the window's.
WIRE_OVERHEAD = 144


def _v2_scores(X: np.ndarray) -> np.ndarray:
    from tflite_runtime.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(MODELS / "v2.tflite"))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(X.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, np.ascontiguousarray(X, dtype=np.float32))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def _window(
    X: np.ndarray,
    latencies: np.ndarray,
    edges: list[list[float]] = EDGES_16,
    ranges: list[tuple[float | None, float | None]] = RANGES_16,
    scores: np.ndarray | None = None,
    start: float = 1_700_000_000.0,
    device: str = "pump-0042",
) -> WindowSummary:
    return WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device,
        model_name="pump-health",
        model_version="2.0.0",
        baseline_id=edges_id(edges),
        start=start,
        end=start + 60.0,
        requests=X.shape[0],
        errors=1,
        served={"active": X.shape[0] - 2, "safe_default": 2},
        features=summarize(X, edges, ranges),
        scores=score_histogram(scores, CLASSES) if scores is not None else None,
        latency_ms=record(ExponentialHistogram(), latencies),
    )


# -- latency: base-2 exponential histogram -----------------------------------


def test_histogram_of_concatenation_equals_merge_of_parts() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.lognormal(0.5, 0.5, 3000), np.zeros(7), [1e-3, 250.0]])
    whole = record(ExponentialHistogram(), x)
    parts = [record(ExponentialHistogram(), chunk) for chunk in np.array_split(x, 9)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merge_histograms(merged, p)
    assert (merged.scale, merged.offset, merged.counts) == (whole.scale, whole.offset, whole.counts)
    assert (merged.zero_count, merged.count) == (7, x.size)
    assert (merged.min, merged.max) == (0.0, 250.0)
    assert merged.sum == pytest.approx(x.sum(), rel=1e-12)
    incremental = ExponentialHistogram()
    for chunk in np.array_split(x, 50):
        incremental = record(incremental, chunk)
    assert incremental == whole.model_copy(update={"sum": incremental.sum})


def test_buckets_are_upper_inclusive_powers_of_the_base() -> None:
    # At scale 0 the base is 2: bucket 0 is (1, 2], bucket 1 is (2, 4].
    h = downscale(record(ExponentialHistogram(), [2.0, 2.0000001, 4.0, 1.0]), 0)
    assert h.offset == -1
    assert h.counts == [1, 1, 2]
    assert h.bucket_bounds(1) == (2.0, 4.0)


def test_downscaling_halves_bucket_indices_exactly() -> None:
    x = np.random.default_rng(5).lognormal(0.0, 0.3, 2000)
    h = record(ExponentialHistogram(), x, max_buckets=160)
    coarse = downscale(h, h.scale - 2)
    index = np.ceil(np.log2(x) * 2.0 ** (h.scale - 2)).astype(np.int64) - 1
    expected = np.bincount(index - index.min())
    assert coarse.offset == index.min()
    assert coarse.counts == expected.tolist()


def test_scale_drops_until_the_range_fits_the_bucket_limit() -> None:
    x = np.geomspace(1e-3, 1e5, 500)
    h = record(ExponentialHistogram(), x, max_buckets=32)
    assert len(h.counts) <= 32
    assert h.scale < MAX_SCALE
    # One more bucket's worth of scale would not fit.
    finer = np.ceil(np.log2(x) * 2.0 ** (h.scale + 1)).astype(np.int64) - 1
    assert finer.max() - finer.min() + 1 > 32


def test_quantiles_are_within_one_bucket_of_the_data() -> None:
    x = np.random.default_rng(11).lognormal(1.0, 0.6, 20_000)
    h = record(ExponentialHistogram(), x)
    for q in (0.01, 0.25, 0.5, 0.9, 0.99):
        estimate = quantile(h, q)
        assert estimate is not None
        assert abs(estimate / np.quantile(x, q) - 1) < h.base - 1
    assert quantile(h, 0.0) == x.min()
    assert quantile(h, 1.0) == x.max()
    assert quantile(ExponentialHistogram(), 0.5) is None
    assert quantile(record(ExponentialHistogram(), [0.0, 0.0, 0.0, 5.0]), 0.5) == 0.0


def test_negative_or_nan_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        record(ExponentialHistogram(), [1.0, -0.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        record(ExponentialHistogram(), [math.nan])


# -- merging windows ------------------------------------------------------------


def test_merged_windows_equal_the_summary_of_the_concatenated_rows() -> None:
    X, _ = generate(3000, 21)
    X[::97, 4] = np.nan
    latencies = np.random.default_rng(2).lognormal(0.5, 0.4, 3000)
    scores = _v2_scores(X)
    chunks = np.array_split(np.arange(3000), 12)
    windows = [
        _window(X[i], latencies[i], scores=scores[i], start=1_700_000_000.0 + 60 * k)
        for k, i in enumerate(chunks)
    ]
    merged = merge_windows(windows)
    whole = _window(X, latencies, scores=scores)

    assert merged.windows == 12
    assert merged.requests == 3000
    assert merged.errors == 12
    assert merged.served == {"active": 3000 - 24, "safe_default": 24}
    assert (merged.start, merged.end) == (1_700_000_000.0, 1_700_000_000.0 + 60 * 12)
    assert merged.model_versions == ["pump-health@2.0.0"]
    assert merged.scores == whole.scores
    lat, lat_whole = merged.latency_ms, whole.latency_ms
    assert (lat.scale, lat.offset, lat.counts) == (
        lat_whole.scale,
        lat_whole.offset,
        lat_whole.counts,
    )
    for got, want in zip(merged.features, whole.features, strict=True):
        assert (got.n, got.nan, got.out_of_range, got.counts) == (
            want.n,
            want.nan,
            want.out_of_range,
            want.counts,
        )
        assert (got.min, got.max) == (want.min, want.max)
        assert got.mean == pytest.approx(want.mean, rel=1e-12)
        assert got.m2 == pytest.approx(want.m2, rel=1e-9)


def test_aggregates_merge_like_the_windows_inside_them() -> None:
    X, _ = generate(1200, 22)
    latencies = np.full(1200, 3.0)
    windows = [
        _window(X[i], latencies[i], device=f"pump-{k % 3}")
        for k, i in enumerate(np.array_split(np.arange(1200), 6))
    ]
    per_device = [
        merge_windows([w for w in windows if w.device_id == d])
        for d in ("pump-0", "pump-1", "pump-2")
    ]
    fleet = merge_windows(per_device)
    flat = merge_windows(windows)
    assert isinstance(fleet, WindowAggregate)
    assert fleet.windows == flat.windows == 6
    assert [f.counts for f in fleet.features] == [f.counts for f in flat.features]
    assert fleet.latency_ms == flat.latency_ms


def test_windows_over_different_baselines_do_not_merge() -> None:
    X, _ = generate(100, 23)
    a = _window(X, np.ones(100))
    other_edges = [[e + 1.0 for e in row] for row in EDGES_16]
    b = _window(X, np.ones(100), edges=other_edges)
    with pytest.raises(WindowMergeError, match="baselines"):
        merge_windows([a, b])
    with pytest.raises(WindowMergeError, match="no windows"):
        merge_windows([])


def test_a_window_whose_counts_do_not_add_up_is_invalid() -> None:
    X, _ = generate(50, 24)
    w = _window(X, np.ones(50))
    bad = w.features[0].model_copy(update={"n": w.features[0].n + 1})
    with pytest.raises(ValueError, match="bin counts sum"):
        WindowSummary.model_validate({**w.model_dump(), "features": [bad, *w.features[1:]]})


# -- the codec ----------------------------------------------------------------------


def _assert_close_round_trip(got: WindowSummary, want: WindowSummary) -> None:
    assert got.model_dump(exclude={"features"}) == want.model_dump(exclude={"features"})
    for g, w in zip(got.features, want.features, strict=True):
        assert (g.n, g.nan, g.out_of_range, g.counts, g.min, g.max) == (
            w.n,
            w.nan,
            w.out_of_range,
            w.counts,
            w.min,
            w.max,
        )
        spread = (w.max - w.min) if w.max is not None and w.min is not None else 0.0
        assert abs(g.mean - w.mean) <= 1e-7 * spread + 1e-12 * abs(w.mean)
        assert g.m2 == pytest.approx(w.m2, rel=1e-7)


def test_round_trip_keeps_counts_and_extremes_exact_and_moments_to_float32() -> None:
    X, _ = generate(600, 31)
    w = _window(X, np.random.default_rng(1).lognormal(0.5, 0.4, 600), scores=_v2_scores(X))
    _assert_close_round_trip(decode_window(encode_window(w)), w)


def test_round_trip_of_unusual_features_is_exact() -> None:
    rng = np.random.default_rng(4)
    X = np.column_stack(
        [
            rng.normal(size=40),  # float64 values: sent wide, exactly
            np.full(40, 2.5),  # constant
            np.full(40, np.nan),  # no values at all
            np.where(rng.random(40) < 0.2, np.nan, rng.normal(1e6, 1.0, 40).astype(np.float32)),
            rng.integers(0, 3, 40).astype(np.float64),  # few distinct values, fewer bins
        ]
    )
    edges = [quantile_edges(rng.normal(size=1000)), [2.0, 3.0], [0.0], [1e6], [1.0, 2.0]]
    ranges: list[tuple[float | None, float | None]] = [
        (-1.0, 1.0),
        (None, None),
        (0, 1),
        (None, 1e6),
        (0, 1),
    ]
    w = _window(X, np.array([]), edges=edges, ranges=ranges).model_copy(
        update={"cohort_id": "canary", "plan_id": "plan-7", "served": {}, "errors": 0}
    )
    got = decode_window(encode_window(w))
    _assert_close_round_trip(got, w)
    assert got.features[0] == w.features[0]
    assert got.features[1] == w.features[1].model_copy(update={"mean": 2.5})
    assert got.features[2] == w.features[2]
    assert got.latency_ms == ExponentialHistogram()
    assert (got.cohort_id, got.plan_id, got.scores) == ("canary", "plan-7", None)


@pytest.mark.parametrize("rows", [60, 600])
def test_a_day_of_32_feature_windows_fits_in_two_megabytes(rows: int) -> None:
    X = np.hstack([generate(rows, rows)[0], generate(rows, rows + 1)[0]])
    w = _window(
        X,
        np.random.default_rng(rows).lognormal(0.5, 0.4, rows),
        edges=EDGES_16 * 2,
        ranges=RANGES_16 * 2,
        scores=_v2_scores(X[:, :16]),
    )
    payload = encode_window(w)
    per_day = (len(payload) + WIRE_OVERHEAD) * WINDOWS_PER_DAY
    assert per_day <= DAILY_BUDGET, f"{len(payload)} bytes a window, {per_day} a day"
    # The same window as JSON, for scale: several times larger.
    assert len(w.model_dump_json()) > 4 * len(payload)


_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 4096, "lc": 1, "lp": 0, "pb": 0}]


def _frame(body: bytes, version: int) -> bytes:
    """A well-formed envelope (magic, version, CRC, LZMA2) around any body."""
    return (
        WINDOW_MAGIC
        + bytes([version])
        + struct.pack("<I", zlib.crc32(body))
        + lzma.compress(body, format=lzma.FORMAT_RAW, filters=_FILTERS)
    )


def _body(encoded: bytes) -> bytes:
    return lzma.decompress(encoded[8:], format=lzma.FORMAT_RAW, filters=_FILTERS)


def test_garbage_is_refused_with_a_clear_error() -> None:
    X, _ = generate(30, 32)
    good = encode_window(_window(X, np.ones(30), scores=np.eye(4)[np.arange(30) % 4]))
    wrong_crc = bytearray(good)
    wrong_crc[5] ^= 0x01
    cases = {
        b"": "bad magic",
        b'{"v": 1}': "bad magic",
        WINDOW_MAGIC + b"\x09" + good[4:]: "version 9 is not supported",
        good[:6]: "truncated in its header",
        good[:8] + b"\xffgarbage": "corrupt",
        bytes(wrong_crc): "CRC-32 does not match",
        good + b"tail": "trailing bytes",
        _frame(bytes(2 << 20), 1): "larger than",
        _frame(_body(good) + b"\x00", good[3]): "unexpected bytes after the last feature",
    }
    for data, message in cases.items():
        with pytest.raises(WindowCodecError, match=message):
            decode_window(data)
    for cut in range(len(good)):
        with pytest.raises(WindowCodecError):
            decode_window(good[:cut])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    with pytest.raises(WindowCodecError):
        decode_window(bytes(flipped))


@pytest.mark.parametrize("unsummarised", [0, 7])
def test_well_compressed_nonsense_is_refused_with_a_codec_error(unsummarised: int) -> None:
    rng = np.random.default_rng(8)
    window = _window(generate(30, 33)[0], np.ones(30))
    encoded = encode_window(window.model_copy(update={"unsummarised_requests": unsummarised}))
    body, version = _body(encoded), encoded[3]
    for _ in range(300):
        mutated = bytearray(body)
        for i in rng.integers(0, len(body), 3):
            mutated[i] = int(rng.integers(0, 256))
        data = _frame(bytes(mutated), version)
        # Either a valid window or a codec error; any other exception fails the test.
        with contextlib.suppress(WindowCodecError):
            decode_window(data)
    random_bodies = [
        rng.integers(0, 256, int(n)).astype(np.uint8).tobytes() for n in rng.integers(0, 400, 200)
    ]
    for raw in random_bodies:
        with pytest.raises(WindowCodecError):
            decode_window(_frame(raw, version))


# -- sampled windows ------------------------------------------------------------------

# A window written by the codec before sampled windows existed (version 1).
V1_WINDOW = bytes.fromhex(
    "45465701d9c15dc3e0010100bf01000104a683347fa080e9d6ce1c6765e72f72da5d1620a9a7519881ffbaea"
    "d79eaeea3fdb239b6fc7da64aaa5e15fbc94752de07dd0a033622ff7fda59e3649a458b526174e8ed117e5d5"
    "c6143c064bd9ba98bc2eeca83d2d2a01aed2db0ec3535881a45001e11de58458410901b32ae3c62ef051a7e2"
    "cd816233e1d11bb6d5ea90973d91cbf92fe55650a4da6b6b162b86bc7bad666989ae56465a5eaf9446317168"
    "8439e59adbccfe062d5b013cfe6261d66c645e07207cc1a1c71cae9dfa9c00"
)


def _v1_window() -> WindowSummary:
    """The window in ``V1_WINDOW``."""
    X = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, np.nan], [4.0, 40.0], [5.0, 50.0]])
    return _window(
        X,
        np.array([1.5, 2.0, 2.5, 3.0, 40.0]),
        edges=[[2.5], [15.0, 45.0]],
        ranges=[(0, 4.5), (None, None)],
        scores=np.eye(4)[[0, 1, 1, 3, 2]] * 0.9,
    ).model_copy(update={"window_id": "0123456789abcdef0123456789abcdef"})


def test_windows_of_codec_version_1_still_decode_and_exact_windows_are_still_written_so() -> None:
    window = _v1_window()
    got = decode_window(V1_WINDOW)
    assert got == window
    assert (got.unsummarised_requests, got.summarised_requests) == (0, 5)
    # A window that summarised every request keeps the old bytes: old readers read it.
    assert encode_window(window) == V1_WINDOW


def test_a_sampled_window_says_so_and_round_trips_in_version_2() -> None:
    X, _ = generate(200, 34)
    window = _window(X, np.ones(200)).model_copy(
        update={"requests": 5000, "unsummarised_requests": 4800}
    )
    assert window.summarised_requests == 200
    data = encode_window(window)
    assert data[3] == 2
    back = decode_window(data)
    assert (back.requests, back.unsummarised_requests, back.summarised_requests) == (
        5000,
        4800,
        200,
    )
    _assert_close_round_trip(back, window)


def test_more_unsummarised_requests_than_requests_is_invalid_on_and_off_the_wire() -> None:
    X, _ = generate(20, 35)
    window = _window(X, np.ones(20))
    with pytest.raises(ValueError, match="unsummarised"):
        WindowSummary.model_validate({**window.model_dump(), "unsummarised_requests": 21})
    # The same on the wire: requests 20 then errors 1, unsummarised 7 edited to 21.
    sampled = encode_window(window.model_copy(update={"unsummarised_requests": 7}))
    body = _body(sampled)
    edited = body.replace(bytes([20, 1, 7]), bytes([20, 1, 21]), 1)
    assert edited != body
    with pytest.raises(WindowCodecError, match="unsummarised"):
        decode_window(_frame(edited, 2))


def test_merging_adds_the_unsummarised_requests() -> None:
    X, _ = generate(300, 36)
    exact = _window(X[:100], np.ones(100))
    sampled = [
        _window(X[100:200], np.ones(100)).model_copy(
            update={"requests": 1000, "unsummarised_requests": 900}
        ),
        _window(X[200:], np.ones(100)).model_copy(
            update={"requests": 2000, "unsummarised_requests": 1900}
        ),
    ]
    merged = merge_windows([exact, *sampled])
    assert (merged.requests, merged.unsummarised_requests, merged.summarised_requests) == (
        3100,
        2800,
        300,
    )
    assert merged.features[0].n == 300
    again = merge_windows([merge_windows(sampled), exact])
    assert again.unsummarised_requests == 2800


def test_feature_summary_with_counts_not_matching_n_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        WindowSummary(
            window_id="w1",
            device_id="d1",
            model_name="m",
            model_version="1.0.0",
            baseline_id="b",
            start=0.0,
            end=1.0,
            requests=1,
            features=[FeatureSummary(n=2, nan=0, out_of_range=0, counts=[1, 0])],
        )


def test_a_feature_that_decodes_to_an_invalid_summary_names_where() -> None:
    # A negative m2 cannot come from a real window; the writer does not check it
    # (it takes a validated WindowSummary), so the reader must.
    window = _v1_window()
    broken = window.features[1].model_copy(update={"m2": -4.0})
    data = encode_window(window.model_copy(update={"features": [window.features[0], broken]}))
    with pytest.raises(WindowCodecError, match=r"invalid at features\.1\.m2: .*greater than"):
        decode_window(data)


# -- values beyond the baseline's range (codec version 3) -------------------------------

# A sampled window written by the codec before version 3 existed (version 2).
V2_WINDOW = bytes.fromhex(
    "45465702fc57ec6ee0010200c101000104a683347fa080e9d6ce1c6765e72f72da5d1620a9a7519881ffbaea"
    "d79eaeea3fdb239b6fc7da64aaa5e15fbc94752de07dd0a033622ff7fda59e3649a458b526174e8ed117e5d5"
    "c6143c064bd9ba98bc2eeca83d3754402d1e6698af0adde0955d067a55898ce944fe492e8d2ccbf260206ae6"
    "45ddf89435c5962481a6595c6eff8aba06265cf9d87f966cb0485f35ff915b324f331862826d2992ac0a1487"
    "2f0f63ecded09911e4189e3f4f16f2cee5df6c20d4f628a774a3e04c90e435d600"
)


def _v2_window() -> WindowSummary:
    """The window in ``V2_WINDOW``."""
    return _v1_window().model_copy(
        update={
            "requests": 9,
            "unsummarised_requests": 4,
            "served": {"active": 7, "safe_default": 2},
        }
    )


def _counted(window: WindowSummary, counts: list[tuple[int, int]]) -> WindowSummary:
    features = [
        f.model_copy(update={"below_baseline": lo, "above_baseline": hi})
        for f, (lo, hi) in zip(window.features, counts, strict=True)
    ]
    return window.model_copy(update={"features": features})


def test_windows_of_codec_versions_1_and_2_decode_as_before_without_counts() -> None:
    for data, window in ((V1_WINDOW, _v1_window()), (V2_WINDOW, _v2_window())):
        got = decode_window(data)
        assert got == window
        assert all(f.below_baseline is None and f.above_baseline is None for f in got.features)
        assert encode_window(window) == data


def test_a_window_with_nothing_beyond_the_baseline_keeps_its_old_bytes() -> None:
    # Counted, and nothing beyond the range: old readers still read it, byte for byte.
    assert encode_window(_counted(_v1_window(), [(0, 0), (0, 0)])) == V1_WINDOW
    assert encode_window(_counted(_v2_window(), [(0, 0), (0, 0)])) == V2_WINDOW


@pytest.mark.parametrize("unsummarised", [0, 4])
def test_counts_beyond_the_baseline_round_trip_in_version_3(unsummarised: int) -> None:
    window = _counted(
        _v1_window().model_copy(update={"requests": 9, "unsummarised_requests": unsummarised}),
        [(0, 2), (1, 0)],
    )
    data = encode_window(window)
    assert data[3] == 3
    got = decode_window(data)
    assert got == window
    assert [(f.below_baseline, f.above_baseline) for f in got.features] == [(0, 2), (1, 0)]
    assert got.unsummarised_requests == unsummarised
    # Larger windows too: every feature keeps its counts, zero or not.
    X, _ = generate(600, 37)
    big = _window(X, np.ones(600))
    big = _counted(big, [(j % 3, 600 - j) if j % 2 else (0, 0) for j in range(len(big.features))])
    back = decode_window(encode_window(big))
    _assert_close_round_trip(back, big)
    assert [(f.below_baseline, f.above_baseline) for f in back.features] == [
        (f.below_baseline, f.above_baseline) for f in big.features
    ]


def test_a_version_3_window_cannot_mix_counted_and_uncounted_features() -> None:
    window = _v1_window()
    first = window.features[0].model_copy(update={"below_baseline": 0, "above_baseline": 1})
    mixed = window.model_copy(update={"features": [first, window.features[1]]})
    with pytest.raises(WindowCodecError, match="feature 1 did not count values beyond"):
        encode_window(mixed)


def test_counts_beyond_the_baseline_that_break_the_window_are_refused() -> None:
    window = _counted(_v1_window(), [(0, 2), (1, 0)])
    with pytest.raises(ValueError, match="above the baseline's range, of only n = 5"):
        WindowSummary.model_validate(_counted(window, [(3, 3), (0, 0)]).model_dump())
    # On the wire: version 3's flag in a version 1 body, and counts larger than n.
    body = _body(encode_window(window))
    with pytest.raises(WindowCodecError, match="unknown feature flags 0x86"):
        decode_window(_frame(body, 2))
    # Feature 0: flags (beyond, values, out of range), out_of_range 1, below 0, above 2.
    flag_at = body.find(bytes([0x80 | 0x04 | 0x02, 1, 0, 2]))
    assert flag_at > 0
    edited = bytearray(body)
    edited[flag_at + 2 : flag_at + 4] = bytes([5, 5])  # after out_of_range: below, above
    with pytest.raises(WindowCodecError, match="of only n = 5"):
        decode_window(_frame(bytes(edited), 3))


def test_merging_adds_counts_beyond_the_baseline_and_keeps_not_counted() -> None:
    a = _counted(_v1_window(), [(0, 2), (1, 0)])
    b = _counted(_v1_window(), [(0, 1), (0, 0)])
    merged = merge_windows([a, b])
    assert [(f.below_baseline, f.above_baseline) for f in merged.features] == [(0, 3), (1, 0)]
    unknown = merge_windows([a, _v1_window()])
    assert all(f.above_baseline is None for f in unknown.features)


# -- the shadow section (version 4) ----------------------------------------------------

_SHADOW_ID = "sha256:" + "ab" * 32


def _shadowed(window: WindowSummary, **fields: object) -> WindowSummary:
    latency = ExponentialHistogram()
    for ms in (1.5, 2.0, 2.5, 40.0):
        latency = record(latency, [ms])
    shadow = {
        "bundle_id": _SHADOW_ID,
        "model_version": "2.0.0",
        "requests": 4,
        "agreements": 3,
        "errors": 1,
        "latency_ms": latency,
        **fields,
    }
    return window.model_copy(update={"shadow": ShadowSummary.model_validate(shadow)})


@pytest.mark.parametrize("counted", [False, True])
@pytest.mark.parametrize("unsummarised", [0, 4])
def test_a_shadow_section_round_trips_in_version_4(unsummarised: int, counted: bool) -> None:
    window = _v1_window().model_copy(update={"requests": 9, "unsummarised_requests": unsummarised})
    if counted:
        window = _counted(window, [(0, 2), (1, 0)])
    window = _shadowed(window)
    data = encode_window(window)
    assert data[3] == 4
    got = decode_window(data)
    assert got == window
    assert got.shadow is not None and got.shadow.latency_ms.count == 4


def test_a_window_without_a_shadow_keeps_its_old_bytes() -> None:
    assert _v1_window().shadow is None
    assert encode_window(_v1_window()) == V1_WINDOW
    assert encode_window(_v2_window()) == V2_WINDOW
    assert decode_window(V1_WINDOW).shadow is None
    # A shadow with an empty latency histogram (it never finished) round-trips too.
    empty = _shadowed(_v1_window(), requests=0, agreements=0, errors=0, latency_ms={})
    assert decode_window(encode_window(empty)) == empty


def _shadow_body(window: WindowSummary) -> tuple[bytes, int]:
    """The body of ``window`` and where its shadow section starts."""
    body = _body(encode_window(window))
    at = body.rfind(bytes([3]) + bytes.fromhex(_SHADOW_ID[7:]))
    assert at > 0
    return body, at


def test_malformed_shadow_sections_are_refused_naming_what_is_wrong() -> None:
    window = _shadowed(_v1_window())
    body, at = _shadow_body(window)
    # bundle id (33 bytes), version (kind, length 5, "2.0.0"), then the three counts.
    counts = at + 33 + 7
    assert body[counts : counts + 3] == bytes([4, 3, 1])
    more = bytearray(body)
    more[counts + 1] = 4  # 4 agreements and 1 error of 4 requests
    with pytest.raises(WindowCodecError, match=r"invalid at shadow: .*4 agreements and 1 errors"):
        decode_window(_frame(bytes(more), 4))
    with pytest.raises(WindowCodecError, match=r"the shadow section is malformed: .*truncated"):
        decode_window(_frame(body[: counts + 2], 4))
    absent = bytearray(body)
    absent[at] = 0  # no bundle id
    with pytest.raises(WindowCodecError, match="shadow section is malformed: a required string"):
        decode_window(_frame(bytes(absent[: at + 1]) + body[at + 33 :], 4))
    bad_id = _frame(body[:at] + bytes([1, 3]) + b"a b" + body[at + 33 :], 4)
    with pytest.raises(WindowCodecError, match=r"invalid at shadow\.bundle_id"):
        decode_window(bad_id)
    with pytest.raises(WindowCodecError, match="unexpected bytes after the shadow section"):
        decode_window(_frame(body + b"\x00", 4))


def test_a_version_4_window_names_its_sections_or_is_refused() -> None:
    body, _ = _shadow_body(_shadowed(_v2_window()))
    # Bodies of versions 2 and 4 agree up to the unsummarised count; 4 then has its byte.
    plain = _body(encode_window(_v2_window()))
    sections_at = next(i for i, (a, b) in enumerate(zip(plain, body, strict=False)) if a != b)
    assert body[sections_at] == 0x02
    for flags, message in ((0x06, "unknown window sections 0x6"), (0x00, "without its shadow")):
        edited = bytearray(body)
        edited[sections_at] = flags
        with pytest.raises(WindowCodecError, match=message):
            decode_window(_frame(bytes(edited), 4))
    with pytest.raises(WindowCodecError, match="version 6 is not supported"):
        decode_window(_frame(body, 6))


def test_a_shadow_summary_with_more_outcomes_than_requests_is_invalid() -> None:
    with pytest.raises(ValueError, match="2 agreements and 1 errors of only 2 shadow requests"):
        ShadowSummary(bundle_id=_SHADOW_ID, model_version="2", requests=2, agreements=2, errors=1)


# -- the hybrid section (version 5) ----------------------------------------------------

_PLAN_ID = "p-0123456789ab"


def _hybrid(**fields: object) -> HybridSummary:
    local_ms = ExponentialHistogram()
    for ms in (0.05, 0.07, 0.06, 0.2):
        local_ms = record(local_ms, [ms])
    cloud_ms = record(ExponentialHistogram(), [12.0, 15.5])
    confidence = [0] * CONFIDENCE_BINS
    confidence[20], confidence[30], confidence[49] = 2, 1, 7
    hybrid = {
        "plan_id": _PLAN_ID,
        "mode": "escalate",
        "local": 7,
        "escalated": 2,
        "kept_local_quota": 1,
        "cloud_answered": 1,
        "audits": 2,
        "cloud_errors": {"rate_limited": 1, "timeout": 1},
        "escalated_compared": 1,
        "escalated_agreements": 0,
        "audit_compared": 1,
        "audit_agreements": 1,
        "audit_confidence_sum": 0.97,
        "local_latency_ms": local_ms,
        "cloud_latency_ms": cloud_ms,
        "confidence": confidence,
        **fields,
    }
    return HybridSummary.model_validate(hybrid)


def _hybrid_window(window: WindowSummary, **fields: object) -> WindowSummary:
    return window.model_copy(update={"plan_id": _PLAN_ID, "hybrid": _hybrid(**fields)})


@pytest.mark.parametrize("shadow", [False, True])
@pytest.mark.parametrize("counted", [False, True])
def test_a_hybrid_section_round_trips_in_version_5(counted: bool, shadow: bool) -> None:
    window = _v2_window().model_copy(update={"requests": 10})
    if counted:
        window = _counted(window, [(0, 2), (1, 0)])
    if shadow:
        window = _shadowed(window)
    window = _hybrid_window(window)
    data = encode_window(window)
    assert data[3] == WINDOW_CODEC_VERSION == 5
    got = decode_window(data)
    assert got == window
    assert got.hybrid is not None and got.hybrid.requests == 10
    assert got.hybrid.cloud_errors == {"rate_limited": 1, "timeout": 1}


def test_a_window_without_a_hybrid_section_keeps_its_old_bytes() -> None:
    assert encode_window(_v1_window()) == V1_WINDOW
    assert encode_window(_v2_window()) == V2_WINDOW
    assert encode_window(_shadowed(_v1_window()))[3] == 4
    # The plan id alone (a window labelled with a plan) is no hybrid section.
    labelled = _v1_window().model_copy(update={"plan_id": _PLAN_ID})
    assert encode_window(labelled)[3] == 1
    # Every mode, and a section with nothing but zeros, round-trip.
    for mode in ("local", "escalate", "cloud_first"):
        empty = _v1_window().model_copy(
            update={"hybrid": HybridSummary(plan_id=_PLAN_ID, mode=mode)}
        )
        assert decode_window(encode_window(empty)) == empty


def _hybrid_body(window: WindowSummary) -> tuple[bytes, int]:
    """The body of ``window`` and where its hybrid section starts (after the plan id)."""
    body = _body(encode_window(window))
    plan = bytes([1, len(_PLAN_ID)]) + _PLAN_ID.encode()
    at = body.rfind(plan)
    assert at > 0
    return body, at + len(plan)


def test_malformed_hybrid_sections_are_refused_naming_what_is_wrong() -> None:
    body, at = _hybrid_body(_hybrid_window(_v2_window()))
    # mode, then local escalated kept_local_quota cloud_answered audits, then the error kinds.
    assert body[at : at + 7] == bytes([1, 7, 2, 1, 1, 2, 0b00011])
    cases = {
        bytes([9]): r"hybrid section is malformed: unknown plan mode 9",
        bytes([1, 7, 2, 1, 3]): r"invalid at hybrid: .*3 cloud answers of only 2 escalated",
        bytes([1, 7, 2, 1, 1, 2, 0x40]): r"hybrid section is malformed: unknown cloud error kinds",
    }
    for edit, message in cases.items():
        edited = body[:at] + edit + body[at + len(edit) :]
        with pytest.raises(WindowCodecError, match=message):
            decode_window(_frame(edited, 5))
    with pytest.raises(WindowCodecError, match=r"the hybrid section is malformed: .*truncated"):
        decode_window(_frame(body[: at + 4], 5))
    with pytest.raises(WindowCodecError, match="unexpected bytes after the hybrid section"):
        decode_window(_frame(body + b"\x00", 5))
    # The confidence row: first bin 20, 30 bins long, past the 50 bins there are.
    row = body.rfind(bytes([20, 30, 2]))
    assert row > at
    wide = body[:row] + bytes([40, 30]) + body[row + 2 :]
    with pytest.raises(WindowCodecError, match="confidence row reaches past its 50 bins"):
        decode_window(_frame(wide, 5))


def test_a_version_5_window_names_its_hybrid_section_or_is_refused() -> None:
    window = _hybrid_window(_v2_window())
    body, _ = _hybrid_body(window)
    plain = _body(encode_window(_v2_window().model_copy(update={"plan_id": _PLAN_ID})))
    sections_at = next(i for i, (a, b) in enumerate(zip(plain, body, strict=False)) if a != b)
    assert body[sections_at] == 0x04
    for flags, message in ((0x0C, "unknown window sections 0xc"), (0x00, "without its hybrid")):
        edited = bytearray(body)
        edited[sections_at] = flags
        with pytest.raises(WindowCodecError, match=message):
            decode_window(_frame(bytes(edited), 5))
    # A version 4 reader's rules: the hybrid flag is not one of its sections.
    with pytest.raises(WindowCodecError, match="unknown window sections 0x4"):
        decode_window(_frame(body, 4))
    with pytest.raises(WindowCodecError, match=r"version 6 is not supported .* upgrade the reader"):
        decode_window(_frame(body, 6))


def test_hybrid_sections_of_one_plan_merge_and_of_two_plans_do_not() -> None:
    a, b = _hybrid(), _hybrid(local=3, cloud_errors={"timeout": 2})
    merged = merge_hybrid(a, b)
    assert merged.requests == a.requests + b.requests
    assert merged.cloud_errors == {"rate_limited": 1, "timeout": 3}
    assert merged.confidence[49] == 14
    assert merged.local_latency_ms.count == 8
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_hybrid(a, _hybrid(plan_id="p-other"))
