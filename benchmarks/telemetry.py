"""Telemetry: the window summary's cost per inference, bytes a day, and drift over a fleet.

Three measurements, each against a baseline measured in the same run:

1. Record cost. For the sample model ``v2.tflite``, requests of 64 rows
   (batching) and of 1 row: *bare* = ``set_tensor``/``invoke``/``get_tensor``
   on an interpreter of its own (one thread) sized for the batch; *bare +
   record* = the same call timed with ``perf_counter`` and then
   ``WindowRecorder.record`` of its inputs, scores and latency, with the
   agent's default window policy (1,000 requests or 60 s, 256-row buffer), so
   the folds and the window closes fall into the blocks in their real
   proportion; *chain* = ``InferenceClient.infer`` (validation and the
   fallback chain) and *chain + record* = the same with the recorder on the
   chain's answer listener, as the agent wires it. Every path cycles through
   the same 64-row slices of the baseline. Blocks of about equal length
   alternate; per call, the median of the blocks' means; ratios, the median of
   the rounds' ratios. Closed windows are collected between blocks (uploading
   is not on the serving path).
2. Bytes a day. A model with a ``[1, 32]`` input built with ``GraphBuilder``
   and a 32-column baseline (the sample baseline beside a second, shuffled
   copy of it) released with ``build_bundle``; windows recorded from
   single-row requests of fresh generated rows with their real scores and
   measured latencies, at 60 and at 600 requests a window; each encoded with
   ``encode_window`` and as JSON (``model_dump_json``). A day is 1,440 windows
   (one a minute), each with ``WIRE_OVERHEAD`` bytes of MQTT, TLS and TCP.
3. Drift for 10,000 devices x 32 features. 10,000 windows, one per device
   (100 distinct recorded windows of 1,000 rows, a fifth of them from shifted
   data, each copied under 100 device and window ids), decoded from their
   wire form and tested with ``detect_drift`` against the release's
   baseline. The baseline: the same G statistics computed for all 320,000
   device-features at once with numpy (no verdict objects, no p-values).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.inprocess import InferenceClient
from agent.runtime import TFLiteRuntime
from agent.serving.chain import Answer, FallbackChain, ModelSlot
from agent.telemetry import WindowPolicy, WindowRecorder
from firmware_images.datagen import generate
from firmware_images.tflite_writer import GraphBuilder
from fleet_server.release.bundle_builder import (
    BuiltBundle,
    BundleSpec,
    build_bundle,
    load_feature_file,
)
from protocol.drift import DriftPolicy, chi2_quantile, detect_drift
from protocol.manifest import FeatureSpec, Manifest
from protocol.window import WindowSummary, decode_window, encode_window

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
ROUNDS = 30
DEVICES = 10_000
WINDOWS_PER_DAY = 1440
DAILY_BUDGET = 2_000_000
# An MQTT 3.1.1 QoS 1 PUBLISH on "edgefleet/v1/devices/pump-0042/windows" (47),
# a TLS 1.3 record (22) and TCP/IPv4 headers with timestamps (52): 121, rounded
# up (as in tests/unit/test_window_codec.py). The PUBACK and keep-alives are not counted.
WIRE_OVERHEAD = 128
AGENT_POLICY = WindowPolicy(max_requests=1000, max_seconds=60.0)


class Bare:
    """One interpreter sized for ``rows``-row requests: the floor."""

    def __init__(self, path: Path, rows: int) -> None:
        from tflite_runtime.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        index = self.interpreter.get_input_details()[0]["index"]
        self.interpreter.resize_tensor_input(index, [rows, 16])
        self.interpreter.allocate_tensors()
        self.input = index
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        out: npt.NDArray[np.float32] = self.interpreter.get_tensor(self.output)
        return out


def sample_bundle() -> tuple[BuiltBundle, Path]:
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        (MODELS / "v2.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name="pump-health",
            version="2.0.0",
            hardware_ids=["bench"],
            feature_specs=features,
            classes=classes,
        ),
    )
    return built, MODELS / "v2.tflite"


def block(call: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - t0) / n


async def ablock(call: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        await call(i)
    return (time.perf_counter() - t0) / n


async def measure_record(rows: int, calls: dict[str, int]) -> dict[str, float]:
    built, model_path = sample_bundle()
    manifest = built.manifest
    baseline = np.load(MODELS / "baseline.npy")
    slices = [
        np.ascontiguousarray(baseline[i : i + rows]) for i in range(0, 64 * 64, 64)
    ]  # 64 different requests, cycled
    k = len(slices)
    bare = Bare(model_path, rows)
    recorder = WindowRecorder(manifest, "pump-0042", AGENT_POLICY)
    perf = time.perf_counter

    def bare_call(i: int) -> None:
        bare(slices[i % k])

    def bare_record(i: int) -> None:
        x = slices[i % k]
        t0 = perf()
        out = bare(x)
        recorder.record({"features": x}, {"scores": out}, "active", perf() - t0)

    def chain() -> FallbackChain:
        slot = ModelSlot.load(manifest, model_path, TFLiteRuntime())
        return FallbackChain(active=slot)

    plain = InferenceClient(chain())
    chain_recorder = WindowRecorder(manifest, "pump-0042", AGENT_POLICY)
    recorded_chain = chain()

    def listener(inputs: dict[str, Any], answer: Answer, seconds: float) -> None:
        chain_recorder.record(
            inputs, answer.outputs, answer.stage, seconds, model_version=answer.model_version
        )

    recorded_chain.on_answer(listener)
    recorded = InferenceClient(recorded_chain)
    inputs = [{"features": s} for s in slices]
    for i in range(50):  # warm, and the same answer on every path
        a = await recorded.infer(inputs[i % k])
        assert a.stage == "active", a.attempts
        np.testing.assert_allclose(a.outputs["scores"], bare(slices[i % k]), rtol=1e-5)
        await plain.infer(inputs[i % k])
    assert chain_recorder.requests == 50

    def drain() -> int:
        got = 0
        for r in (recorder, chain_recorder):
            while r.poll() is not None:
                got += 1
        return got

    paths: dict[str, Callable[[], Any]] = {
        "bare": lambda: block(bare_call, calls["bare"]),
        "bare_record": lambda: block(bare_record, calls["bare_record"]),
        "chain": lambda: ablock(lambda i: plain.infer(inputs[i % k]), calls["chain"]),
        "chain_record": lambda: ablock(lambda i: recorded.infer(inputs[i % k]), calls["chain"]),
    }
    times: dict[str, list[float]] = {p: [] for p in paths}
    windows = 0
    for r in range(ROUNDS):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            result = paths[name]()
            times[name].append(await result if asyncio.iscoroutine(result) else result)
            windows += drain()
    f = {p: statistics.median(v) for p, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    f["bare_record_ratio"] = ratio("bare_record", "bare")
    f["chain_ratio"] = ratio("chain", "bare")
    f["chain_record_ratio"] = ratio("chain_record", "bare")
    f["chain_record_vs_chain"] = ratio("chain_record", "chain")
    f["windows"] = windows
    return f


# -- 32 features ------------------------------------------------------------------


def model_32(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    g = GraphBuilder("32-feature benchmark model")
    x = g.add_input("features", [1, 32])
    h = g.relu(g.fully_connected(x, rng.normal(size=(24, 32)) * 0.05, np.zeros(24), "h"), "h/relu")
    logits = g.fully_connected(h, rng.normal(size=(4, 24)) * 0.3, np.zeros(4), "logits")
    g.mark_output(g.softmax(logits, "scores"))
    return g.to_bytes()


def widen(rows: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.float32]:
    """32 columns of real-looking data: the rows beside a shuffled copy of themselves."""
    other = rows[np.random.default_rng(seed).permutation(rows.shape[0])]
    return np.ascontiguousarray(np.concatenate([rows, other], axis=1), dtype=np.float32)


def bundle_32() -> tuple[BuiltBundle, bytes]:
    features, classes = load_feature_file(MODELS / "features.json")
    specs = [*features] + [
        FeatureSpec.model_validate({**f.model_dump(), "name": f"{f.name}_b"}) for f in features
    ]
    model = model_32()
    built = build_bundle(
        model,
        {"features": widen(np.load(MODELS / "baseline.npy"), 1)},
        BundleSpec(
            name="pump-health-32",
            version="1.0.0",
            hardware_ids=["bench"],
            feature_specs=specs,
            classes=classes,
        ),
    )
    return built, model


class Model32:
    def __init__(self, model: bytes) -> None:
        from tflite_runtime.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=model, num_threads=1)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.rows = 0

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if x.shape[0] != self.rows:
            self.interpreter.resize_tensor_input(self.input, list(x.shape))
            self.interpreter.allocate_tensors()
            self.rows = x.shape[0]
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output))


def record_windows(
    manifest: Manifest,
    model: Model32,
    requests: int,
    rows_per_request: int,
    count: int,
    seed: int,
    shift: float = 0.0,
) -> list[WindowSummary]:
    """``count`` windows of ``requests`` requests each, fresh generated rows, real scores."""
    recorder = WindowRecorder(manifest, "pump-0042", WindowPolicy(max_requests=requests))
    out: list[WindowSummary] = []
    rng = np.random.default_rng(seed)
    for c in range(count):
        X, _ = generate(requests * rows_per_request, rng)
        X = widen(X, seed * 1000 + c)
        if shift:
            X[:, :4] *= 1.0 + shift  # a few features drift
        for i in range(requests):
            x = X[i * rows_per_request : (i + 1) * rows_per_request]
            t0 = time.perf_counter()
            scores = model(x)
            recorder.record({"features": x}, {"scores": scores}, "active", time.perf_counter() - t0)
        window = recorder.poll()
        assert window is not None and window.requests == requests
        out.append(window)
    return out


def measure_bytes(manifest: Manifest, model: Model32) -> dict[str, dict[str, float]]:
    result = {}
    for requests in (60, 600):
        windows = record_windows(manifest, model, requests, 1, 20, seed=requests)
        binary = [len(encode_window(w)) for w in windows]
        json = [len(w.model_dump_json().encode()) for w in windows]
        for w in windows[:3]:  # the codec keeps counts exactly (moments to rounding)
            got = decode_window(encode_window(w))
            assert [f.counts for f in got.features] == [f.counts for f in w.features]
            assert (got.requests, got.scores) == (w.requests, w.scores)
        b, j = statistics.median(binary), statistics.median(json)
        result[str(requests)] = {
            "binary": b,
            "binary_max": max(binary),
            "json": j,
            "ratio": b / j,
            "day": (max(binary) + WIRE_OVERHEAD) * WINDOWS_PER_DAY,
            "day_json": (j + WIRE_OVERHEAD) * WINDOWS_PER_DAY,
        }
    return result


def g_all(
    counts: npt.NDArray[np.float64], base: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """G statistics of ``counts`` [devices, features, bins] against ``base`` [features, bins]."""
    b = np.broadcast_to(base, counts.shape)
    n_o = counts.sum(axis=2, keepdims=True)
    n_b = b.sum(axis=2, keepdims=True)
    column = (counts + b) / (n_o + n_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        term_o = np.where(counts > 0, counts * np.log(counts / (n_o * column)), 0.0)
        term_b = np.where(b > 0, b * np.log(b / (n_b * column)), 0.0)
    return 2.0 * (term_o + term_b).sum(axis=2)


def measure_drift(manifest: Manifest, model: Model32) -> dict[str, float]:
    distinct = [
        *record_windows(manifest, model, 10, 100, 80, seed=7),
        *record_windows(manifest, model, 10, 100, 20, seed=8, shift=0.15),
    ]
    wire = []
    for d in range(DEVICES):
        w = distinct[d % len(distinct)]
        wire.append(
            encode_window(
                w.model_copy(update={"device_id": f"pump-{d:05d}", "window_id": uuid.uuid4().hex})
            )
        )
    baseline = manifest.baseline
    names = [f.name for f in manifest.features]
    policy = DriftPolicy()

    t0 = time.perf_counter()
    windows = [decode_window(b) for b in wire]
    decode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = [detect_drift(baseline, w, policy, names) for w in windows]
    detect_s = time.perf_counter() - t0
    verdicts: dict[str, int] = {}
    for r in results:
        for fd in r:
            verdicts[fd.verdict] = verdicts.get(fd.verdict, 0) + 1

    # The floor: the same G statistics for every device-feature at once, with numpy.
    widest = max(len(f.summary.counts) for f in baseline.features)
    base = np.zeros((len(baseline.features), widest))
    for j, f in enumerate(baseline.features):
        base[j, : len(f.summary.counts)] = f.summary.counts
    t0 = time.perf_counter()
    counts = np.zeros((DEVICES, len(baseline.features), widest))
    for d, w in enumerate(windows):
        for j, f in enumerate(w.features):
            counts[d, j, : len(f.counts)] = f.counts
    g = g_all(counts, base)
    thresholds = chi2_quantile(1.0 - policy.false_alarm_rate, widest - 1)
    flagged = int((g > thresholds).sum())
    floor_s = time.perf_counter() - t0
    # The floor agrees with detect_drift on the statistic.
    np.testing.assert_allclose(g[0], [fd.statistic for fd in results[0]], rtol=1e-9, atol=1e-9)
    cells = DEVICES * len(baseline.features)
    return {
        "decode_s": decode_s,
        "detect_s": detect_s,
        "per_cell_us": detect_s / cells * 1e6,
        "floor_s": floor_s,
        "ratio": detect_s / floor_s,
        "drift": verdicts.get("drift", 0),
        "no_drift": verdicts.get("no_drift", 0),
        "not_enough_data": verdicts.get("not_enough_data", 0),
        "floor_flagged": flagged,
        "cells": cells,
    }


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["record_64"] = asyncio.run(
        measure_record(64, {"bare": 1000, "bare_record": 1000, "chain": 500})
    )
    results["record_1"] = asyncio.run(
        measure_record(1, {"bare": 2000, "bare_record": 1000, "chain": 200})
    )
    built, model = bundle_32()
    m32 = Model32(model)
    results["bytes"] = measure_bytes(built.manifest, m32)
    results["drift"] = measure_drift(built.manifest, m32)
    return results


def main() -> None:
    t0 = time.perf_counter()
    r = run()
    print("record cost: median over alternating rounds of a block's mean call; ratio, median of")
    print(f"the rounds' ratios ({ROUNDS} rounds, agent window policy 1,000 requests / 60 s)")
    for key, label in (("record_64", "64-row requests"), ("record_1", "1-row requests")):
        f = r[key]
        print(f"  v2, {label} ({int(f['windows'])} windows closed meanwhile)")
        print(f"    bare interpreter call          {f['bare'] * 1e6:8.1f} µs   1.00x")
        print(
            f"    bare + WindowRecorder.record   {f['bare_record'] * 1e6:8.1f} µs "
            f"{f['bare_record_ratio']:6.2f}x  (+{(f['bare_record_ratio'] - 1):.0%})"
        )
        print(
            f"    in-process chain               {f['chain'] * 1e6:8.1f} µs "
            f"{f['chain_ratio']:6.2f}x"
        )
        print(
            f"    in-process chain + record      {f['chain_record'] * 1e6:8.1f} µs "
            f"{f['chain_record_ratio']:6.2f}x  ({f['chain_record_vs_chain']:.2f}x the chain)"
        )
    print(
        "bytes per window, 32 features, single-row requests (median of 20 windows; day = max "
        f"window + {WIRE_OVERHEAD} B wire overhead, x {WINDOWS_PER_DAY})"
    )
    for req, f in r["bytes"].items():
        print(
            f"  {req:>4} requests/window: binary {f['binary']:.0f} B (max {f['binary_max']:.0f}), "
            f"JSON {f['json']:.0f} B, ratio {f['ratio']:.3f}; a day {f['day'] / 1e6:.3f} MB "
            f"binary vs {f['day_json'] / 1e6:.3f} MB JSON (budget {DAILY_BUDGET / 1e6:.1f} MB)"
        )
    d = r["drift"]
    print(f"drift, {DEVICES:,} devices x 32 features ({d['cells']:,} tests)")
    print(f"  decode_window x {DEVICES:,}          {d['decode_s']:.3f} s")
    print(
        f"  detect_drift x {DEVICES:,}           {d['detect_s']:.3f} s "
        f"({d['per_cell_us']:.1f} µs per device-feature), {d['ratio']:.0f}x the numpy floor"
    )
    print(f"  numpy G statistics, all at once  {d['floor_s']:.3f} s")
    print(
        f"  verdicts: drift {d['drift']}, no_drift {d['no_drift']}, "
        f"not_enough_data {d['not_enough_data']}"
    )
    print(f"  (run took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
