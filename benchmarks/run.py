"""Run every benchmark and print its figures (``make bench``)."""

from __future__ import annotations

from functools import partial

from benchmarks import (
    agent_http_api,
    agent_inference,
    agent_memory,
    agent_poll,
    agent_shadow,
    agent_start,
    cloud_endpoint,
    director_signing,
    hybrid_accuracy,
    hybrid_plan,
    hybrid_serving,
    reconnect_storm,
    rollout_gates,
    rollout_tick,
    rollout_waves,
    server_ingest,
    sim_devices,
    sim_virtual,
    telemetry,
    verify_bundle,
)

BENCHMARKS = [
    ("verify a 50 MB bundle vs sha256sum", verify_bundle.main),
    ("local inference paths vs a bare interpreter call", agent_inference.main),
    ("the local HTTP API vs a minimal aiohttp server on the same model", agent_http_api.main),
    ("agent memory, import shares and time to ready", agent_memory.main),
    ("start to ready of edge-agent run vs a minimal aiohttp server", agent_start.main),
    ("a shadow model's memory and latency vs the same agent without one", agent_shadow.main),
    ("an update poll's CPU with the poll gate vs a fetcher child per question", agent_poll.main),
    ("server ingest from the broker vs a bare paho subscriber", server_ingest.main),
    (
        "server window-summary ingest vs a bare paho subscriber",
        partial(server_ingest.main, "windows"),
    ),
    ("window readers alone vs the value-by-value reference reader", server_ingest.main_decode),
    ("director metadata for 10,000 devices vs bare signatures and writes", director_signing.main),
    ("telemetry: record cost, bytes a day, drift for 10,000 devices", telemetry.main),
    ("rollout wave membership for 1,000,000 devices vs hashing their ids", rollout_waves.main),
    ("the cloud endpoint: dynamic batching vs one request per call", cloud_endpoint.main),
    ("rollout gates: false stops and time to stop vs a fixed-level test", rollout_gates.main),
    ("a rollout tick's read of 100,000 devices' hourly aggregates vs count(*)", rollout_tick.main),
    ("hybrid plan for 100,000 devices vs a per-device loop", hybrid_plan.main),
    (
        "fleet accuracy against offload share, device model vs cloud model alone",
        hybrid_accuracy.main,
    ),
    ("a hybrid plan's cost to a request that stays local vs no plan", hybrid_serving.main),
    (
        "a reconnect storm of 1,000 clients through the fault proxy vs straight to Mosquitto",
        reconnect_storm.main,
    ),
    (
        "simulated devices per process: RSS and CPU per device vs the same process without",
        sim_devices.main,
    ),
    (
        "a staged rollout across 10,000 devices in virtual-clock mode vs the time it simulates",
        sim_virtual.main,
    ),
]


def main() -> None:
    for title, bench in BENCHMARKS:
        print(f"\n## {title}")
        bench()


if __name__ == "__main__":
    main()
