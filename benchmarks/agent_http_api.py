"""The local inference API over HTTP against a minimal aiohttp server on the same model.

Both servers load the sample model ``v2.tflite`` with the same runtime adapter
(``model_runtime.TFLiteRuntime``), each in a process of its own:

- ours: ``agent.api.http.LocalApi`` serving a ``FallbackChain`` over a bundle
  of the model built by the release bundle builder (what ``edge-agent run``
  serves): admission, the request's validation against the manifest, the
  chain, the output checks;
- baseline: the smallest aiohttp server that answers the same Open Inference
  Protocol JSON (:func:`serve_baseline`, about 40 lines): it decodes the body,
  runs the model and encodes the answer, and checks nothing.

One client process drives a server at a time: ``CONNECTIONS`` keep-alive
connections on one asyncio loop, each sending a request as soon as its previous
answer has come (so the server is always busy), the same pre-encoded JSON
body each time, every answer's status checked and the first answer of each
connection decoded and compared with the model's own output. A round gives
each server a block of ``REQUESTS`` requests, the order of the two alternating
from round to round, so both see the same load from other processes. Per
block: requests per second, the latency of each request (p50, p99), and the
server's CPU time per request, from ``/proc/PID/task/*/schedstat`` before and
after. The figures are medians over rounds; the ratio is the median of the
rounds' ratios (ours / baseline). Each server's resident memory after the
run (``VmRSS``) is printed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.agent_inference import OtherLoad
from testbed.images import MODELS, make_bundle

ROUNDS = 12
REQUESTS = 3000
CONNECTIONS = 4
MODEL_NAME = "pump-health"


def serve_ours(bundle: Path) -> None:
    """The agent's local API on the bundle's model; prints its port; stops on SIGTERM."""
    from agent.api.http import LocalApi
    from agent.serving.chain import FallbackChain, ModelSlot
    from model_runtime import TFLiteRuntime
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


def serve_baseline(model_path: Path) -> None:
    """The baseline: aiohttp, the same model and runtime adapter, the same JSON, no checks."""
    from aiohttp import web

    from model_runtime import TFLiteRuntime

    model = TFLiteRuntime().load(model_path)
    input_name = model.inputs[0].name

    async def infer(request: web.Request) -> web.Response:
        doc = await request.json()
        tensor = doc["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        outputs = model.run({input_name: x})
        answer = {
            "model_name": request.match_info["name"],
            "model_version": "2.0.0",
            "parameters": {"stage": "active", "model_version": "2.0.0", "escalated": False},
            "outputs": [
                {
                    "name": name,
                    "shape": list(value.shape),
                    "datatype": "FP32",
                    "data": value.ravel().tolist(),
                }
                for name, value in outputs.items()
            ],
        }
        return web.json_response(answer)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", infer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(runner.addresses[0][1], flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


@dataclass
class Server:
    """A server under test in a process of its own."""

    name: str
    proc: subprocess.Popen[str]
    port: int

    def cpu_s(self) -> float:
        """CPU time of all the process's threads so far, from the scheduler (ns resolution)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@contextmanager
def server_process(name: str, kind: str, path: Path) -> Iterator[Server]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.agent_http_api", "--serve", kind, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} server exited with {proc.wait()}")
        yield Server(name, proc, int(line))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def request_bytes(port: int, row: list[float]) -> bytes:
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32", "data": row}]}
    ).encode()
    head = (
        f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def drive(port: int, request: bytes, total: int, connections: int) -> dict[str, Any]:
    """Send ``total`` requests over ``connections`` keep-alive connections; their latencies."""
    latencies: list[float] = []
    first_answers: list[Any] = []
    remaining = total

    async def connection() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = True
        try:
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body!r}")
                if first:
                    first_answers.append(json.loads(body))
                    first = False
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return {
        "seconds": time.perf_counter() - start,
        "latencies": latencies,
        "answers": first_answers,
    }


def client_main(port: int, total: int, connections: int) -> None:
    """The client process: reads the request from stdin, prints the block's figures as JSON."""
    request = sys.stdin.buffer.read()
    result = asyncio.run(drive(port, request, total, connections))
    lat = sorted(result["latencies"])
    print(
        json.dumps(
            {
                "rps": len(lat) / result["seconds"],
                "p50": lat[len(lat) // 2],
                "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "answers": result["answers"],
            }
        )
    )


def block(server: Server, request: bytes, total: int) -> dict[str, Any]:
    """One block of ``total`` requests to ``server`` from a fresh client process."""
    client = [sys.executable, "-m", "benchmarks.agent_http_api", "--client"]
    args = [*client, str(server.port), str(total), str(CONNECTIONS)]
    cpu = server.cpu_s()
    done = subprocess.run(args, input=request, capture_output=True, check=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    figures["cpu"] = (server.cpu_s() - cpu) / total
    return figures


def run(rounds: int = ROUNDS, total: int = REQUESTS) -> dict[str, Any]:
    """Measure both servers; the medians per server, the ratios and the machine's load."""
    from model_runtime import TFLiteRuntime

    baseline = np.load(MODELS / "baseline.npy")
    x = baseline[:1].astype(np.float32)
    row = [float(v) for v in x[0]]
    model_path = MODELS / "v2.tflite"
    expected = next(iter(TFLiteRuntime().load(model_path).run({"features": x}).values()))
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as tmp_name:
        bundle = make_bundle(Path(tmp_name), "v2", "2.0.0")
        with (
            server_process("ours", "ours", bundle) as ours,
            server_process("baseline", "baseline", model_path) as base,
        ):
            servers = [ours, base]
            per: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for server in servers:  # warm both, and check they answer the same
                figures = block(server, request_bytes(server.port, row), 200)
                for answer in figures["answers"]:
                    data = answer["outputs"][0]["data"]
                    np.testing.assert_allclose(data, expected.ravel(), rtol=1e-5)
            for i in range(rounds):
                for server in servers if i % 2 == 0 else servers[::-1]:
                    per[server.name].append(block(server, request_bytes(server.port, row), total))
            rss = {s.name: s.rss_mb() for s in servers}
    result: dict[str, Any] = {"rounds": rounds, "requests": total, "connections": CONNECTIONS}
    for name, blocks in per.items():
        result[name] = {k: statistics.median(b[k] for b in blocks) for k in ("rps", "p50", "p99")}
        result[name]["cpu"] = statistics.median(b["cpu"] for b in blocks)
        result[name]["rss_mb"] = rss[name]
    pairs = list(zip(per["ours"], per["baseline"], strict=True))
    result["ratio"] = {
        k: statistics.median(o[k] / b[k] for o, b in pairs) for k in ("rps", "p50", "p99", "cpu")
    }
    result["other_load"] = load.share()
    return result


def main() -> None:
    r = run()
    print(
        f"POST /v2/models/{MODEL_NAME}/infer (v2.tflite), {r['connections']} keep-alive "
        f"connections, {r['rounds']} alternating rounds of {r['requests']} requests each"
    )
    print(f"  {'server':<30} {'req/s':>8} {'p50':>10} {'p99':>10} {'CPU/req':>10} {'RSS':>8}")
    for name, label in (("ours", "ours (LocalApi, validated)"), ("baseline", "aiohttp, no checks")):
        f = r[name]
        print(
            f"  {label:<30} {f['rps']:8.0f} {f['p50'] * 1e6:7.0f} µs {f['p99'] * 1e6:7.0f} µs "
            f"{f['cpu'] * 1e6:7.0f} µs {f['rss_mb']:5.1f} MB"
        )
    q = r["ratio"]
    print(
        f"  ours / baseline (median of rounds): throughput {q['rps']:.2f}x, p50 {q['p50']:.2f}x, "
        f"p99 {q['p99']:.2f}x, server CPU {q['cpu']:.2f}x (goal: throughput >= 1.0x, p99 <= 1.0x)"
    )
    print(f"  other processes used {r['other_load']:.0%} of the CPUs meanwhile")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        if sys.argv[2] == "ours":
            serve_ours(Path(sys.argv[3]))
        else:
            serve_baseline(Path(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
