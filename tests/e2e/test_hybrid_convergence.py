"""Hybrid inference end to end: 50 simulated devices, the real server, broker and cloud endpoint.

Each device runs the agent's own serving chain, window recorder, MQTT link
and director client (:mod:`simulator.sim_device`) against a real
``fleet-server`` (SQLite), the machine's Mosquitto (a topic namespace of the
test's own) and a real ``fleet-server cloud`` endpoint. Devices differ in
request rate and weight. The operator sets the cloud's capacity C, the plans
settle, then C is cut by half; the test checks what the issue asks:

- the plans converge within three windows of each device after the cut (the
  device follows its final plan by its third window after the cut, and the
  plans then stay put);
- no device sends the cloud more than its plan's token bucket allows in any
  window (``escalated + audits <= rate * seconds + burst``, from the windows
  the devices reported);
- the cloud's answers never exceed C plus the headroom in any second once
  the endpoint follows the new C;
- Jain's index of the weighted shares, as planned and as served, is >= 0.9;
- every request is answered.

Windows are 2 s and the server plans again every 2 s, so the test takes about
a minute; its deadlines are generous, and it asserts behaviour, not speed.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.hybrid.planner import weighted_fairness
from model_runtime import default_runtime
from simulator.hybrid_fleet import HybridDeployment, SimFleet, Traffic
from simulator.sim_device import SimDevice
from testbed.images import MODELS
from testbed.waiting import observe_for, wait_until

pytestmark = pytest.mark.integration

DEVICES = 50
WINDOW_S = 2.0
REPLAN_S = 2.0
C_BEFORE = 80.0
C_AFTER = 40.0
HEADROOM = 0.1
SETTINGS_REFRESH_S = 0.5  # how often the endpoint reads capacity and quotas
WEIGHTS = (1.0, 2.0)
MAX_AUDITS_IN_FLIGHT = 2  # an audit sent in one window may be counted in the next
STABLE_WINDOWS = 10  # watched after convergence: the plans stay put, the served shares are fair


def rates(n: int, seed: int = 13) -> list[float]:
    """Request rates between 2 and 6 requests a second."""
    rng = np.random.default_rng(seed)
    return [float(r) for r in rng.uniform(2.0, 6.0, n)]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[HybridDeployment]:
    d = HybridDeployment(
        tmp_path,
        server_args=["--plan-interval", str(REPLAN_S)],
        cloud_args=["--settings-refresh", str(SETTINGS_REFRESH_S), "--model-refresh", "600"],
    )
    try:
        yield d
    finally:
        d.close()


def converged(fleet: SimFleet, capacity: float, since: datetime) -> bool:
    """Every device follows a plan issued after ``since``, and together they fit ``capacity``.

    What the devices follow is what can reach the cloud: the quotas in their
    chains, not the server's newest rows (which a device reads a moment later).
    """
    plans = [d.plan for d in fleet.devices.values()]
    if any(p is None or p.issued_at < since for p in plans):
        return False
    handed = sum(p.quota_rate for p in plans if p is not None)
    return handed <= capacity * (1 - HEADROOM) * 1.02


def following(fleet: SimFleet, plans: dict[str, dict[str, Any]], capacity: float) -> bool:
    """Every device follows the plan the server holds for it now, and the plans fit ``capacity``."""
    if len(plans) < len(fleet.devices):
        return False
    if sum(p["quota_rate"] for p in plans.values()) > capacity * (1 - HEADROOM) * 1.02:
        return False
    return all(
        d.plan is not None and d.plan.plan_id == plans[i]["plan_id"]
        for i, d in fleet.devices.items()
    )


def reported(fleet: SimFleet, windows: int) -> bool:
    """Every device has closed ``windows`` windows (the server has its rate and confidence)."""
    return all(len(d.stats.windows) >= windows for d in fleet.devices.values())


class PlanLog:
    """The server's plans sampled every second in a thread: what a failure shows."""

    def __init__(self, deployment: HybridDeployment, path: Path) -> None:
        self.deployment, self.path = deployment, path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        with self.path.open("w") as out:
            while not self.stop.wait(1.0):
                try:
                    plans = self.deployment.plans()
                except Exception as exc:  # the server may be stopping
                    out.write(f"{exc}\n")
                    continue
                modes = Counter(p["mode"] for p in plans.values())
                handed = sum(p["quota_rate"] for p in plans.values())
                reasons = Counter(r for p in plans.values() for r in p.get("issued_for") or [])
                out.write(
                    json.dumps(
                        {
                            "t": round(time.monotonic() - started, 1),
                            "modes": modes,
                            "handed": round(handed, 1),
                            "reasons": reasons.most_common(3),
                            "local": [
                                (i[-2:], p.get("why"), p["inputs"].get("link_errors"))
                                for i, p in sorted(plans.items())
                                if p["mode"] == "local"
                            ][:3],
                        }
                    )
                    + "\n"
                )
                out.flush()

    def close(self) -> str:
        self.stop.set()
        self.thread.join(10)
        return self.path.read_text()


def max_per_second(times: list[float]) -> int:
    """The most events in any one-second interval."""
    ts = np.sort(np.asarray(times))
    if ts.size == 0:
        return 0
    ends = np.searchsorted(ts, ts + 1.0, side="left")
    return int(np.max(ends - np.arange(ts.size)))


def test_plans_converge_after_a_capacity_cut_within_quota_capacity_and_fairly(
    deployment: HybridDeployment, tmp_path: Path
) -> None:
    heldout = np.load(MODELS / "heldout.npz")
    rows, labels = heldout["X"], heldout["y"]
    prefix = f"hyb-{secrets.token_hex(3)}"
    runtime = default_runtime()
    request_rates = rates(DEVICES)
    weights = {f"{prefix}-{i:02d}": WEIGHTS[i % len(WEIGHTS)] for i in range(DEVICES)}
    devices = []
    for i, device_id in enumerate(weights):
        registered = deployment.register(device_id, weight=weights[device_id])
        config = deployment.device_config(
            registered,
            tmp_path / "devices" / device_id,
            window_s=WINDOW_S,
            plan_poll_s=10.0,
            cloud_timeout_s=5.0,
        )
        devices.append(SimDevice(config, deployment.installed, runtime, seed=i))
    fleet = SimFleet(devices)
    traffic = {
        d.device_id: Traffic(request_rates[i], rows, labels, seed=i) for i, d in enumerate(devices)
    }
    deployment.set_capacity(C_BEFORE, HEADROOM)
    plan_log = PlanLog(deployment, tmp_path / "plans.jsonl")
    fleet.start(traffic)
    try:
        # The plans settle on C, planned from what the devices reported.
        wait_until("every device to report windows", lambda: reported(fleet, 3), timeout=120)
        wait_until(
            "every device to follow the server's plan, the plans fitting C",
            lambda: following(fleet, deployment.plans(), C_BEFORE),
            timeout=120,
            every=0.5,
        )
        settled_at = time.monotonic()
        # The cut: C by half; converged once every device follows a plan that fits C/2.
        cut_at, cut_wall = time.monotonic(), datetime.now(UTC)
        deployment.set_capacity(C_AFTER, HEADROOM)
        capacity_set_at = time.monotonic()
        wait_until(
            "every device to follow a plan that fits C/2",
            lambda: converged(fleet, C_AFTER, cut_wall),
            timeout=120,
            every=0.25,
        )
        converged_at = time.monotonic()
        final = deployment.plans()
        # Then the plans stay put: watched for several windows.
        history: list[dict[str, dict[str, Any]]] = []

        def drifted() -> bool:
            history.append(deployment.plans())
            return False

        observe_for(STABLE_WINDOWS * WINDOW_S, drifted, every=1.0)
        measured_to = time.monotonic()
    finally:
        fleet.stop()
        print(plan_log.close())

    ids0 = sorted(fleet.devices)[0]
    report: dict[str, Any] = {
        "convergence_s": round(converged_at - cut_at, 2),
        "stuck_at_stop": fleet.stuck,
        "capacity_call_s": round(capacity_set_at - cut_at, 2),
        "first_device_timeline": [
            (
                round(at - cut_at, 1),
                plan_id,
                round(fleet.devices[ids0].stats.plans[plan_id].quota_rate, 2) if plan_id else None,
                round(
                    (fleet.devices[ids0].stats.plans[plan_id].issued_at - cut_wall).total_seconds(),
                    1,
                )
                if plan_id
                else None,
            )
            for at, plan_id in fleet.devices[ids0].stats.plan_changes
            if at > cut_at - 5
        ],
        "adopted_after_cut_s": sorted(
            round(
                next(at for at, _ in d.stats.plan_changes[::-1] if at <= converged_at) - cut_at, 1
            )
            for d in fleet.devices.values()
        ),
    }
    # Every request was answered: the caller never saw an error.
    failed = {i: d.stats.failed[:3] for i, d in fleet.devices.items() if d.stats.failed}
    assert failed == {}
    assert all(d.stats.answered == d.stats.requests > 0 for d in fleet.devices.values())

    # Converged within three windows of each device after the cut.
    late = {
        device_id: n
        for device_id, device in fleet.devices.items()
        if (n := sum(1 for at, _ in device.stats.windows if cut_at < at < converged_at)) > 3
    }
    assert late == {}, (
        f"devices that closed more than three windows before converging: {late} {report}"
    )
    # ... and stayed there: the capacity handed out fits C/2, and the shares stay put (a
    # device whose link the planner judges too slow or failing is planned local instead, which
    # a loaded machine can cause now and then: a few such moves are reported, not failed).
    moved = set()
    for plans in history:
        handed = sum(p["quota_rate"] for p in plans.values())
        assert handed <= C_AFTER * (1 - HEADROOM) * 1.02, f"{handed} handed out after the cut"
        for device_id, p in plans.items():
            before = final[device_id]["share"] or 0.0
            now = p["share"] or 0.0
            if abs(now - before) > 0.25 * max(before, 0.1):
                moved.add((device_id, p["mode"], p.get("why")))
    report["moved_after_convergence"] = sorted(moved)
    assert len({m[0] for m in moved}) <= DEVICES // 10, report

    # No device's windows show more cloud calls than its plan's bucket allows.
    over = []
    for device in fleet.devices.values():
        for _, window in device.stats.windows:
            h = window.hybrid
            if h is None:
                continue
            plan = device.stats.plans[h.plan_id]
            sent = h.escalated + h.audits
            allowed = plan.quota_rate * (window.end - window.start) + plan.quota_burst
            if sent > allowed + MAX_AUDITS_IN_FLIGHT:
                over.append((device.device_id, h.plan_id, sent, round(allowed, 1)))
    assert over == [], f"windows over their quota: {over[:10]}"

    # The endpoint's answers never exceed C plus the headroom in any second: C before the cut
    # (once the plans had settled on it), C/2 once the plans follow the cut.
    def answered_between(start: float, end: float) -> list[float]:
        return [t for d in fleet.devices.values() for t in d.stats.cloud_answers if start < t < end]

    report["peak_per_second_before_cut"] = max_per_second(answered_between(settled_at, cut_at))
    report["peak_per_second_after_cut"] = max_per_second(
        answered_between(converged_at, measured_to)
    )
    assert report["peak_per_second_before_cut"] <= C_BEFORE * (1 + HEADROOM), report
    assert report["peak_per_second_after_cut"] <= C_AFTER * (1 + HEADROOM), report

    # Fairness: Jain's index of share / weight over the devices the split holds back.
    ids = sorted(final)
    share = np.array([final[i]["share"] or 0.0 for i in ids])
    demand = np.array([final[i]["inputs"].get("rate", 0.0) for i in ids])
    w = np.array([weights[i] for i in ids])
    bottlenecked = share < demand * 0.999
    planned = weighted_fairness(share, w, bottlenecked)
    served = np.array(
        [
            sum(1 for t in fleet.devices[i].stats.cloud_answers if converged_at <= t <= measured_to)
            / (measured_to - converged_at)
            for i in ids
        ]
    )
    observed = weighted_fairness(served, w, bottlenecked)
    report.update(planned_jain=planned, served_jain=observed, bottlenecked=int(bottlenecked.sum()))
    print(f"hybrid convergence: {report}")
    assert bottlenecked.sum() >= DEVICES // 2, report
    assert planned >= 0.9, report
    assert observed >= 0.9, report
