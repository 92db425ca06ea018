"""Fleet accuracy against offload share: the device model locally, the cloud model in the cloud.

Labelled held-out data (``firmware_images/models/heldout.npz``) goes through
the agent's real fallback chain (:class:`agent.serving.FallbackChain`, the
device model ``v2.tflite`` from its released bundle, the TFLite runtime) and
its real cloud stage, which calls a real ``fleet-server cloud`` endpoint
serving the released cloud model (``cloud.tflite``, verified from the image
repository), authenticated as a registered device. The server's API runs in
this process (releases, the device); the endpoint is its own process on the
same SQLite database, with a quota and capacity no run reaches.

For each offload share s in 0, 10, ..., 100 %, the device follows a hybrid
plan as the planner would make it for s: ``local`` for 0, ``cloud_first``
for 100, otherwise ``escalate`` with tau the s-quantile of the device
model's calibrated confidence on the same rows (temperature from its
bundle's manifest), read off the 50-bin histogram the device reports, with
the planner's own :func:`fleet_server.hybrid.planner.confidence_quantile`.
No audits. Every row is one request (``CONCURRENCY`` under way, so the
endpoint batches); accuracy is the share of answers whose top class is the
label. The offload actually reached is counted from the answers' routes.

Run: ``python -m benchmarks.hybrid_accuracy [--rows N] [--device-model v2]
[--cloud-model cloud]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.serving.chain import FallbackChain, ModelSlot
from agent.serving.cloud import CloudStage
from fleet_server.hybrid.planner import confidence_quantile
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ImageRepository
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from protocol.hybrid import CONFIDENCE_BINS, HybridPlan, PlanMode, calibrated_confidence
from protocol.manifest import Manifest
from simulator.hybrid_fleet import CLOUD_HARDWARE, CloudProcess
from testbed.api_server import ServerThread, repository_files
from testbed.images import HARDWARE, MODELS, make_bundle

SHARES = tuple(range(0, 101, 10))
CONCURRENCY = 16
DEVICE = "bench-hybrid-1"


@dataclass(frozen=True)
class Point:
    """One offload share's run."""

    share: int  # percent asked for
    mode: PlanMode
    tau: float
    offload: float  # requests the cloud answered, of all
    escalated: float  # requests sent to the cloud, of all
    accuracy: float
    errors: int  # requests the cloud did not answer (answered locally)
    seconds: float


def plan_for(share: int, manifest: Manifest, confidence: npt.NDArray[Any]) -> HybridPlan:
    """The plan the planner would give a device asked to send ``share`` % of its requests."""
    now = datetime.now(UTC)
    mode: PlanMode = "escalate"
    tau = 0.0
    if share == 0:
        mode = "local"
    elif share == 100:
        mode = "cloud_first"
    else:
        counts = np.bincount(
            np.clip((confidence * CONFIDENCE_BINS).astype(int), 0, CONFIDENCE_BINS - 1),
            minlength=CONFIDENCE_BINS,
        )
        tau = float(confidence_quantile(counts[None, :], np.array([share / 100]))[0])
    return HybridPlan(
        plan_id=f"p-bench-{share:03d}",
        device_id=DEVICE,
        mode=mode,
        temperature=manifest.fallback.temperature,
        tau=tau,
        quota_rate=1e6,
        quota_burst=1_000_000,
        audit_rate=0.0,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
    )


async def run_share(
    chain: FallbackChain, plan: HybridPlan, rows: npt.NDArray[Any], labels: npt.NDArray[Any]
) -> Point:
    chain.set_hybrid_plan(plan)
    slots = asyncio.Semaphore(CONCURRENCY)
    correct = answered_by_cloud = escalated = errors = 0

    async def one(i: int) -> None:
        nonlocal correct, answered_by_cloud, escalated, errors
        async with slots:
            answer = await chain.infer({"features": rows[i : i + 1]})
        scores = next(iter(answer.outputs.values()))
        correct += int(int(np.asarray(scores)[0].argmax()) == int(labels[i]))
        route = answer.hybrid
        if answer.stage == "cloud":
            answered_by_cloud += 1
        if route is not None and route.route == "escalated":
            escalated += 1
            errors += int(route.cloud_error is not None)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(rows))))
    n = len(rows)
    return Point(
        share=int(plan.plan_id.rsplit("-", 1)[1]),
        mode=plan.mode,
        tau=plan.tau,
        offload=answered_by_cloud / n,
        escalated=escalated / n,
        accuracy=correct / n,
        errors=errors,
        seconds=time.perf_counter() - started,
    )


def measure(rows: int, device_model: str, cloud_model: str) -> list[Point]:
    heldout = np.load(MODELS / "heldout.npz")
    x, y = heldout["X"][:rows].astype(np.float32), heldout["y"][:rows]
    with tempfile.TemporaryDirectory(prefix="hybrid-accuracy-") as tmp:
        work = Path(tmp)
        keys = init_keys(work / "keys")
        repo = ImageRepository(work / "repo")
        repo.create(keys)
        device_bundle = make_bundle(work, device_model, "2.0.0")
        cloud_bundle = make_bundle(work, cloud_model, "2.0.1", hardware=(CLOUD_HARDWARE,))
        repo.add_bundle(device_bundle, keys)
        repo.add_bundle(cloud_bundle, keys)
        (work / "server").mkdir()
        server = ServerThread(work / "server", f"sqlite:///{work / 'server' / 'fleet.db'}")
        cloud: CloudProcess | None = None
        try:
            token = server.admin_token
            r = server.request(
                "POST", "/api/v1/releases", token=token, json={"files": repository_files(repo.path)}
            )
            assert r.status in (200, 201), r.data[:300]
            r = server.request(
                "POST",
                "/api/v1/devices",
                token=token,
                json={"device_id": DEVICE, "hardware_id": HARDWARE},
            )
            assert r.status in (200, 201), r.data[:300]
            password = str(r.json()["password"])
            cloud = CloudProcess(
                work,
                [
                    "--data",
                    str(server.config.data_dir),
                    "--trusted-root",
                    str(repo.trusted_root_path),
                    "--capacity",
                    "1000000",
                    "--default-quota-rate",
                    "1000000",
                    "--default-quota-burst",
                    "1000000",
                ],
            )
            cloud.start()
            manifest, members = read_bundle(device_bundle.open("rb"))
            runtime = default_runtime()
            model = runtime.load(members[manifest.model_file])
            probabilities = model.run({"features": x})[manifest.fallback.confidence_output or ""]
            confidence = calibrated_confidence(probabilities, manifest.fallback.temperature)
            chain = FallbackChain(
                ModelSlot(manifest, model),
                cloud=CloudStage(
                    cloud.url, manifest.name, timeout_s=10.0, username=DEVICE, password=password
                ),
            )

            async def all_shares() -> list[Point]:
                points = []
                for share in SHARES:
                    points.append(
                        await run_share(chain, plan_for(share, manifest, confidence), x, y)
                    )
                return points

            return asyncio.run(all_shares())
        finally:
            if cloud is not None:
                cloud.stop()
            server.close()


def table(points: list[Point]) -> str:
    lines = [
        "| offload asked | mode | tau | sent to the cloud | answered by the cloud | accuracy | "
        "cloud failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.share} % | {p.mode} | {p.tau:.3f} | {p.escalated:.1%} | {p.offload:.1%} | "
            f"{p.accuracy:.2%} | {p.errors} |"
        )
    return "\n".join(lines)


def verdict(points: list[Point]) -> str:
    by_share = {p.share: p for p in points}
    local, cloud, twenty = by_share[0].accuracy, by_share[100].accuracy, by_share[20].accuracy
    gap = cloud - local
    if gap <= 0:
        return (
            f"the cloud model alone ({cloud:.2%}) is not better than the device model alone "
            f"({local:.2%}): there is no gap to recover"
        )
    recovered = (twenty - local) / gap
    return (
        f"device model alone {local:.2%}, cloud model alone {cloud:.2%} (gap {gap:.2%}); "
        f"20 % offload {twenty:.2%}: {recovered:.0%} of the gap recovered "
        f"({'at least' if recovered >= 0.5 else 'less than'} half)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hybrid_accuracy")
    parser.add_argument("--rows", type=int, default=5000, help="held-out rows (default 5000)")
    parser.add_argument("--device-model", default="v2", help="the device model (default v2)")
    parser.add_argument("--cloud-model", default="cloud", help="the cloud model (default cloud)")
    args = parser.parse_args(argv)
    points = measure(args.rows, args.device_model, args.cloud_model)
    print(table(points))
    print()
    print(verdict(points))


if __name__ == "__main__":
    main()
