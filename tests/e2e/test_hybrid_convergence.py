"""Hybrid inference end to end: 50 simulated devices, the real server, broker and cloud endpoint.

Each device runs the agent's own serving chain, window recorder, MQTT link
and director client (:mod:`simulator.sim_device`) against a real
``fleet-server`` (SQLite), the machine's Mosquitto (a topic namespace of the
test's own) and a real ``fleet-server cloud`` endpoint. Devices differ in
request rate and weight. The operator sets the cloud's capacity C, the plans
settle on what the devices reported, then C is cut by half. The scenario runs
once for the module (:func:`run`); each test checks one thing the issue asks:

- every request is answered;
- the plans the devices follow fit C/2 within three window lengths of the
  cut, and then the capacity handed out stays within C/2 and no device's
  share falls back;
- no device sends the cloud more than its plan's token bucket allows in any
  window (``escalated + audits <= rate * seconds + burst``, from the windows
  the devices reported);
- Jain's index of the weighted shares, as planned and as served, is >= 0.9;
- the endpoint never answers more than C plus the headroom in any second.

Windows are 5 s and the server plans again every 2 s, so the module takes
about two minutes; its deadlines are generous, and it asserts behaviour, not
speed. Convergence is asked for in window lengths: of the three windows the
fleet has to follow the cut, a loaded two-core machine takes up to about
12 s in the server's planning and the devices' fetching and checking of 50
signed plans, which 5-s windows leave room for.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.hybrid.planner import weighted_fairness
from model_runtime import default_runtime
from simulator.hybrid_fleet import HybridDeployment, SimFleet, Traffic
from simulator.sim_device import SimDevice
from testbed.images import MODELS
from testbed.waiting import observe_for, wait_until

pytestmark = pytest.mark.integration

DEVICES = 50
WINDOW_S = 5.0
REPLAN_S = 2.0
C_BEFORE = 80.0
C_AFTER = 40.0
HEADROOM = 0.1
SETTINGS_REFRESH_S = 0.5  # how often the endpoint reads capacity and quotas
WEIGHTS = (1.0, 2.0)
MAX_AUDITS_IN_FLIGHT = 2  # an audit sent in one window may be counted in the next
STABLE_WINDOWS = 13  # watched after convergence: the plans stay put, the served shares are fair


def rates(n: int, seed: int = 13) -> list[float]:
    """Request rates between 2 and 6 requests a second."""
    rng = np.random.default_rng(seed)
    return [float(r) for r in rng.uniform(2.0, 6.0, n)]


def converged(fleet: SimFleet, capacity: float, since: datetime) -> bool:
    """Every device follows a local plan or one issued after ``since``; together they fit C.

    What the devices follow is what can reach the cloud: the quotas in their
    chains, not the server's newest rows (which a device reads a moment later).
    """
    plans = [d.plan for d in fleet.devices.values()]
    # A local plan sends nothing: it fits any capacity, and the cut need not re-issue it.
    if any(p is None or (p.issued_at < since and p.mode != "local") for p in plans):
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


class EndpointCounts:
    """The endpoint's answered-request counter, sampled every quarter second in a thread."""

    def __init__(self, deployment: HybridDeployment) -> None:
        self.deployment = deployment
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                text = self.deployment.cloud.metrics()
            except Exception:  # the endpoint may be stopping
                continue
            ok = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "edgefleet_cloud_requests_total"
                and sample.labels.get("outcome") == "ok"
            )
            self.samples.append((time.monotonic(), ok))

    def peak_per_second(self, start: float, end: float) -> float:
        """The most requests answered in any second between ``start`` and ``end`` (monotonic)."""
        s = [(t, c) for t, c in self.samples if start <= t <= end]
        peak = 0.0
        for i, (t0, c0) in enumerate(s):
            for t1, c1 in s[i + 1 :]:
                if t1 - t0 >= 1.0:
                    peak = max(peak, (c1 - c0) / (t1 - t0))
                    break
        return peak

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@dataclass
class Run:
    """What one run of the scenario left to check."""

    fleet: SimFleet
    weights: dict[str, float]
    final: dict[str, dict[str, Any]]  # the server's plans once the fleet followed the cut
    history: list[dict[str, dict[str, Any]]]  # the server's plans every second after that
    endpoint: EndpointCounts
    settled_at: float
    cut_at: float
    converged_at: float
    measured_to: float
    call_failures: dict[str, dict[str, int]]  # cloud calls failed after convergence, by kind
    report: dict[str, Any]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The scenario, once for the module: settle on C, cut it by half, watch."""
    tmp_path = tmp_path_factory.mktemp("hybrid-convergence")
    deployment = HybridDeployment(
        tmp_path,
        server_args=["--plan-interval", str(REPLAN_S)],
        cloud_args=["--settings-refresh", str(SETTINGS_REFRESH_S), "--model-refresh", "600"],
    )
    try:
        yield scenario(deployment, tmp_path)
    finally:
        deployment.close()


def scenario(deployment: HybridDeployment, tmp_path: Path) -> Run:
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
            install=False,  # the plan's rules are under test; installs have their own
            cloud_timeout_s=5.0,
        )
        devices.append(SimDevice(config, deployment.installed, runtime, seed=i))
    fleet = SimFleet(devices)
    traffic = {
        d.device_id: Traffic(request_rates[i], rows, labels, seed=i) for i, d in enumerate(devices)
    }
    deployment.set_capacity(C_BEFORE, HEADROOM)
    plan_log = PlanLog(deployment, tmp_path / "plans.jsonl")
    endpoint = EndpointCounts(deployment)
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
        time.sleep(3 * WINDOW_S)  # the fleet served by plans that fit C, watched
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
        errors_before = {i: Counter(d.stats.cloud_errors) for i, d in fleet.devices.items()}
        final = deployment.plans()
        # Then the plans stay put: watched for several windows.
        history: list[dict[str, dict[str, Any]]] = []

        def drifted() -> bool:
            history.append(deployment.plans())
            return False

        observe_for(STABLE_WINDOWS * WINDOW_S, drifted, every=1.0)
        measured_to = time.monotonic()
        call_failures = {
            i: dict(failed)
            for i, d in fleet.devices.items()
            if (failed := d.stats.cloud_errors - errors_before[i])
        }
    finally:
        fleet.stop()
        print(plan_log.close())
        endpoint.close()
    peaks = {
        "devices_peak_per_second_before_cut": max_per_second(
            [
                t
                for d in fleet.devices.values()
                for t in d.stats.cloud_answers
                if settled_at < t < cut_at
            ]
        ),
        "devices_peak_per_second_after_cut": max_per_second(
            [
                t
                for d in fleet.devices.values()
                for t in d.stats.cloud_answers
                if converged_at < t < measured_to
            ]
        ),
    }

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
        **peaks,
        "cloud_call_failures_measured": call_failures,
        "adopted_after_cut_s": sorted(
            round(
                next(at for at, _ in d.stats.plan_changes[::-1] if at <= converged_at) - cut_at, 1
            )
            for d in fleet.devices.values()
        ),
    }
    print(f"hybrid convergence: {report}")
    return Run(
        fleet,
        weights,
        final,
        history,
        endpoint,
        settled_at,
        cut_at,
        converged_at,
        measured_to,
        call_failures,
        report,
    )


def test_every_request_is_answered(run: Run) -> None:
    failed = {i: d.stats.failed[:3] for i, d in run.fleet.devices.items() if d.stats.failed}
    assert failed == {}
    assert all(d.stats.answered == d.stats.requests > 0 for d in run.fleet.devices.values())


def test_the_plans_converge_within_three_windows_of_the_cut_and_stay_within_it(run: Run) -> None:
    # Windows close every WINDOW_S seconds (and early when a new plan arrives, so their count
    # would overstate the time): the fleet follows plans that fit C/2 within three window
    # lengths of the cut.
    assert run.converged_at - run.cut_at <= 3 * WINDOW_S, run.report
    # Then the capacity handed out fits C/2, and no share falls back. A device whose link the
    # planner judges too slow or failing (cloud latency p95 above its bound, failed calls) is
    # planned local instead and its share goes to the others: that is the planner's rule, not
    # a failure to converge, and a loaded machine makes 50 devices in one process see slow
    # answers now and then, so those moves are reported, not failed.
    moved: set[str] = set()
    for plans in run.history:
        handed = sum(p["quota_rate"] for p in plans.values())
        assert handed <= C_AFTER * (1 - HEADROOM) * 1.02, f"{handed} handed out after the cut"
        for device_id, p in plans.items():
            before = run.final[device_id]["share"] or 0.0
            if device_id not in link_moves(run) and (p["share"] or 0.0) < before * 0.75:
                moved.add(device_id)  # what others leave goes to the rest: only a loss counts
    assert len(moved) <= DEVICES // 10, {**run.report, "moved": sorted(moved)}


def link_moves(run: Run) -> set[str]:
    """Devices planned local for their link (latency, failed calls) after convergence."""
    return {
        device_id
        for plans in run.history
        for device_id, p in plans.items()
        if p["mode"] == "local"
        and ("latency" in (p.get("why") or "") or "failed" in (p.get("why") or ""))
    }


def calls_failed(run: Run) -> set[str]:
    """Devices with cloud calls that timed out or found the endpoint unavailable after
    convergence: what they were served says how starved the machine was, not how the plans
    share. A call refused over quota is the plans' doing and leaves its device in."""
    return {
        device_id
        for device_id, failed in run.call_failures.items()
        if failed.get("timeout") or failed.get("unavailable")
    }


def test_no_device_sends_the_cloud_more_than_its_quota(run: Run) -> None:
    # Every window a device reported: cloud calls <= rate * seconds + burst of its plan.
    over = []
    for device in run.fleet.devices.values():
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


def test_the_weighted_shares_are_fair(run: Run) -> None:
    # Jain's index of share / weight over the devices the split holds back (leaving out those
    # planned local for their link at any time after convergence: they demand nothing; and,
    # for the shares served, those whose calls timed out or found the endpoint unavailable).
    gone = link_moves(run)
    ids = [i for i in sorted(run.final) if i not in gone and run.final[i]["mode"] != "local"]
    share = np.array([run.final[i]["share"] or 0.0 for i in ids])
    demand = np.array([run.final[i]["inputs"].get("rate", 0.0) for i in ids])
    w = np.array([run.weights[i] for i in ids])
    bottlenecked = share < demand * 0.999
    planned = weighted_fairness(share, w, bottlenecked)
    span = run.measured_to - run.converged_at
    served = np.array(
        [
            sum(
                1
                for t in run.fleet.devices[i].stats.cloud_answers
                if run.converged_at <= t <= run.measured_to
            )
            / span
            for i in ids
        ]
    )
    failed = calls_failed(run)
    kept = np.array([i not in failed for i in ids], dtype=bool)
    observed = weighted_fairness(served[kept], w[kept], bottlenecked[kept])
    report = {
        **run.report,
        "planned_jain": planned,
        "served_jain": observed,
        "served_leaves_out": sorted(failed),
    }
    print(
        f"fairness: planned {planned:.3f}, served {observed:.3f}, {bottlenecked.sum()} held back, "
        f"{len(failed)} left out of the served index for calls that timed out or found no endpoint"
    )
    assert bottlenecked.sum() >= 5, report  # enough devices held back for the index to say much
    assert (bottlenecked & kept).sum() >= 5, report
    assert planned >= 0.9, report
    assert observed >= 0.9, report


def test_the_endpoint_never_answers_more_than_c_plus_headroom_in_a_second(run: Run) -> None:
    # C before the cut (once the plans had settled on it), C/2 once the plans follow the cut,
    # counted by the endpoint itself (its answered requests, sampled every quarter second).
    before = run.endpoint.peak_per_second(run.settled_at, run.cut_at)
    after = run.endpoint.peak_per_second(run.converged_at, run.measured_to)
    report = {**run.report, "peak_before_cut": before, "peak_after_cut": after}
    print(f"endpoint peak per second: {before:.1f} at C={C_BEFORE:g}, {after:.1f} at C={C_AFTER:g}")
    assert before <= C_BEFORE * (1 + HEADROOM), report
    assert after <= C_AFTER * (1 + HEADROOM), report
