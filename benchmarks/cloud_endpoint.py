"""The cloud endpoint's throughput with dynamic batching against one request per call, same run.

Two ``fleet-server cloud`` processes serve the same signed bundle of
``firmware_images/models/cloud.tflite`` (released for hardware ``cloud`` in an
image repository built here, verified from its root at start) from the same
SQLite database:

- batching: ``--max-batch-size 32 --max-batch-wait 0.002``;
- one at a time: ``--max-batch-size 1`` (every request is its own interpreter
  call, as without a batcher).

Every device has a plan with a quota far above what the run reaches, and the
capacity is set as high, so admission never refuses: what is measured is the
serving path (HTTP, auth cache, quota book, JSON, validation, queue,
interpreter in a worker thread, response). The load comes from this process:
``CONCURRENCY`` clients, each a different device on its own keep-alive
connection, each sending single-row Open Inference Protocol requests back to
back (a new one as soon as its answer arrives) for ``SECONDS``. A round runs
each endpoint once, in alternating order, so both see the same machine;
throughput is answered requests per second, the ratio batching / one at a time
per round, and the figures are medians over rounds. The endpoint's own CPU
time per request (from ``/proc``) is printed beside it, with its ratio per
round: it does not count waiting for a CPU another process holds, so it is
the steadier figure on a shared machine. The mean rows per interpreter call
come from the endpoint's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt

from fleet_server.db.engine import Database, migrate
from fleet_server.db.models import HybridPlanRow
from fleet_server.devices.store import create_device
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ImageRepository
from protocol.bundle import read_bundle
from protocol.golden import unpack_golden
from testbed.images import make_bundle

ROUNDS = 7
SECONDS = 4.0
CONCURRENCY = 32
MODES = {
    "batching": ["--max-batch-size", "32", "--max-batch-wait", "0.002"],
    "one at a time": ["--max-batch-size", "1"],
}


@dataclass
class Endpoint:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _devices(url: str, count: int) -> dict[str, str]:
    database = Database(url)
    passwords: dict[str, str] = {}
    now = datetime.now(UTC)
    async with database.session() as session:
        for i in range(count):
            device_id = f"bench-{i}"
            _, passwords[device_id] = await create_device(
                session, device_id=device_id, hardware_id="rpi4-arm64", actor="benchmark"
            )
        await session.flush()
        for device_id in passwords:
            session.add(
                HybridPlanRow(
                    device_id=device_id,
                    plan_id=f"p-{device_id}",
                    mode="cloud_first",
                    quota_rate=1e6,
                    quota_burst=1_000_000,
                    issued_at=now,
                    expires_at=now + timedelta(days=1),
                    plan={},
                    inputs={},
                )
            )
    await database.close()
    return passwords


def _start(name: str, flags: list[str], work: Path, repo: ImageRepository, db: str) -> Endpoint:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "cloud",
            "--data",
            str(work / name.replace(" ", "-")),
            "--db",
            db,
            "--repository",
            str(repo.path),
            "--trusted-root",
            str(repo.trusted_root_path),
            "--http",
            f"127.0.0.1:{port}",
            "--capacity",
            "1000000",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Endpoint(name, process, f"http://127.0.0.1:{port}")


async def _wait_ready(endpoint: Endpoint) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(endpoint.url + "/v2/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the {endpoint.name} endpoint did not become ready")


async def _load(
    endpoint: Endpoint,
    passwords: dict[str, str],
    rows: npt.NDArray[np.float32],
    seconds: float = SECONDS,
) -> int:
    """Answered requests in ``seconds`` from ``CONCURRENCY`` devices sending back to back.

    Each client is a keep-alive HTTP/1.1 connection on asyncio streams with its
    requests encoded beforehand, so that the load generator (one process, as
    the endpoint is) spends as little CPU per request as it can.
    """
    stop_at = time.monotonic() + seconds
    host, _, port = endpoint.url.removeprefix("http://").partition(":")
    answered = 0

    def request(device: str, password: str, row: npt.NDArray[np.float32]) -> bytes:
        token = base64.b64encode(f"{device}:{password}".encode()).decode()
        body = json.dumps(
            {
                "inputs": [
                    {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": row.tolist()}
                ]
            }
        ).encode()
        head = (
            "POST /v2/models/pump-health/infer HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nAuthorization: Basic {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def client(index: int, device: str, password: str) -> None:
        nonlocal answered
        requests = [request(device, password, row) for row in rows]
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            i = index
            while time.monotonic() < stop_at:
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = _content_length(head)
                payload = await reader.readexactly(length)
                if status != 200:
                    raise RuntimeError(f"{status}: {payload[:200]!r}")
                answered += 1
                i += 1
        finally:
            writer.close()

    devices = list(passwords.items())[:CONCURRENCY]
    await asyncio.gather(*(client(i, d, p) for i, (d, p) in enumerate(devices)))
    return answered


def _content_length(head: bytes) -> int:
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    if match is None:
        raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
    return int(match.group(1))


async def _batch_mean(endpoint: Endpoint) -> float:
    async with aiohttp.ClientSession() as http, http.get(endpoint.url + "/metrics") as response:
        text = await response.text()
    count = re.search(r'edgefleet_cloud_batch_size_count\{model="pump-health"\} (\S+)', text)
    total = re.search(r'edgefleet_cloud_batch_size_sum\{model="pump-health"\} (\S+)', text)
    if not count or not total or float(count.group(1)) == 0:
        return 0.0
    return float(total.group(1)) / float(count.group(1))


async def _run(work: Path) -> None:
    keys = init_keys(work / "keys")
    repo = ImageRepository(work / "repo")
    repo.create(keys)
    bundle = make_bundle(work, "cloud", "9.0.0", hardware=("cloud",))
    repo.add_bundle(bundle, keys)
    with bundle.open("rb") as f:
        _, members = read_bundle(f)
    golden, _ = unpack_golden(members["golden.npz"])
    rows = golden["features"].astype(np.float32)
    db = f"sqlite:///{work / 'fleet.db'}"
    await asyncio.to_thread(migrate, db)
    passwords = await _devices(db, CONCURRENCY)
    endpoints = [_start(name, flags, work, repo, db) for name, flags in MODES.items()]
    try:
        for endpoint in endpoints:
            await _wait_ready(endpoint)
            await _load(endpoint, passwords, rows, seconds=0.5)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in endpoints}
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for round_ in range(ROUNDS):
            order = endpoints if round_ % 2 == 0 else endpoints[::-1]
            per_round: dict[str, float] = {}
            for endpoint in order:
                cpu = endpoint.cpu_s()
                started = time.monotonic()
                answered = await _load(endpoint, passwords, rows)
                wall = time.monotonic() - started
                cpu_per = (endpoint.cpu_s() - cpu) / answered * 1e6
                per_round[endpoint.name] = answered / wall
                results[endpoint.name].append((answered / wall, cpu_per))
            ratios.append(per_round["batching"] / per_round["one at a time"])
            spent = {name: runs[-1][1] for name, runs in results.items()}
            cpu_ratios.append(spent["one at a time"] / spent["batching"])
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{k} {v:.0f} req/s" for k, v in per_round.items())
                + f", ratio {ratios[-1]:.2f}"
            )
        print(
            f"\n{CONCURRENCY} devices sending single-row requests back to back, "
            f"{ROUNDS} rounds of {SECONDS:g} s per endpoint (medians):"
        )
        for endpoint in endpoints:
            throughput = statistics.median(r[0] for r in results[endpoint.name])
            cpu_us = statistics.median(r[1] for r in results[endpoint.name])
            mean_batch = await _batch_mean(endpoint)
            print(
                f"  {endpoint.name:14s} {throughput:8.0f} requests/s  "
                f"endpoint CPU {cpu_us:6.0f} µs/request  mean rows per call {mean_batch:.1f}"
            )
        print(f"  throughput ratio batching / one at a time: {statistics.median(ratios):.2f}")
        print(
            "  endpoint CPU per request, one at a time / batching: "
            f"{statistics.median(cpu_ratios):.2f}"
        )
    finally:
        for endpoint in endpoints:
            endpoint.process.terminate()
        for endpoint in endpoints:
            endpoint.process.wait(timeout=30)


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(_run(Path(work)))


if __name__ == "__main__":
    main()
