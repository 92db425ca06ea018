"""Simulated devices install what the real fleet server assigns, with the real installer.

A real ``fleet-server`` process (its own SQLite database and MQTT topic
namespace on the machine's Mosquitto), the sample models released into its
image repository, and a few :class:`~simulator.sim_device.SimDevice` in one
process: an assigned release is downloaded, verified, staged, self-tested,
tried and committed; a bad model is rolled back by the watchdog on its own;
a power cut mid-install leaves a device that boots on a verified model and
finishes; a full disk loses no window; a lost desired-state push is made up
for by the poll; and devices share one interpreter per model file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry import Outbox
from firmware_images.datagen import FieldConditions, generate
from fleet_server.release.repository import ReleasedBundle
from model_runtime import default_runtime
from simulator.device_parts import SharedRuntime, shared_runtime
from simulator.hybrid_fleet import HybridDeployment, SimFleet, Traffic
from simulator.scenario import INSTALL_STEPS
from simulator.sim_device import SimDevice
from testbed.api_server import repository_files
from testbed.images import make_bundle
from testbed.waiting import wait_until

pytestmark = pytest.mark.integration

_ids = count()
_lock = threading.Lock()


@dataclass(frozen=True)
class Fleet:
    deployment: HybridDeployment
    good: ReleasedBundle  # 2.1.0: the v1 sample model, a working upgrade of the factory 2.0.0
    bad: ReleasedBundle  # 3.0.0: v3-bad, which answers NaN for idle machines


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("sim-install")
    deployment = HybridDeployment(workdir / "fleet")
    try:
        bundles = workdir / "bundles"
        bundles.mkdir()
        keys = deployment.keys
        good = deployment.repo.add_bundle(make_bundle(bundles, "v1", "2.1.0"), keys)
        bad = deployment.repo.add_bundle(make_bundle(bundles, "v3-bad", "3.0.0"), keys)
        deployment.api("POST", "/releases", {"files": repository_files(deployment.repo.path)})
        yield Fleet(deployment, good, bad)
    finally:
        deployment.close()


def new_devices(
    fleet: Fleet, tmp_path: Path, n: int, runtime: Any = None, **settings: Any
) -> list[SimDevice]:
    """``n`` newly registered devices of the fleet, each with its own data folder."""
    runtime = runtime or default_runtime()
    settings = {"window_s": 1.0, "plan_poll_s": 30.0, "poll_s": 2.0, "health_period_s": 2.0} | (
        settings
    )
    devices: list[SimDevice] = []
    for _ in range(n):
        with _lock:
            device_id = f"sim-{next(_ids)}"
        registered = fleet.deployment.register(device_id)
        config = fleet.deployment.device_config(registered, tmp_path / device_id, **settings)
        devices.append(SimDevice(config, fleet.deployment.installed, runtime, seed=len(devices)))
    return devices


def traffic(
    devices: list[SimDevice], rate: float = 20.0, idle_share: float = 0.0
) -> dict[str, Traffic]:
    rows, labels = generate(400, 7, FieldConditions(idle_share=idle_share))
    return {d.device_id: Traffic(rate, rows, labels, seed=i) for i, d in enumerate(devices)}


def assign(fleet: Fleet, release: ReleasedBundle, devices: list[SimDevice]) -> None:
    fleet.deployment.api(
        "POST",
        "/assignments",
        {"release": release.target_path, "devices": [d.device_id for d in devices]},
    )


def committed(device: SimDevice, version: str) -> bool:
    snap = device.snapshot()
    return snap.active_version == version and snap.phase == "idle" and snap.verified


def verified(device: SimDevice) -> bool:
    return device.snapshot().verified


def last_reason(device: SimDevice) -> str | None:
    """The reason of the device's last install outcome, if any."""
    outcome = device.installer.journal.last_outcome if device.installer else None
    return outcome.reason if outcome is not None else None


def server_counter_is(fleet: Fleet, device: SimDevice, counter: int) -> bool:
    """The server's registry shows ``device`` with ``counter`` installed."""
    view = fleet.deployment.api("GET", f"/devices/{device.device_id}")
    return bool(view["installed_counter"] == counter)


def assert_served_throughout(device: SimDevice) -> None:
    stats = device.stats
    assert stats.failed == [], stats.failed[:5]
    assert stats.answered == stats.requests
    assert stats.unserved == [], stats.unserved[:5]


def assert_slots_intact(device: SimDevice) -> None:
    """The active slot holds a complete bundle: every file matches its manifest."""
    import hashlib

    slots = device.config.data_dir / "slots"
    pointer = json.loads((slots / "current.json").read_text())
    manifest = json.loads((slots / pointer["active"] / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (slots / pointer["active"] / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} is torn"


@pytest.fixture
def running() -> Iterator[list[SimFleet]]:
    """Fleets a test started; stopped at its end whatever happened."""
    started: list[SimFleet] = []
    yield started
    for sim in started:
        sim.stop()


def start(running: list[SimFleet], devices: list[SimDevice], **kwargs: Any) -> SimFleet:
    sim = SimFleet(devices)
    running.append(sim)
    sim.start(traffic(devices, **kwargs))
    for device in devices:
        wait_until(f"{device.device_id} up", partial(verified, device), 60)
    return sim


def test_an_assigned_release_is_installed_and_committed(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    devices = new_devices(fleet, tmp_path, 3)
    start(running, devices)
    assert {d.snapshot().active_version for d in devices} == {"2.0.0"}
    wait_until("the devices online", lambda: all(d.snapshot().online for d in devices), 60)

    assign(fleet, fleet.good, devices)
    for device in devices:
        wait_until(f"{device.device_id} on 2.1.0", partial(committed, device, "2.1.0"), 120)
    running.pop().stop()

    for device in devices:
        assert device.stats.installs == {"committed": 1}
        assert device.stats.desired_pushes >= 1
        assert device.stats.stages["active"] > 0
        assert_served_throughout(device)
        assert_slots_intact(device)
        journal = json.loads((device.config.data_dir / "journal.json").read_text())
        assert journal["installed"]["version"] == "2.1.0"
        assert journal["installed_counter"] == fleet.good.release_counter
    # The link reported the install to the server.
    for device in devices:
        wait_until(
            f"the server to see {device.device_id} on 2.1.0",
            partial(server_counter_is, fleet, device, fleet.good.release_counter),
            30,
        )


def test_a_bad_model_is_rolled_back_by_the_watchdog(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1, health_period_s=60.0)
    start(running, [device], rate=40.0, idle_share=0.3)

    assign(fleet, fleet.bad, [device])
    wait_until("the rollback", lambda: device.stats.installs["rolled_back"] == 1, 120)
    running.pop().stop()

    outcome = device.installer.journal.last_outcome  # type: ignore[union-attr]
    assert outcome is not None
    assert (outcome.result, outcome.reason) == ("rolled_back", "watchdog")
    assert outcome.target.version == "3.0.0" and "NaN" in (outcome.message or "")
    assert device.snapshot().active_version == "2.0.0"
    assert device.stats.failed == [] and device.stats.answered == device.stats.requests
    assert device.stats.stages["previous"] > 0, "2.0.0 answered what 3.0.0 could not"


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_a_power_cut_mid_install_boots_on_a_verified_model(
    step: str, fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1)
    start(running, [device])
    device.faults.power_cut_at = step

    assign(fleet, fleet.good, [device])
    wait_until(f"the power cut at {step}", lambda: device.stats.reboots >= 1, 120)
    assert device.stats.power_cuts == 1 and device.faults.power_cut_at is None
    wait_until("the device up again", lambda: device.snapshot().verified, 60)
    assert device.snapshot().active_version in ("2.0.0", "2.1.0")
    assert_slots_intact(device)
    wait_until("2.1.0 committed after the reboot", lambda: committed(device, "2.1.0"), 120)
    wait_until("the link again", lambda: device.snapshot().online, 60)
    running.pop().stop()

    assert device.stats.installs == {"committed": 1}
    assert_served_throughout(device)
    assert_slots_intact(device)


def test_a_power_cut_now_reboots_the_device_and_its_link(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1)
    start(running, [device])
    wait_until("online", lambda: device.snapshot().online, 60)
    first_link = device.link

    device.power_cut()
    wait_until("the reboot", lambda: device.stats.reboots == 1 and device.snapshot().verified, 60)
    wait_until("online again", lambda: device.snapshot().online, 60)
    assert device.link is not first_link and not first_link.connected
    answered = device.stats.answered
    wait_until("requests answered after the reboot", lambda: device.stats.answered > answered + 5)
    running.pop().stop()
    assert_served_throughout(device)


def stored_windows(fleet: Fleet, device: SimDevice) -> list[str]:
    """The ids of every window of ``device`` the server stored (a repeat would show twice)."""
    ids: list[str] = []
    before = None
    while True:
        query = f"/devices/{device.device_id}/windows?limit=1000"
        if before is not None:
            query += f"&before={before}"
        page = fleet.deployment.api("GET", query)
        ids += [w["window_id"] for w in page["windows"]]
        before = page.get("next_before")
        if before is None:
            return ids


def test_a_full_disk_keeps_serving_and_loses_no_window(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1)
    start(running, [device])
    wait_until("a window stored", lambda: len(device.stats.windows) >= 1, 60)

    device.faults.disk_full = True
    wait_until("windows waiting for space", lambda: device.stats.windows_waiting >= 3, 60)
    assign(fleet, fleet.good, [device])
    wait_until(
        "staging refused by the full disk",
        lambda: last_reason(device) == "staging-failed",
        120,
    )
    assert device.snapshot().active_version == "2.0.0" and device.snapshot().verified
    waiting = device.stats.windows_waiting

    device.faults.disk_full = False
    wait_until("the waiting windows stored", lambda: device.stats.windows_waiting == 0, 60)
    wait_until("2.1.0 installed once there is space", lambda: committed(device, "2.1.0"), 180)
    # Every window closed so far, those held while the disk was full among them, reaches
    # the server while the device still runs.
    so_far = {w.window_id for _, w in device.stats.windows}
    wait_until(
        "the server to store every window closed so far",
        lambda: set(stored_windows(fleet, device)) >= so_far,
        60,
    )
    running.pop().stop()

    stats = device.stats
    assert stats.disk_full_errors >= waiting
    assert stats.windows_lost == 0
    assert_served_throughout(device)
    produced = [w.window_id for _, w in stats.windows]
    assert len(produced) == len(set(produced))
    stored = stored_windows(fleet, device)
    assert sorted(stored) == sorted(set(stored)), "a window stored twice"
    # Those closed since (the last at the stop) are stored or wait in the outbox for the
    # next start: none is lost, none is made up.
    with Outbox(device.config.data_dir / "outbox.db") as outbox:
        kept = {window_id for window_id, _ in outbox.pending(limit=10_000)}
    assert set(produced) <= set(stored) | kept
    assert set(stored) <= set(produced)


@pytest.mark.parametrize("mode", ["lost", "duplicate"])
def test_lost_and_duplicated_desired_pushes_still_install_once(
    mode: str, fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    # A lost push is made up for by the poll; a duplicated one asks twice, installs once.
    (device,) = new_devices(fleet, tmp_path, 1, poll_s=3.0)
    device.faults.desired = mode  # type: ignore[assignment]
    device.faults.desired_share = 1.0
    start(running, [device])

    assign(fleet, fleet.good, [device])
    wait_until("2.1.0 committed", lambda: committed(device, "2.1.0"), 120)
    running.pop().stop()

    stats = device.stats
    affected = stats.desired_lost if mode == "lost" else stats.desired_duplicated
    assert stats.desired_pushes >= 1 and affected == stats.desired_pushes
    assert stats.installs == {"committed": 1}
    assert_served_throughout(device)


def test_the_clock_offset_moves_the_device_clock(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1)
    device.faults.clock_offset_s = -3600.0
    start(running, [device])
    wait_until("a window stored", lambda: len(device.stats.windows) >= 2, 60)
    assign(fleet, fleet.good, [device])
    wait_until("2.1.0 committed", lambda: committed(device, "2.1.0"), 120)
    running.pop().stop()

    now = time.time()
    ends = [w.end for _, w in device.stats.windows]
    assert all(now - 3700 < end < now - 3500 for end in ends), ends[:3]
    events = [json.loads(line) for line in (device.config.data_dir / "events.jsonl").open()]
    assert events and all(now - 3700 < e["at"] < now - 3500 for e in events)
    outcome = device.installer.journal.last_outcome  # type: ignore[union-attr]
    assert outcome is not None and now - 3700 < outcome.at < now - 3500


def test_devices_share_one_interpreter_per_model(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    shared: SharedRuntime = shared_runtime(default_runtime())
    devices = new_devices(fleet, tmp_path, 8, runtime=shared)
    start(running, devices, rate=5.0)
    assign(fleet, fleet.good, devices)
    for device in devices:
        wait_until(f"{device.device_id} on 2.1.0", partial(committed, device, "2.1.0"), 180)
    running.pop().stop()

    interpreters = shared.interpreters()
    assert len(interpreters) == 2 and shared.loads == 2  # 2.0.0's model and 2.1.0's
    # Every device loaded both (boot, self-test) and got the same two interpreters.
    assert shared.requests >= 2 * len(devices)
    models = {id(d.chain.slots[0].model) for d in devices if d.chain.slots[0] is not None}
    assert len(models) == 1
    for device in devices:
        assert_served_throughout(device)


def test_the_hardware_profile_adds_its_inference_time(
    fleet: Fleet, tmp_path: Path, running: list[SimFleet]
) -> None:
    (device,) = new_devices(fleet, tmp_path, 1, inference_ms=80.0)
    sim = start(running, [device], rate=1.0)
    rows, _ = generate(1, 1)

    async def timed() -> float:
        started = time.monotonic()
        answer = await device.infer(rows[0])
        assert answer is not None and answer.stage == "active"
        return time.monotonic() - started

    assert sim.call(timed()) >= 0.08
