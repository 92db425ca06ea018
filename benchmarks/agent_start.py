"""Start to ready of ``edge-agent run`` as a whole process, against a minimal aiohttp server.

A real fleet on loopback (release keys, an image repository and a director
served over HTTP) assigns a bundle of the sample model ``v2.tflite`` to a
device, and a real ``edge-agent run`` installs it once. Then, in alternating
rounds, each of these is spawned and timed from just before ``exec`` until
``GET /v2/health/ready`` on its port answers 200 (polled every 2 ms by the
same raw-socket client, a fresh connection each try), then stopped:

- ours: ``edge-agent run`` with v2 installed (configuration, journal, the
  model loaded and checked, the local API listening);
- baseline: the smallest aiohttp server that loads the same model with the
  same runtime adapter and answers the readiness route (:data:`BASELINE`);
- the interpreter alone: ``python -c pass``, spawn to exit (the floor any
  Python process pays).

With ``--before TREE`` a fourth process alternates with them: ``edge-agent
run`` of another checkout (its own ``.venv``, run from its folder) on the same
configuration, so a change is measured against the tree before it in the same
stretches of the machine's load.

Figures are medians over rounds; the ratio is the median of the rounds'
ratios (ours / baseline). Beside the wall time, the CPU time each process
used until ready (``/proc/PID/task/*/schedstat``), which other processes on a
loaded machine do not stretch. Goal (issue 16): under 300 ms for ours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.agent_inference import OtherLoad
from benchmarks.installed import compile_tree
from testbed.images import MODELS, make_bundle
from testbed.waiting import free_port

ROUNDS = 11
POLL_S = 0.002
DEVICE = "start-1"
READY_REQUEST = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
GOAL_S = 0.300

BASELINE = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
from model_runtime import TFLiteRuntime

model = TFLiteRuntime().load(Path(sys.argv[1]))

async def ready(request):
    return web.json_response({"ready": True})

async def main():
    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[2])).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def ready(port: int) -> bool:
    """Whether ``GET /v2/health/ready`` on ``port`` answers 200 now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(READY_REQUEST)
            return sock.recv(64).startswith(b"HTTP/1.1 200 ")
    except OSError:
        return False


def cpu_s(pid: int) -> float:
    """CPU time of all of the process's threads so far, from the scheduler (ns resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


HERE = Path(__file__).resolve().parents[1]


def time_to_ready(
    command: list[str], port: int, timeout_s: float = 60, cwd: Path = HERE
) -> tuple[float, float]:
    """Seconds from spawning ``command`` until ``port`` answers ready, and the CPU seconds
    the process used by then (its threads'; what a loaded machine does not stretch)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        while not ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {proc.returncode} before ready")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"{command[:4]} not ready in {timeout_s} s")
            time.sleep(POLL_S)
        return time.perf_counter() - started, cpu_s(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def time_to_exit(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def installed_agent(root: Path, port: int) -> Path:
    """An agent's configuration with v2 installed through the director; the API on ``port``."""
    from fleet_server.release.keys import init_keys
    from testbed.fleet import AgentProcess, Fleet

    fleet = Fleet(root / "fleet", init_keys(root / "release"), init_keys(root / "director"))
    try:
        fleet.director.register(fleet.director_keys, DEVICE)
        fleet.assign(DEVICE, fleet.release(make_bundle(root, "v2", "2.0.0")))
        config = fleet.agent_config(DEVICE)
        agent = AgentProcess(config)
        try:
            agent.wait_for(
                "v2 installed",
                lambda: (
                    (agent.journal().get("installed") or {}).get("version") == "2.0.0"
                    and agent.journal().get("phase") == "idle"
                ),
            )
        finally:
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait(10)
    finally:
        fleet.close()
    # The director is gone: the agent serves what it has, and its polls fail quietly.
    config.write_text(config.read_text().replace("port = 0\n", f"port = {port}\n", 1))
    return config


def run(rounds: int | None = None, before: Path | None = None) -> dict[str, Any]:
    """Measure; medians per process kind, the ratio and the machine's load.

    ``before``: another checkout whose ``edge-agent run`` alternates with ours.
    """
    rounds = rounds or ROUNDS
    with tempfile.TemporaryDirectory() as tmp_name:
        ours_port, base_port = free_port(), free_port()
        config = installed_agent(Path(tmp_name), ours_port)
        commands = {
            "ours": [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            "baseline": [
                sys.executable,
                "-c",
                BASELINE,
                str(MODELS / "v2.tflite"),
                str(base_port),
            ],
        }
        ports = {"ours": ours_port, "baseline": base_port}
        cwds = {"ours": HERE, "baseline": HERE}
        if before is not None:
            commands["before"] = [str(before / ".venv/bin/python"), *commands["ours"][1:]]
            ports["before"], cwds["before"] = ours_port, before
        names = list(commands)
        # Both checkouts as installed: bytecode compiled, not compiled again by every start.
        compile_tree()
        if before is not None:
            compile_tree(before)
        for name, command in commands.items():  # warm the page cache
            time_to_ready(command, ports[name], cwd=cwds[name])
        load = OtherLoad()
        per: dict[str, list[float]] = {name: [] for name in [*names, "python"]}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                wall, used = time_to_ready(commands[name], ports[name], cwd=cwds[name])
                per[name].append(wall)
                cpu[name].append(used)
            per["python"].append(time_to_exit([sys.executable, "-c", "pass"]))
    return {
        "rounds": rounds,
        "median_s": {k: statistics.median(v) for k, v in per.items()},
        "range_s": {k: (min(v), max(v)) for k, v in per.items()},
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "ratio": statistics.median(
            o / b for o, b in zip(per["ours"], per["baseline"], strict=True)
        ),
        "cpu_ratio": statistics.median(
            o / b for o, b in zip(cpu["ours"], cpu["baseline"], strict=True)
        ),
        "before_ratio": (
            statistics.median(o / b for o, b in zip(per["ours"], per["before"], strict=True))
            if "before" in per
            else None
        ),
        "other_load": load.share(),
        "loadavg": os.getloadavg()[0],
    }


def main(rounds: int = ROUNDS, before: Path | None = None) -> None:
    r = run(rounds, before.resolve() if before else None)
    print(
        f"spawn to GET /v2/health/ready = 200, {r['rounds']} alternating rounds "
        "(v2.tflite; polled every 2 ms)"
    )
    labels = {
        "ours": "edge-agent run (v2 installed)",
        "baseline": "aiohttp server, same model",
        "python": "python -c pass (to exit)",
    }
    if before is not None:
        labels["before"] = f"before: {before}"
    for name, label in labels.items():
        low, high = r["range_s"][name]
        used = f"CPU {r['cpu_s'][name] * 1000:5.0f} ms" if name in r["cpu_s"] else ""
        print(
            f"  {label:<32} {r['median_s'][name] * 1000:6.0f} ms  "
            f"({low * 1000:.0f}-{high * 1000:.0f} ms)  {used}"
        )
    if r["before_ratio"] is not None:
        print(f"  ours / before (median of rounds): wall {r['before_ratio']:.2f}x")
    met = "met" if r["median_s"]["ours"] < GOAL_S else "NOT met"
    print(
        f"  ours / baseline (median of rounds): wall {r['ratio']:.2f}x, CPU "
        f"{r['cpu_ratio']:.2f}x; goal under {GOAL_S * 1000:.0f} ms: {met}"
    )
    print(
        f"  other processes used {r['other_load']:.0%} of the CPUs meanwhile "
        f"(load average {r['loadavg']:.1f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--before", type=Path, help="another checkout (with its .venv) to alternate with ours"
    )
    args = parser.parse_args()
    main(args.rounds, args.before)
