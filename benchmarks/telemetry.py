"""Telemetry: the window summary's cost per inference, bytes a day, and drift over a fleet.

Four measurements, each against a baseline measured in the same run:

1. Record cost. For the sample model ``v2.tflite``, requests of 64 rows
   (batching) and of 1 row: *bare* = ``set_tensor``/``invoke``/``get_tensor``
   on an interpreter of its own (one thread) sized for the batch; *bare,
   timed* = the same between two ``perf_counter`` readings, as a caller of
   ``record`` times it; *a record doing nothing* = the timed call and a no-op
   ``record`` of the same arguments; *bare + record* = the timed call and then
   ``WindowRecorder.record`` of its inputs, scores and latency, in two modes:
   *exact* (``max_overhead=None``, every request summarised) and *bounded*
   (the agent's default ``max_overhead=0.2``, a sample summarised); windows of
   1,000 requests or 60 s and a 256-row buffer, so the folds and the window
   closes fall into the blocks in their real proportion. *chain* =
   ``InferenceClient.infer`` (validation and the fallback chain) and *chain +
   record* = the same with a recorder of each mode on the chain's answer
   listener, as the agent wires it. Every path cycles through the same 64-row
   slices of the baseline. Blocks of about equal length alternate; per call,
   the median of the blocks' means; ratios, the median of the rounds' ratios.
   Closed windows are collected between blocks (building the summary,
   encoding and uploading are not on the serving path; ``poll`` and
   ``encode_window`` are timed there) and say how many of their requests were
   summarised.
2. Bytes a day. A model with a ``[1, 32]`` input built with ``GraphBuilder``
   and a 32-column baseline (the sample baseline beside a second, shuffled
   copy of it) released with ``build_bundle``; windows recorded from
   single-row requests of fresh generated rows with their real scores and
   measured latencies, at 60 and at 600 requests a window; each encoded with
   ``encode_window`` and as JSON (``model_dump_json``). A day is 1,440 windows
   (one a minute), each with ``WIRE_OVERHEAD`` bytes of MQTT, TLS and TCP.
3. Record alone per row. ``record`` alone (every request summarised) over
   10,000 single-row requests (windows of 1,000), with a 64-row and a 256-row
   buffer, and per row over 64-row requests, beside the bare single-row call: the work is
   vectorised over the rows only if a row of a 64-row request costs well
   under a single-row request. Best of five.
4. Drift for 10,000 devices x 32 features. 10,000 windows, one per device
   (100 distinct recorded windows of 1,000 rows, a fifth of them from shifted
   data, each copied under 100 device and window ids), decoded from their
   wire form and tested against the release's baseline three ways: the old
   path (``feature_drift`` one feature at a time, as ``detect_drift`` was),
   ``detect_drift`` (all features of a window in one numpy pass) window by
   window, and ``detect_drift_many`` (every window at once, arrays). The
   baseline: the same G statistics computed for all 320,000 device-features
   at once with numpy (no verdict objects, no p-values). Rounds alternate
   their order; per path the median round, ratios the median of the rounds'.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.inprocess import InferenceClient
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
from model_runtime import LoadedModel, TFLiteRuntime
from protocol.drift.detect import detect_drift, detect_drift_many, feature_drift
from protocol.drift.distributions import chi2_quantile
from protocol.drift.model import DriftPolicy, FeatureDrift
from protocol.manifest import Baseline, FeatureSpec, Manifest
from protocol.window import WindowSummary, decode_window, encode_window

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
ROUNDS = 30
DEVICES = 10_000
WINDOWS_PER_DAY = 1440
DAILY_BUDGET = 2_000_000
# An MQTT 3.1.1 QoS 1 PUBLISH on "edgefleet/v1/fleet-3c5a0e9d21b7/devices/pump-0042/windows"
# (64, a default namespace), a TLS 1.3 record (22) and TCP/IPv4 headers with timestamps
# (52): 138, rounded up (as in tests/unit/test_window_codec.py). The PUBACK and
# keep-alives are not counted.
WIRE_OVERHEAD = 144
# The agent's defaults: summaries bounded to 20 % of inference; and every request summarised.
AGENT_POLICY = WindowPolicy(max_requests=1000, max_seconds=60.0, max_overhead=0.2)
EXACT_POLICY = WindowPolicy(max_requests=1000, max_seconds=60.0, max_overhead=None)


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


class NullRecorder:
    """A recorder that does nothing: the caller's share of recording (timing, the dicts)."""

    def record(self, inputs: Any, outputs: Any, stage: str, latency_s: float) -> None:
        pass


async def measure_record(rows: int, calls: dict[str, int]) -> dict[str, float]:
    built, model_path = sample_bundle()
    manifest = built.manifest
    baseline = np.load(MODELS / "baseline.npy")
    slices = [
        np.ascontiguousarray(baseline[i : i + rows]) for i in range(0, 64 * 64, 64)
    ]  # 64 different requests, cycled
    k = len(slices)
    bare = Bare(model_path, rows)
    perf = time.perf_counter
    modes = {"exact": EXACT_POLICY, "bounded": AGENT_POLICY}
    recorders = {m: WindowRecorder(manifest, "pump-0042", p) for m, p in modes.items()}

    def bare_call(i: int) -> None:
        bare(slices[i % k])

    def bare_timed(i: int) -> float:
        # The bare call timed as record's caller times it, the latency unused.
        x = slices[i % k]
        t0 = perf()
        bare(x)
        return perf() - t0

    def bare_record(recorder: WindowRecorder | NullRecorder) -> Callable[[int], None]:
        def call(i: int) -> None:
            x = slices[i % k]
            t0 = perf()
            out = bare(x)
            recorder.record({"features": x}, {"scores": out}, "active", perf() - t0)

        return call

    def chain() -> FallbackChain:
        slot = ModelSlot.load(manifest, model_path, TFLiteRuntime())
        return FallbackChain(active=slot)

    def recorded_client(recorder: WindowRecorder) -> InferenceClient:
        def listener(inputs: dict[str, Any], answer: Answer, seconds: float) -> None:
            recorder.record(
                inputs, answer.outputs, answer.stage, seconds, model_version=answer.model_version
            )

        recorded_chain = chain()
        recorded_chain.on_answer(listener)
        return InferenceClient(recorded_chain)

    plain = InferenceClient(chain())
    chain_recorders = {m: WindowRecorder(manifest, "pump-0042", p) for m, p in modes.items()}
    clients = {m: recorded_client(r) for m, r in chain_recorders.items()}
    inputs = [{"features": s} for s in slices]
    for i in range(50):  # warm, and the same answer on every path
        for client in clients.values():
            a = await client.infer(inputs[i % k])
            assert a.stage == "active", a.attempts
            np.testing.assert_allclose(a.outputs["scores"], bare(slices[i % k]), rtol=1e-5)
        await plain.infer(inputs[i % k])
    assert all(r.requests == 50 for r in chain_recorders.values())

    # What the closed windows say (requests, how many were summarised), and
    # what handing them out (poll) and encoding them cost, off the serving path.
    seen: dict[str, list[float]] = {}

    def drain() -> None:
        for label, group in (("bare", recorders), ("chain", chain_recorders)):
            for mode, r in group.items():
                counts = seen.setdefault(f"{label}_{mode}", [0, 0, 0, 0.0, 0.0])
                while True:
                    t0 = perf()
                    w = r.poll()
                    t1 = perf()
                    if w is None:
                        break
                    encode_window(w)
                    counts[0] += 1
                    counts[1] += w.requests
                    counts[2] += w.summarised_requests
                    counts[3] += t1 - t0
                    counts[4] += perf() - t1

    def chain_block(client: InferenceClient) -> Callable[[], Any]:
        return lambda: ablock(lambda i: client.infer(inputs[i % k]), calls["chain"])

    paths: dict[str, Callable[[], Any]] = {
        "bare": functools.partial(block, bare_call, calls["bare"]),
        "bare_timed": functools.partial(block, bare_timed, calls["bare"]),
        "bare_null": functools.partial(block, bare_record(NullRecorder()), calls["bare"]),
        **{
            f"bare_{m}": functools.partial(block, bare_record(r), calls[f"bare_{m}"])
            for m, r in recorders.items()
        },
        "chain": chain_block(plain),
        **{f"chain_{m}": chain_block(c) for m, c in clients.items()},
    }
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(ROUNDS):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            result = paths[name]()
            times[name].append(await result if asyncio.iscoroutine(result) else result)
            drain()
    f = {p: statistics.median(v) for p, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    for name in paths:
        if name != "bare":
            f[f"{name}_ratio"] = ratio(name, "bare")
    for m in modes:
        f[f"bare_{m}_vs_timed"] = ratio(f"bare_{m}", "bare_timed")
        f[f"bare_{m}_vs_null"] = ratio(f"bare_{m}", "bare_null")
        f[f"chain_{m}_vs_chain"] = ratio(f"chain_{m}", "chain")
        f[f"bare_{m}_rate"] = recorders[m].sample_rate
        f[f"chain_{m}_rate"] = chain_recorders[m].sample_rate
    for key, (windows, requests, summarised, poll_s, encode_s) in seen.items():
        f[f"{key}_windows"] = windows
        f[f"{key}_share"] = summarised / requests if requests else 1.0
        f[f"{key}_poll"] = poll_s / requests if requests else 0.0
        f[f"{key}_encode"] = encode_s / requests if requests else 0.0
    return f


def measure_rows(repeat: int = 5) -> dict[str, float]:
    """Seconds ``record`` alone takes per single-row request, and per row of 64-row requests."""
    built, model_path = sample_bundle()
    manifest = built.manifest
    baseline = np.load(MODELS / "baseline.npy")
    scores = np.array(Bare(model_path, len(baseline))(baseline))
    singles = [(baseline[i : i + 1], scores[i : i + 1]) for i in range(len(baseline))] * 2
    batches = [(baseline[i : i + 64], scores[i : i + 64]) for i in range(0, 4992, 64)]
    bare = Bare(model_path, 1)

    def best(run: Callable[[], object], per: int) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times) / per

    def recording(requests: list[Any], buffer_rows: int, max_requests: int) -> Callable[[], None]:
        policy = WindowPolicy(max_overhead=None, max_requests=max_requests, buffer_rows=buffer_rows)
        recorder = WindowRecorder(manifest, "pump-0042", policy)

        def run() -> None:
            for x, y in requests:
                recorder.record({"features": x}, {"scores": y}, "active", 0.0005)
            recorder.close_window()
            while recorder.poll() is not None:
                pass

        return run

    f = {
        "bare": best(lambda: [bare(x) for x, _ in singles], len(singles)),
        "single_64": best(recording(singles, 64, 1000), len(singles)),
        "single_256": best(recording(singles, 256, 1000), len(singles)),
        "batched_row": best(recording(batches, 256, 10**6), 64 * len(batches)),
    }
    f["batched_share"] = f["batched_row"] / f["single_256"]
    return f


def print_rows(f: dict[str, float]) -> None:
    print("record alone, every request summarised (best of five; µs):")
    print(
        f"  bare single-row call {f['bare'] * 1e6:.2f}; record per single-row request "
        f"{f['single_64'] * 1e6:.2f} (buffer_rows=64), {f['single_256'] * 1e6:.2f} "
        f"(buffer_rows=256); per row of 64-row requests {f['batched_row'] * 1e6:.2f} "
        f"({f['batched_share']:.2f}x a single-row request)"
    )


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


def record_windows(
    manifest: Manifest,
    model: LoadedModel,
    requests: int,
    rows_per_request: int,
    count: int,
    seed: int,
    shift: float = 0.0,
) -> list[WindowSummary]:
    """``count`` windows of ``requests`` requests each, fresh generated rows, real scores."""
    # Every request summarised: these windows stand for what a device uploads at full rate.
    policy = WindowPolicy(max_requests=requests, max_overhead=None)
    recorder = WindowRecorder(manifest, "pump-0042", policy)
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
            scores = model.run({"features": x})["scores"]
            recorder.record({"features": x}, {"scores": scores}, "active", time.perf_counter() - t0)
        window = recorder.poll()
        assert window is not None and window.requests == requests
        out.append(window)
    return out


def measure_bytes(manifest: Manifest, model: LoadedModel) -> dict[str, dict[str, float]]:
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


DRIFT_ROUNDS = 3


def detect_drift_per_feature(
    baseline: Baseline, window: WindowSummary, policy: DriftPolicy, names: list[str]
) -> list[FeatureDrift]:
    """``detect_drift`` as it was: ``feature_drift`` one feature at a time."""
    return [
        feature_drift(b.summary, o, policy, feature=j, name=names[j])
        for j, (b, o) in enumerate(zip(baseline.features, window.features, strict=True))
    ]


def measure_drift(manifest: Manifest, model: LoadedModel) -> dict[str, float]:
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

    # The floor: the same G statistics for every device-feature at once, with numpy.
    widest = max(len(f.summary.counts) for f in baseline.features)
    base = np.zeros((len(baseline.features), widest))
    for j, f in enumerate(baseline.features):
        base[j, : len(f.summary.counts)] = f.summary.counts
    threshold = chi2_quantile(1.0 - policy.false_alarm_rate, widest - 1)

    def floor() -> tuple[npt.NDArray[np.float64], int]:
        counts = np.zeros((DEVICES, len(baseline.features), widest))
        for d, w in enumerate(windows):
            for j, f in enumerate(w.features):
                counts[d, j, : len(f.counts)] = f.counts
        g = g_all(counts, base)
        return g, int((g > threshold).sum())

    paths: dict[str, Callable[[], Any]] = {
        "per_feature": lambda: [
            detect_drift_per_feature(baseline, w, policy, names) for w in windows
        ],
        "detect": lambda: [detect_drift(baseline, w, policy, names) for w in windows],
        "many": lambda: detect_drift_many(baseline, windows, policy),
        "floor": floor,
    }
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(DRIFT_ROUNDS):
        for name in list(paths) if r % 2 == 0 else list(reversed(paths)):
            t0 = time.perf_counter()
            answer = paths[name]()
            times[name].append(time.perf_counter() - t0)
            # Freed off the clock: no path runs while another's 320,000 objects are alive.
            del answer

    # Every path gives the same answer on every distinct window (the first 100):
    # verdicts exactly, statistics to rounding.
    sample = windows[: len(distinct)]
    old = [detect_drift_per_feature(baseline, w, policy, names) for w in sample]
    new = [detect_drift(baseline, w, policy, names) for w in sample]
    many = detect_drift_many(baseline, windows, policy)
    g, flagged = floor()
    for field in ("statistic", "psi", "js", "p_value"):
        np.testing.assert_allclose(
            [getattr(fd, field) for r in new for fd in r],
            [getattr(fd, field) for r in old for fd in r],
            rtol=1e-9,
            atol=1e-12,
        )
    assert [fd.verdict for r in new for fd in r] == [fd.verdict for r in old for fd in r]
    assert many.verdict[: len(sample)].tolist() == [[fd.verdict for fd in r] for r in new]
    np.testing.assert_allclose(many.statistic, g, rtol=1e-9, atol=1e-9)
    cells = DEVICES * len(baseline.features)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    result: dict[str, float] = {"decode_s": decode_s, "cells": cells, "floor_flagged": flagged}
    for name, v in times.items():
        result[f"{name}_s"] = statistics.median(v)
        result[f"{name}_us"] = result[f"{name}_s"] / cells * 1e6
        result[f"{name}_ratio"] = ratio(name, "floor")
    result["detect_speedup"] = ratio("per_feature", "detect")
    result["many_speedup"] = ratio("per_feature", "many")
    for verdict in ("drift", "no_drift", "not_enough_data"):
        result[verdict] = int((many.verdict == verdict).sum())
    return result


def print_drift(d: dict[str, float]) -> None:
    print(
        f"drift, {DEVICES:,} devices x 32 features ({d['cells']:,.0f} tests): median of "
        f"{DRIFT_ROUNDS} rounds in alternating order; ratios, median of the rounds' ratios"
    )
    print(f"  decode_window x {DEVICES:,}              {d['decode_s']:7.3f} s")
    for key, label in (
        ("per_feature", f"feature_drift x {d['cells']:,.0f} (old)"),
        ("detect", f"detect_drift x {DEVICES:,}"),
        ("many", "detect_drift_many, all at once"),
        ("floor", "numpy G statistics, all at once"),
    ):
        print(
            f"  {label:34} {d[f'{key}_s']:7.3f} s  {d[f'{key}_us']:6.2f} µs a test  "
            f"{d[f'{key}_ratio']:5.1f}x the floor"
        )
    print(
        f"  against the old path: detect_drift {d['detect_speedup']:.1f}x faster, "
        f"detect_drift_many {d['many_speedup']:.1f}x"
    )
    print(
        f"  verdicts (every path): drift {d['drift']:,.0f}, no_drift {d['no_drift']:,.0f}, "
        f"not_enough_data {d['not_enough_data']:,.0f}"
    )


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["record_64"] = asyncio.run(
        measure_record(64, {"bare": 1000, "bare_exact": 1000, "bare_bounded": 2000, "chain": 500})
    )
    results["record_1"] = asyncio.run(
        measure_record(1, {"bare": 2000, "bare_exact": 1000, "bare_bounded": 2000, "chain": 200})
    )
    results["rows"] = measure_rows()
    built, model = bundle_32()
    m32 = TFLiteRuntime().load(model)
    results["bytes"] = measure_bytes(built.manifest, m32)
    results["drift"] = measure_drift(built.manifest, m32)
    return results


def print_record_cost(r: dict[str, Any]) -> None:
    print("record cost: median over alternating rounds of a block's mean call; ratio, median of")
    print(f"the rounds' ratios ({ROUNDS} rounds, windows of 1,000 requests / 60 s)")
    for key, label in (("record_64", "64-row requests"), ("record_1", "1-row requests")):
        f = r[key]
        print(f"  v2, {label}")
        print(f"    bare interpreter call             {f['bare'] * 1e6:8.1f} µs   1.00x")
        print(
            f"    bare, timed as record's caller    {f['bare_timed'] * 1e6:8.1f} µs "
            f"{f['bare_timed_ratio']:6.2f}x"
        )
        print(
            f"    bare + a record() doing nothing   {f['bare_null'] * 1e6:8.1f} µs "
            f"{f['bare_null_ratio']:6.2f}x"
        )
        for mode, what in (("exact", "every request"), ("bounded", "max_overhead 0.2")):
            share = f[f"bare_{mode}_share"]
            print(
                f"    bare + record, {what:17} {f[f'bare_{mode}'] * 1e6:8.1f} µs "
                f"{f[f'bare_{mode}_ratio']:6.2f}x  (+{f[f'bare_{mode}_ratio'] - 1:.0%}; "
                f"+{f[f'bare_{mode}_vs_timed'] - 1:.0%} over the timed call, "
                f"+{f[f'bare_{mode}_vs_null'] - 1:.0%} over a record() doing nothing; summarised "
                f"{share:.1%} of requests, p {f[f'bare_{mode}_rate']:.3f} at the end, "
                f"{f[f'bare_{mode}_windows']:.0f} windows; per request off the serving path: "
                f"poll {f[f'bare_{mode}_poll'] * 1e6:.2f} µs, "
                f"encode {f[f'bare_{mode}_encode'] * 1e6:.2f} µs)"
            )
        chain = f"{f['chain'] * 1e6:8.1f} µs {f['chain_ratio']:6.2f}x"
        print(f"    in-process chain                  {chain}")
        for mode, what in (("exact", "every request"), ("bounded", "max_overhead 0.2")):
            print(
                f"    chain + record, {what:16} {f[f'chain_{mode}'] * 1e6:8.1f} µs "
                f"{f[f'chain_{mode}_ratio']:6.2f}x  ({f[f'chain_{mode}_vs_chain']:.2f}x the chain; "
                f"summarised {f[f'chain_{mode}_share']:.1%})"
            )


def main() -> None:
    t0 = time.perf_counter()
    r = run()
    print_record_cost(r)
    print_rows(r["rows"])
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
    print_drift(r["drift"])
    print(f"  (run took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
