"""The window decoder's bulk reader against the reference reader, over generated windows.

:func:`protocol.window.decode_window` reads a body with its bin counts a run
of bytes at a time and falls back to the reference reader (value by value)
for anything it cannot vouch for. These tests hold it to the reference: on
many generated windows, valid ones of every codec version and shape and
mutated ones (bytes changed, cut, added, in a correctly framed body so the
mutation reaches the parser), the decoder accepts exactly what the reference
accepts, with an equal window (fields, and which fields were set), and refuses
exactly what it refuses, with the same message. They also check that the bulk
reader itself takes the valid windows, so the speed is not a fallback away.
"""

from __future__ import annotations

import lzma
import struct
import zlib

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary
from protocol.summary import FeatureSummary, ScoreHistogram
from protocol.window import (
    WINDOW_MAGIC,
    ShadowSummary,
    WindowCodecError,
    WindowSummary,
    codec,
    decode_window,
    encode_window,
)

CLASSES = ["ok", "worn", "blocked"]


def _float32(value: float) -> float:
    return float(np.float32(value))


def _feature(rng: np.random.Generator, bins: int, rows: int, counted: bool) -> FeatureSummary:
    """A consistent feature summary of an unusual shape now and then."""
    shape = rng.integers(0, 10)
    k = int(rng.integers(1, 40)) if shape == 0 else bins  # bins of its own
    nan = int(rng.integers(1, 5)) if shape == 1 else 0
    n = 0 if shape == 2 else max(rows - nan, 0) if shape != 3 else int(rng.integers(0, 20_000))
    if shape == 4 and n:  # one bin holds most: long varints in the run
        weights = np.full(k, 0.01)
        weights[int(rng.integers(0, k))] = 1.0
    else:
        weights = rng.dirichlet(np.ones(k) * 5)
    counts = [int(c) for c in rng.multinomial(n, weights / weights.sum())]
    below = above = None
    if counted:
        below = int(rng.integers(0, n + 1)) if n and rng.random() < 0.3 else 0
        above = int(rng.integers(0, n - below + 1)) if n and rng.random() < 0.3 else 0
    out_of_range = int(rng.integers(0, n + 1)) if n and shape == 5 else 0
    if n == 0:
        return FeatureSummary(
            n=0,
            nan=nan,
            out_of_range=0,
            counts=counts,
            below_baseline=below,
            above_baseline=above,
        )
    if shape == 6:  # constant
        low = high = mean = _float32(rng.normal(0, 100))
        m2 = 0.0
    elif shape == 7:  # values float32 cannot hold exactly: sent in float64
        low = float(rng.normal(0, 1e6)) + 0.1
        high = low + float(rng.exponential(1e300 if rng.random() < 0.2 else 1e3))
        mean = (low + high) / 2
        m2 = float(rng.exponential(1e5))
    else:
        low = _float32(rng.normal(0, 1000))
        high = _float32(low + rng.exponential(500) + 1)
        mean = float(rng.uniform(low, high))
        m2 = float(rng.exponential(1e4))
    return FeatureSummary(
        n=n,
        nan=nan,
        out_of_range=out_of_range,
        mean=mean,
        m2=m2,
        min=low,
        max=high,
        counts=counts,
        below_baseline=below,
        above_baseline=above,
    )


def _latency(rng: np.random.Generator, requests: int) -> ExponentialHistogram:
    if requests == 0 or rng.random() < 0.1:
        return ExponentialHistogram()
    return record(ExponentialHistogram(), rng.lognormal(1.0, 1.5, size=min(requests, 200)))


def _window(rng: np.random.Generator) -> WindowSummary:
    """A valid window of a random shape: any codec version, sections and feature kinds."""
    requests = int(rng.integers(0, 3000))
    rows = int(rng.integers(0, 400)) if rng.random() < 0.9 else int(rng.integers(0, 50_000))
    bins = int(rng.integers(1, 30))
    counted = bool(rng.random() < 0.4)
    features = [_feature(rng, bins, rows, counted) for _ in range(int(rng.integers(0, 40)))]
    scores = None
    if rng.random() < 0.7:
        score_bins = int(rng.integers(1, 25))
        counts = rng.poisson(rng.uniform(0, 30), size=(len(CLASSES), score_bins))
        scores = ScoreHistogram(classes=CLASSES, counts=counts.tolist())
    shadow = None
    if rng.random() < 0.2:
        shadow_requests = int(rng.integers(0, 500))
        agreements = int(rng.integers(0, shadow_requests + 1))
        shadow = ShadowSummary(
            bundle_id="b-" + "ab" * int(rng.integers(1, 8)),
            model_version="2.1.0",
            requests=shadow_requests,
            agreements=agreements,
            errors=int(rng.integers(0, shadow_requests - agreements + 1)),
            latency_ms=_latency(rng, shadow_requests),
        )
    hybrid = None
    if rng.random() < 0.2:
        confidence = [0] * CONFIDENCE_BINS
        for i in rng.integers(0, CONFIDENCE_BINS, 5):
            confidence[int(i)] += int(rng.integers(1, 300))
        hybrid = HybridSummary(
            plan_id="p-0123456789ab",
            mode="escalate",
            local=int(rng.integers(0, 100)),
            cloud_answered=0,
            local_latency_ms=_latency(rng, 50),
            confidence=confidence,
        )
    start = float(rng.uniform(0, 2e9))
    served = {"active": int(rng.integers(0, requests + 1))}
    if rng.random() < 0.3:
        served["safe_default"] = int(rng.integers(0, 100_000))
    return WindowSummary(
        window_id=f"w-{rng.integers(0, 1 << 62):x}",
        device_id="pump-" + str(rng.integers(0, 10_000)),
        model_name="pump-health",
        model_version="2.0.0",
        baseline_id="sha256:" + bytes(rng.integers(0, 256, 32).astype(np.uint8)).hex(),
        cohort_id=None if rng.random() < 0.5 else "cohort-a",
        plan_id="p-0123456789ab" if hybrid is not None else None,
        start=start,
        end=start + float(rng.exponential(60)),
        requests=requests,
        errors=int(rng.integers(0, 10)),
        unsummarised_requests=int(rng.integers(0, requests + 1)) if rng.random() < 0.3 else 0,
        served=served,
        features=features,
        scores=scores,
        latency_ms=_latency(rng, requests),
        shadow=shadow,
        hybrid=hybrid,
    )


def _frame(body: bytes, version: int) -> bytes:
    """``body`` as the codec frames it: magic, version, CRC-32, raw LZMA2."""
    compressed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)
    return WINDOW_MAGIC + bytes([version]) + struct.pack("<I", zlib.crc32(body)) + compressed


def _body(data: bytes) -> bytes:
    return lzma.decompress(data[8:], format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)


def _reference(data: bytes) -> WindowSummary | str:
    """What the reference reader makes of ``data``: a window, or the message of its refusal."""
    try:
        version, body = codec._open(data)
        try:
            return codec._read_body(body, version, codec._read_features)
        except ValidationError as exc:
            raise codec._invalid(exc) from None
    except WindowCodecError as exc:
        return f"refused: {exc}"


def _decoded(data: bytes) -> WindowSummary | str:
    try:
        return decode_window(data)
    except WindowCodecError as exc:
        return f"refused: {exc}"


def _fields_set(model: BaseModel) -> object:
    """Which fields were set, all the way down: a decoded window must not differ here either."""
    nested = {
        name: _fields_set(value)
        if isinstance(value, BaseModel)
        else [_fields_set(v) for v in value]
        if isinstance(value, list) and value and isinstance(value[0], BaseModel)
        else None
        for name, value in model
    }
    return (sorted(model.model_fields_set), nested)


def _assert_same(data: bytes) -> WindowSummary | str:
    expected, got = _reference(data), _decoded(data)
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
    else:
        assert got == expected
        assert got.model_dump() == expected.model_dump()
        assert _fields_set(got) == _fields_set(expected)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_valid_windows_decode_as_the_reference_reads_them_and_through_the_bulk_reader(
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    versions: set[int] = set()
    for _ in range(150):
        window = _window(rng)
        data = encode_window(window)
        versions.add(data[3])
        got = _assert_same(data)
        assert isinstance(got, WindowSummary)
        # The codec keeps counts exactly: the window read back is the window written,
        # but for the float32 moments (mean, m2) of narrow features.
        assert got.model_dump(exclude={"features"}) == window.model_dump(exclude={"features"})
        assert [f.counts for f in got.features] == [f.counts for f in window.features]
        # And the bulk reader, not the fallback, read it.
        version, body = codec._open(data)
        assert codec._read_body(body, version, codec._read_features_in_bulk) == got
    assert versions == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("seed", range(4))
def test_mutated_windows_are_refused_or_read_exactly_as_the_reference_does(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(60):
        data = encode_window(_window(rng))
        body, version = _body(data), data[3]
        for _ in range(12):
            mutated = bytearray(body)
            kind = rng.integers(0, 5)
            if kind == 0:  # a few bytes changed anywhere
                for i in rng.integers(0, len(body), int(rng.integers(1, 4))):
                    mutated[int(i)] = int(rng.integers(0, 256))
            elif kind == 1:  # one bit flipped
                i = int(rng.integers(0, len(body)))
                mutated[i] ^= 1 << int(rng.integers(0, 8))
            elif kind == 2:  # cut short
                del mutated[int(rng.integers(0, len(body))) :]
            elif kind == 3:  # bytes added
                at = int(rng.integers(0, len(body) + 1))
                mutated[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 4))).tolist())
            else:  # a byte given its continuation bit, or its version changed
                i = int(rng.integers(0, len(body)))
                mutated[i] |= 0x80
                version = int(rng.integers(1, 6)) if rng.random() < 0.3 else version
            got = _assert_same(_frame(bytes(mutated), version))
            outcomes["refused" if isinstance(got, str) else "read"] += 1
    # Both outcomes happen often: the mutations test the acceptance and the refusals.
    assert min(outcomes.values()) > 50, outcomes


def test_a_feature_with_long_varints_in_its_run_is_read_value_by_value() -> None:
    rng = np.random.default_rng(7)
    counts = [0] * 10
    counts[3] = 5000
    skewed = FeatureSummary(
        n=5000, nan=0, out_of_range=0, mean=2.0, m2=1.0, min=1.0, max=3.0, counts=counts
    )
    even = _feature(rng, 10, 5000, counted=False).model_copy(update={"counts": [500] * 10})
    window = _window(np.random.default_rng(3)).model_copy(
        update={"features": [even, skewed, even], "shadow": None, "hybrid": None}
    )
    data = encode_window(window)
    got = _assert_same(data)
    assert isinstance(got, WindowSummary)
    assert [f.counts for f in got.features] == [[500] * 10, counts, [500] * 10]
