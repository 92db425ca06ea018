"""What a shadow model costs the device: the agent's memory and local API latency, with and without.

A real fleet on loopback (release keys, an image repository and a director
served over HTTP) and three real ``edge-agent run`` processes side by side,
each serving ``v1.tflite`` as its active model:

- the baseline: the director assigns v1 and nothing else;
- a shadow at the default share: the director also lists v2 as its shadow,
  run on 25 % of the requests (``[shadow] share = 0.25``);
- a shadow on every request (``share = 1.0``), the worst case.

Once every agent has committed v1 (and installed its shadow), the same
requests go to the three in blocks of :data:`BLOCK`, one request at a time,
the agents' order rotating from block to block and a pause after each block
(so a shadow run still under way in one agent does not land on another's
requests): each agent is measured alone, and all in the same stretches of the
machine's load. Measured: each agent's resident memory (``VmRSS``) and
peak (``VmHWM``) from ``/proc/PID/status`` after the requests, the latency of
the local API (the client's wall time of ``POST /v2/models/pump-health/infer``,
one row a request) at p50 and p95, the shadow's own memory as its self-test
measured it (what the budget check reads), and from the agents' window
summaries how many requests the shadow ran on and how many it skipped because
it was busy, and the shadow's own run time (its latency histogram) at p50 and p95.

Run: ``python -m benchmarks.agent_shadow [--requests N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tuf.api.metadata import TargetFile

from agent.telemetry.outbox import Outbox
from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ReleasedBundle
from protocol.director_marks import SHADOW
from protocol.histogram import ExponentialHistogram, merge_histograms, quantile
from protocol.window import decode_window
from testbed.fleet import HARDWARE, AgentProcess, Fleet
from testbed.images import make_bundle

REQUESTS = 2000
BLOCK = 50
SHARES = {"baseline": None, "shadow 0.25": 0.25, "shadow 1.0": 1.0}


def _target(device: str, bundle: ReleasedBundle, shadow: bool) -> TargetFile:
    custom = {**assignment_custom(device, HARDWARE, bundle), **({SHADOW: True} if shadow else {})}
    return TargetFile(
        length=bundle.length,
        hashes={"sha256": bundle.sha256},
        path=bundle.target_path,
        unrecognized_fields={"custom": custom},
    )


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _rows(n: int) -> list[list[float]]:
    from firmware_images.datagen import generate

    x, _ = generate(n, 11)
    return [[float(v) for v in row] for row in x]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(requests: int = REQUESTS) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet = Fleet(root, init_keys(root / "release"), init_keys(root / "director"))
        try:
            v1 = fleet.release(make_bundle(root, "v1", "1.0.0"))
            v2 = fleet.release(make_bundle(root, "v2", "2.0.0"))
            agents: dict[str, AgentProcess] = {}
            urls: dict[str, str] = {}
            for i, (label, share) in enumerate(SHARES.items()):
                device = f"bench-{i}"
                fleet.director.register(fleet.director_keys, device)
                targets = {v1.target_path: _target(device, v1, False)}
                if share is not None:
                    targets[v2.target_path] = _target(device, v2, True)
                fleet.director.device(device).sign(fleet.director_keys, targets, None)
                shadow = {"share": share if share is not None else 0.0}
                config = fleet.agent_config(
                    device,
                    update={"poll_interval_s": 1.0, "health_period_s": 0.5},
                    shadow=shadow,
                    telemetry={"window_max_seconds": 3600.0, "window_max_requests": 100000},
                )
                agents[label] = AgentProcess(config)
                urls[label] = agents[label].wait_ready()
            for label, agent in agents.items():
                agent.wait_for(
                    f"{label}: v1 committed",
                    lambda a=agent: (a.journal().get("installed") or {}).get("version") == "1.0.0",
                    timeout=120,
                )
                if SHARES[label] is not None:
                    agent.wait_for(
                        f"{label}: shadow installed",
                        lambda a=agent: any(e["event"] == "shadow-installed" for e in a.events()),
                        timeout=120,
                    )
            rows = _rows(requests)
            for label, agent in agents.items():  # warm-up
                for row in rows[:50]:
                    agent.infer(urls[label], [row])
            latencies: dict[str, list[float]] = {label: [] for label in agents}
            order = list(agents)
            for first in range(0, len(rows), BLOCK):
                for label in order:
                    agent = agents[label]
                    for row in rows[first : first + BLOCK]:
                        started = time.perf_counter()
                        response = agent.infer(urls[label], [row])
                        latencies[label].append((time.perf_counter() - started) * 1000)
                        assert response.status == 200, response.data
                    time.sleep(0.05)
                order = order[1:] + order[:1]
            time.sleep(1.0)
            memory = {label: _status_kb(agent.proc.pid) for label, agent in agents.items()}
            for agent in agents.values():
                agent.stop()
            _report(agents, latencies, memory, requests)
        finally:
            fleet.close()


def _report(
    agents: dict[str, AgentProcess],
    latencies: dict[str, list[float]],
    memory: dict[str, dict[str, int]],
    requests: int,
) -> None:
    base_rss = memory["baseline"]["VmRSS"] / 1024
    base_p50 = statistics.median(latencies["baseline"])
    base_p95 = _percentile(latencies["baseline"], 0.95)
    print(f"{requests} requests to each agent, in rotating blocks of {BLOCK}, one row each")
    print(
        "| agent | VmRSS | VmHWM | RSS vs baseline | p50 | p95 | p50 ratio | p95 ratio "
        "| shadow ran | skipped (busy) | shadow run p50 / p95 | shadow self-test memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, agent in agents.items():
        rss, hwm = memory[label]["VmRSS"] / 1024, memory[label]["VmHWM"] / 1024
        p50, p95 = statistics.median(latencies[label]), _percentile(latencies[label], 0.95)
        ran = skipped = own = "—"
        selftest = "—"
        if SHARES[label] is not None:
            with Outbox(agent.data_dir / "outbox.db") as outbox:
                windows = [decode_window(p) for _, p in outbox.pending(limit=10000)]
            shadow_runs = sum(w.shadow.requests for w in windows if w.shadow is not None)
            served = sum(w.requests for w in windows)
            drawn = round(served * (SHARES[label] or 0.0))
            ran = f"{shadow_runs} of {served}"
            histogram = ExponentialHistogram()
            for w in windows:
                if w.shadow is not None:
                    histogram = merge_histograms(histogram, w.shadow.latency_ms)
            own = f"{quantile(histogram, 0.5) or 0:.3f} / {quantile(histogram, 0.95) or 0:.3f} ms"
            skipped = f"~{max(drawn - shadow_runs, 0)}"
            event = next(e for e in agent.events() if e["event"] == "shadow-installed")
            selftest = f"{event['memory_mb']} MB, p95 {event['latency_p95_ms']} ms"
        print(
            f"| {label} | {rss:.1f} MB | {hwm:.1f} MB | {rss - base_rss:+.1f} MB "
            f"| {p50:.2f} ms | {p95:.2f} ms | {p50 / base_p50:.2f} | {p95 / base_p95:.2f} "
            f"| {ran} | {skipped} | {own} | {selftest} |"
        )
    print(json.dumps({k: round(statistics.median(v), 3) for k, v in latencies.items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    main(parser.parse_args().requests)
