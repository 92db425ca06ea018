"""What following a hybrid plan costs a request that stays on the device.

Three fallback chains side by side in one process, each serving ``v2.tflite``
and recording every answer into a window recorder as the daemon does
(``max_overhead`` off: every request summarised):

- ``no plan``: the baseline;
- ``plan, local``: a plan in mode ``escalate`` whose ``tau`` is 0, so every
  request stays local: the plan check (expiry on the wall clock), the
  calibrated confidence (temperature 1.5) of the answer, the route, and its
  count in the window's hybrid section;
- ``plan, local + audit 0``: the same with ``audit_rate`` 0.05 but a cloud
  stage whose quota is spent (``quota_burst`` 1, rate 0), so the audit draw
  and the quota check run on every request and nothing leaves the process.

One-row requests from the baseline rows, in blocks of :data:`BLOCK` whose
order rotates from block to block (all three measured in the same stretches of
the machine's load). Reported: the time of ``await chain.infer(...)`` per
request at p50 and p95, and the ratio to the baseline in the same run.

Run: ``python -m benchmarks.hybrid_serving [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from agent.serving import CloudStage, FallbackChain, ModelSlot
from agent.telemetry import WindowPolicy, WindowRecorder
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from protocol.hybrid import HybridPlan
from testbed.images import MODELS, make_bundle

REQUESTS = 20000
BLOCK = 200


def _chain(slot: ModelSlot, plan: HybridPlan | None, cloud: bool) -> FallbackChain:
    stage = CloudStage("http://127.0.0.1:9", "pump-health") if cloud else None
    chain = FallbackChain(slot, cloud=stage, seed=1)
    recorder = WindowRecorder(slot.manifest, "bench", WindowPolicy(max_overhead=None))

    def record(inputs: Any, answer: Any, seconds: float) -> None:
        recorder.record(inputs, answer.outputs, answer.stage, seconds, hybrid=answer.hybrid)
        recorder.poll()

    chain.on_answer(record)
    chain.set_hybrid_plan(plan)
    return chain


async def _measure(requests: int) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp), "v2", "2.0.0")
        with bundle.open("rb") as f:
            manifest = read_bundle(f)[0]
    slot = ModelSlot(manifest, default_runtime().load(MODELS / "v2.tflite"))
    now = datetime.now(UTC)
    common = {
        "device_id": "bench",
        "mode": "escalate",
        "temperature": 1.5,
        "tau": 0.0,
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    chains = {
        "no plan": _chain(slot, None, cloud=False),
        "plan, local": _chain(
            slot,
            HybridPlan.model_validate(
                {**common, "plan_id": "p-a", "quota_rate": 0.0, "quota_burst": 1}
            ),
            cloud=False,
        ),
        "plan, local + audit draw": _chain(
            slot,
            HybridPlan.model_validate(
                {
                    **common,
                    "plan_id": "p-b",
                    "quota_rate": 0.0,
                    "quota_burst": 1,
                    "audit_rate": 0.05,
                }
            ),
            cloud=True,
        ),
    }
    # The one token of the third chain's bucket: spent up front, so no audit is ever sent.
    third = chains["plan, local + audit draw"]
    state = third._snapshot.hybrid
    assert state is not None
    state.bucket.take(time.monotonic())
    rows = np.load(MODELS / "baseline.npy").astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in chains}
    names = list(chains)
    for warm in range(200):
        for chain in chains.values():
            await chain.infer({"features": rows[warm : warm + 1]})
    for block in range(requests // BLOCK):
        order = names[block % len(names) :] + names[: block % len(names)]
        for name in order:
            chain = chains[name]
            spent = times[name]
            for i in range(BLOCK):
                x = rows[(block * BLOCK + i) % len(rows)][None]
                start = time.perf_counter()
                await chain.infer({"features": x})
                spent.append(time.perf_counter() - start)
    base = statistics.median(times["no plan"])
    base95 = float(np.percentile(times["no plan"], 95))
    print("| chain | p50 | p95 | p50 ratio | p95 ratio | audits drawn, not sent |")
    print("|---|---|---|---|---|---|")
    for name, spent in times.items():
        p50, p95 = statistics.median(spent), float(np.percentile(spent, 95))
        print(
            f"| {name} | {p50 * 1e6:.1f} µs | {p95 * 1e6:.1f} µs | {p50 / base:.2f} "
            f"| {p95 / base95:.2f} | {chains[name].audits_skipped} |"
        )


def main(requests: int = REQUESTS) -> None:
    asyncio.run(_measure(requests))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    main(parser.parse_args().requests)
