"""The agent's local inference paths against a bare interpreter call, in one run.

Two models: the small sample model ``v2.tflite`` and a model built here that
takes about 10 ms per single-row inference on this machine (its depth is
calibrated at the start of the run). Each round times, on the same ``[1, 16]``
row from the baseline:

- bare: ``set_tensor`` / ``invoke`` / ``get_tensor`` on an interpreter of its
  own, one thread like the agent's (the floor);
- in-process: ``InferenceClient.infer``, i.e. the manifest's input validation
  and the fallback chain, awaited from a running event loop one request at a
  time;
- HTTP: ``POST /v2/models/{name}/infer`` to a ``LocalApi`` in another process
  (so client and server do not share a GIL), over one keep-alive connection
  with ``http.client`` — the stdlib client urllib3 is built on — the JSON body
  encoded and the answer decoded per request as an app would.

Both bundles are built with the release bundle builder, so validation runs
against a real manifest. A round times a block of calls per path, blocks of
about equal length alternating so all paths see the same machine state; the
figure per path is the median over rounds of the mean call in its block, and
its ratio the median of the rounds' ratios to bare. CPU time is reported
beside wall time (of the calling process, plus the API process's for HTTP):
it does not count waiting for a CPU that another process holds, so it is the
steadier figure on a shared machine; the share of the CPUs other processes
used during the run is printed too.

The agent's own metrics (:mod:`agent.metrics`): for the small model each round
also times the in-process path with the chain counting into the agent's
``InferenceMetrics`` (what ``edge-agent run`` does), and with a counter built
on prometheus-client's ``Counter`` and ``Histogram`` instead; each against the
chain without metrics, block by block.

Where the time goes: for the small model each round also times the two parts
of the in-process path that can be called alone (input validation, and the
agent's ``TFLiteModel.run``); for the 10 ms model, a second chain runs the
model on the event loop (``ChainConfig(inline_below_s=1.0)``) instead of in a
worker thread, which is what the agent does by default for a model that slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.inprocess import InferenceClient
from agent.metrics import LATENCY_BUCKETS_S, InferenceMetrics
from agent.serving.chain import ChainConfig, FallbackChain, ModelSlot, RequestCounter
from agent.serving.validation import InputContract
from firmware_images.tflite_writer import GraphBuilder
from fleet_server.release.bundle_builder import (
    BuiltBundle,
    BundleSpec,
    build_bundle,
    load_feature_file,
)
from model_runtime import TFLiteRuntime

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
ROUNDS = 25
METRICS_ROUNDS = 600
HEAVY_TARGET_S = 0.010
# Rows the heavy model spreads its input over; each layer is a [ROWS, WIDTH] x
# [WIDTH, WIDTH] product, so its cost is compute, not memory bandwidth.
HEAVY_ROWS, HEAVY_WIDTH = 256, 256


def heavy_model(layers: int) -> bytes:
    """A real model: the row spread over 256 rows, ``layers`` 256-wide dense layers, softmax."""
    rng = np.random.default_rng(0)
    rows, width = HEAVY_ROWS, HEAVY_WIDTH
    g = GraphBuilder(f"benchmark model, {layers} dense layers over {rows} rows")
    x = g.add_input("features", [1, 16], dynamic_batch=False)
    spread = rng.normal(size=(rows * 16, 16)).astype(np.float32) * 1e-3
    h = g.reshape(g.fully_connected(x, spread, np.zeros(rows * 16), "spread"), [rows, 16], "rows")
    h = g.relu(g.fully_connected(h, rng.normal(size=(width, 16)), np.zeros(width), "in"), "in/relu")
    scale = np.sqrt(2.0 / width)
    for i in range(layers):
        w = rng.normal(size=(width, width)) * scale
        h = g.relu(g.fully_connected(h, w, np.zeros(width), f"dense{i}"), f"dense{i}/relu")
    h = g.fully_connected(h, rng.normal(size=(4, width)) * scale, np.zeros(4), "narrow")
    h = g.reshape(h, [1, rows * 4], "gather")
    logits = g.fully_connected(h, rng.normal(size=(4, rows * 4)) * 0.03, np.zeros(4), "logits")
    g.mark_output(g.softmax(logits, "scores"))
    return g.to_bytes()


class BareCall:
    """The floor: one interpreter, the three calls an app would make itself."""

    def __init__(self, path: Path) -> None:
        from tflite_runtime.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        out: npt.NDArray[np.float32] = self.interpreter.get_tensor(self.output)
        return out


class OtherLoad:
    """The share of the machine's CPU time that other processes used since construction.

    A benchmark cannot keep other work off a shared machine; it can say how much there was.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        total, idle = sum(ticks) / hz, (ticks[3] + ticks[4]) / hz
        own = sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )
        return total, total - idle, own

    def share(self) -> float:
        (t0, b0, o0), (t1, b1, o1) = self._start, self._sample()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0)) if t1 > t0 else 0.0


def block_mean(call: Callable[[], object], n: int) -> tuple[float, float]:
    """Mean wall time and mean CPU time of this process (all its threads) per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        call()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def async_block_mean(call: Callable[[], Any], n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await call()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def calibrated_layers(tmp: Path, x: npt.NDArray[np.float32]) -> int:
    """How many dense layers make the heavy model take HEAVY_TARGET_S per row here."""
    timings = {}
    for layers in (4, 16):
        path = tmp / f"probe-{layers}.tflite"
        path.write_bytes(heavy_model(layers))
        bare = BareCall(path)
        # The fastest of several calls: the cost without disturbance from other processes.
        timings[layers] = min(block_mean(partial(bare, x), 1)[0] for _ in range(12))
    per_layer = (timings[16] - timings[4]) / 12
    fixed = timings[4] - 4 * per_layer
    return max(1, round((HEAVY_TARGET_S - fixed) / per_layer))


@dataclass
class Case:
    """One model under test: its bundle, and calls per block for each path.

    Blocks last about as long on every path, so a disturbance from outside
    the benchmark weighs on each path alike.
    """

    name: str
    built: BuiltBundle
    bundle_path: Path
    model_path: Path
    calls: dict[str, int]
    rounds: int

    def chain(
        self, config: ChainConfig | None = None, counter: RequestCounter | None = None
    ) -> FallbackChain:
        slot = ModelSlot.load(self.built.manifest, self.model_path, TFLiteRuntime())
        return FallbackChain(active=slot, config=config, counter=counter)


class ClientLibraryCounter:
    """The alternative to ``InferenceMetrics``: prometheus-client's own Counter and Histogram.

    Children are looked up once, so a request pays only ``inc`` and ``observe``.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        registry = CollectorRegistry()
        requests = Counter("r", "requests", ["stage", "outcome"], registry=registry)
        latency = Histogram("d", "seconds", ["stage"], buckets=LATENCY_BUCKETS_S, registry=registry)
        stages = ("active", "previous", "cloud", "safe_default")
        self._ok = {s: requests.labels(s, "ok") for s in stages}
        self._seconds = {s: latency.labels(s) for s in stages}
        self._refused = {o: requests.labels("none", o) for o in ("client_error", "unavailable")}

    def answered(self, stage: str, seconds: float) -> None:
        self._ok[stage].inc()
        self._seconds[stage].observe(seconds)

    def refused(self, outcome: str) -> None:
        self._refused[outcome].inc()


def build_case(
    tmp: Path,
    name: str,
    model: bytes,
    baseline: npt.NDArray[np.float32],
    calls: dict[str, int],
    rounds: int,
) -> Case:
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        model,
        {"features": baseline},
        BundleSpec(
            name=name,
            version="1.0.0",
            hardware_ids=["bench"],
            feature_specs=features,
            classes=classes,
        ),
    )
    bundle_path = tmp / f"{name}.bundle"
    built.write(bundle_path)
    model_path = tmp / f"{name}.tflite"
    model_path.write_bytes(model)
    return Case(name, built, bundle_path, model_path, calls, rounds)


@dataclass
class ApiProcess:
    """A ``LocalApi`` serving one bundle in a process of its own."""

    proc: subprocess.Popen[str]
    port: int

    def cpu_s(self) -> float:
        """CPU time of all the process's threads so far, from the scheduler (ns resolution)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9


@contextmanager
def api_process(bundle: Path) -> Iterator[ApiProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.agent_inference", "--serve", str(bundle)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the API process exited with {proc.wait()}")
        yield ApiProcess(proc, int(line))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def serve(bundle: Path) -> None:
    """Serve one bundle's model on a free loopback port; print the port; stop on SIGTERM."""
    from agent.api.http import LocalApi
    from protocol.bundle import read_bundle

    with bundle.open("rb") as f:
        manifest, members = read_bundle(f)

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / manifest.model_file
            path.write_bytes(members[manifest.model_file])
            chain = FallbackChain(active=ModelSlot.load(manifest, path, TFLiteRuntime()))
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            async with LocalApi(chain, "127.0.0.1", 0) as api:
                print(api.port, flush=True)
                await stop.wait()

    asyncio.run(main())


class HttpClient:
    """One keep-alive connection; encodes the request and decodes the answer each call."""

    def __init__(self, port: int, model: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.path = f"/v2/models/{model}/infer"
        self.headers = {"Content-Type": "application/json"}

    def __call__(self, row: list[float]) -> list[float]:
        body = {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32", "data": row}]}
        self.conn.request("POST", self.path, json.dumps(body).encode(), self.headers)
        response = self.conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        scores: list[float] = answer["outputs"][0]["data"]
        return scores

    def close(self) -> None:
        self.conn.close()


async def measure(case: Case, api: ApiProcess, x: npt.NDArray[np.float32]) -> dict[str, float]:
    bare = BareCall(case.model_path)
    client = InferenceClient(case.chain())
    http_client = HttpClient(api.port, case.name)
    row = [float(v) for v in x[0]]
    inputs = {"features": x}
    contract = InputContract(case.built.manifest)
    model = TFLiteRuntime().load(case.model_path)

    # Same answer on every path, and every path warm (the chain's first run goes to a thread).
    expected = bare(x)
    for _ in range(20):
        answer = await client.infer(inputs)
        assert answer.stage == "active", answer.attempts
        np.testing.assert_allclose(answer.outputs["scores"], expected, rtol=1e-5)
        np.testing.assert_allclose(http_client(row), expected[0], rtol=1e-5)

    inline = InferenceClient(case.chain(ChainConfig(inline_below_s=1.0)))
    await inline.infer(inputs)

    async def inprocess() -> tuple[float, float]:
        return await async_block_mean(lambda: client.infer(inputs), case.calls["inprocess"])

    async def inprocess_inline() -> tuple[float, float]:
        return await async_block_mean(lambda: inline.infer(inputs), case.calls["inline"])

    paths: dict[str, Callable[[], Any]] = {
        "bare": lambda: block_mean(lambda: bare(x), case.calls["bare"]),
        "inprocess": inprocess,
        "inline": inprocess_inline,
        "http": lambda: block_mean(lambda: http_client(row), case.calls["http"]),
        "validate": lambda: block_mean(lambda: contract.validate(inputs), case.calls["validate"]),
        "run": lambda: block_mean(lambda: model.run(inputs), case.calls["run"]),
    }
    paths = {k: v for k, v in paths.items() if k in case.calls}
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    server_cpu = api.cpu_s()
    for _ in range(case.rounds):
        for name, block in paths.items():
            result = block()
            w, c = await result if asyncio.iscoroutine(result) else result
            wall[name].append(w)
            cpu[name].append(c)
    # The API process does nothing but answer these requests.
    server_cpu = (api.cpu_s() - server_cpu) / (case.rounds * case.calls["http"])
    http_client.close()

    figures = {k: statistics.median(v) for k, v in wall.items()}
    for name in ("inprocess", "inline", "http"):
        if name in wall:
            figures[f"{name}_ratio"] = statistics.median(
                t / b for t, b in zip(wall[name], wall["bare"], strict=True)
            )
    for name in ("bare", "inprocess", "inline"):
        if name in cpu:
            figures[f"{name}_cpu"] = statistics.median(cpu[name])
    figures["http_client_cpu"] = statistics.median(cpu["http"])
    figures["http_server_cpu"] = server_cpu
    figures["http_cpu"] = figures["http_client_cpu"] + server_cpu
    for name in ("inprocess", "inline", "http"):
        if f"{name}_cpu" in figures:
            figures[f"{name}_cpu_ratio"] = figures[f"{name}_cpu"] / figures["bare_cpu"]
    return figures


async def measure_metrics(case: Case, x: npt.NDArray[np.float32]) -> dict[str, float]:
    """The chain's per-request cost with the agent's metrics, and with prometheus-client's.

    Three chains on the same model — no counter, ``InferenceMetrics``,
    :class:`ClientLibraryCounter` — in blocks of 50 requests, the order rotating
    from round to round; each with a counter against the one without, per round.
    Then the counters' own cost, called alone in blocks of 20,000.
    """
    inputs = {"features": x}
    counts = InferenceMetrics()
    library = ClientLibraryCounter()
    clients = {
        "plain": InferenceClient(case.chain()),
        "metrics": InferenceClient(case.chain(counter=counts)),
        "library": InferenceClient(case.chain(counter=library)),
    }
    for client in clients.values():
        for _ in range(20):
            await client.infer(inputs)
    wall: dict[str, list[float]] = {k: [] for k in clients}
    cpu: dict[str, list[float]] = {k: [] for k in clients}
    names = list(clients)
    for i in range(METRICS_ROUNDS):
        for name in names[i % 3 :] + names[: i % 3]:
            w, c = await async_block_mean(partial(clients[name].infer, inputs), 50)
            wall[name].append(w)
            cpu[name].append(c)
    if counts.answered_by()["active"] != 20 + METRICS_ROUNDS * 50:
        raise RuntimeError(f"the metered chain counted {counts.answered_by()} requests")
    figures = {f"{k}_cpu": statistics.median(v) for k, v in cpu.items()}
    for name in ("metrics", "library"):
        figures[f"{name}_ratio"] = statistics.median(
            t / b for t, b in zip(wall[name], wall["plain"], strict=True)
        )
        figures[f"{name}_cpu_ratio"] = statistics.median(
            t / b for t, b in zip(cpu[name], cpu["plain"], strict=True)
        )
    # The counters alone: what a request pays for them.
    alone = {"metrics": counts.answered, "library": library.answered}
    for name, answered in alone.items():
        blocks = [block_mean(partial(answered, "active", 0.0004), 20_000)[1] for _ in range(15)]
        figures[f"{name}_alone_cpu"] = statistics.median(blocks)
    return figures


def run() -> dict[str, dict[str, float]]:
    """Measure and return the figures per model (seconds and ratios)."""
    baseline = np.load(MODELS / "baseline.npy")
    x = baseline[:1].copy()
    results: dict[str, dict[str, float]] = {}
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        layers = calibrated_layers(tmp, x)
        small = {"bare": 2000, "inprocess": 100, "http": 5, "validate": 400, "run": 1500}
        heavy = {"bare": 1, "inprocess": 1, "inline": 1, "http": 1}
        v2 = (MODELS / "v2.tflite").read_bytes()
        cases = [
            build_case(tmp, "pump-health", v2, baseline, small, 200),
            build_case(tmp, "pump-health-heavy", heavy_model(layers), baseline[:32], heavy, 100),
        ]
        for case in cases:
            with api_process(case.bundle_path) as api:
                figures = asyncio.run(measure(case, api, x))
            figures["model_kb"] = case.model_path.stat().st_size / 1024
            figures["rounds"] = case.rounds
            if case is cases[1]:
                figures["layers"] = layers
            results[case.name] = figures
        results["metrics"] = asyncio.run(measure_metrics(cases[0], x))
    results["machine"] = {"other_load": load.share()}
    return results


def main() -> None:
    r = run()
    print("wall: median over alternating rounds of a block's mean call, and the median of the")
    print("rounds' ratios to bare; CPU: of the calling process, plus the API process's for HTTP")
    for name, f in r.items():
        if name in ("machine", "metrics"):
            continue
        extra = f", {int(f['layers'])} dense layers" if "layers" in f else ""
        print(f"  {name} ({f['model_kb']:.0f} KB{extra}), {int(f['rounds'])} rounds")
        print(f"    {'path':<34} {'wall':>10}    ratio {'CPU':>10}    ratio")
        for key, label in (
            ("bare", "bare set_tensor/invoke/get_tensor"),
            ("inprocess", "in-process (InferenceClient)"),
            ("inline", "in-process, model on event loop"),
            ("http", "HTTP on loopback, keep-alive"),
        ):
            if key not in f:
                continue
            ratio = f.get(f"{key}_ratio", 1.0)
            cpu_ratio = f.get(f"{key}_cpu_ratio", 1.0)
            print(
                f"    {label:<34} {f[key] * 1e6:7.1f} µs {ratio:7.2f}x "
                f"{f[key + '_cpu'] * 1e6:7.1f} µs {cpu_ratio:7.2f}x"
            )
        if "validate" in f:
            print(f"      in-process part: validation      {f['validate'] * 1e6:7.1f} µs")
            print(f"      in-process part: TFLiteModel.run {f['run'] * 1e6:7.1f} µs")
        print(
            f"      HTTP CPU: API process {f['http_server_cpu'] * 1e6:.1f} µs, "
            f"client {f['http_client_cpu'] * 1e6:.1f} µs"
        )
    m = r["metrics"]
    print(f"  the agent's metrics on the in-process path (v2), {METRICS_ROUNDS} rounds")
    print(f"    {'chain':<34} {'CPU':>10}  wall ratio  CPU ratio (to no metrics)")
    for key, label in (
        ("plain", "no metrics"),
        ("metrics", "agent.metrics.InferenceMetrics"),
        ("library", "prometheus-client Counter+Histogram"),
    ):
        ratios = (
            f"{m[key + '_ratio']:9.3f}x {m[key + '_cpu_ratio']:9.3f}x" if key != "plain" else ""
        )
        print(f"    {label:<34} {m[key + '_cpu'] * 1e6:7.2f} µs  {ratios}")
    for key, label in (("metrics", "InferenceMetrics"), ("library", "prometheus-client")):
        print(f"      {label}.answered alone: {m[key + '_alone_cpu'] * 1e9:.0f} ns of CPU")
    print(f"  other processes used {r['machine']['other_load']:.0%} of the CPUs meanwhile")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
    else:
        main()
