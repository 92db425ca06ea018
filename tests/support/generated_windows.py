"""Random valid window summaries of every shape the codec writes, for tests that compare readers.

Any codec version (exact, sampled, counted beyond the baseline, shadow and
hybrid sections), features of unusual shapes (bins of their own, NaN, no
values, constant, float64 values, one bin holding most rows so that its count
takes a long varint), with and without score histograms.
"""

from __future__ import annotations

import lzma
import struct
import zlib

import numpy as np

from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary
from protocol.summary import FeatureSummary, ScoreHistogram
from protocol.window import WINDOW_MAGIC, ShadowSummary, WindowSummary, codec

CLASSES = ["ok", "worn", "blocked"]


def _float32(value: float) -> float:
    return float(np.float32(value))


def random_feature(rng: np.random.Generator, bins: int, rows: int, counted: bool) -> FeatureSummary:
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


def random_window(rng: np.random.Generator) -> WindowSummary:
    """A valid window of a random shape: any codec version, sections and feature kinds."""
    requests = int(rng.integers(0, 3000))
    rows = int(rng.integers(0, 400)) if rng.random() < 0.9 else int(rng.integers(0, 50_000))
    bins = int(rng.integers(1, 30))
    counted = bool(rng.random() < 0.4)
    features = [random_feature(rng, bins, rows, counted) for _ in range(int(rng.integers(0, 40)))]
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


def frame(body: bytes, version: int) -> bytes:
    """``body`` as the window codec frames it: magic, version, CRC-32, raw LZMA2 (a body
    the encoder would never write, framed as if it had)."""
    compressed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)
    return WINDOW_MAGIC + bytes([version]) + struct.pack("<I", zlib.crc32(body)) + compressed
