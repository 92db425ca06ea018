"""Simulated devices per process at steady state: resident memory and CPU per device.

A real ``fleet-server`` process (:class:`simulator.hybrid_fleet.HybridDeployment`:
its own SQLite database, a topic namespace of its own on the machine's
Mosquitto, the sample models released) has ``max(N)`` devices registered.
Then, for each N (0 is the baseline), a fresh Python process runs N
:class:`~simulator.sim_device.SimDevice` with the real installer on one event
loop (:class:`~simulator.hybrid_fleet.SimFleet`), each with its own MQTT
connection, credentials, data folder, outbox and director metadata, and
Poisson traffic of ``RATE`` requests a second. Once every device has booted,
is online and has stored a window, the process is left to settle for
``SETTLE_S`` and then measured for ``MEASURE_S``:

- resident memory (``VmRSS`` at the end; ``VmHWM``, the peak, including the
  start-up), and per device: ``(RSS(N) - RSS(0)) / N``;
- CPU time of the process (user + system, ``getrusage``) over the
  measurement, and per device per window: ``(CPU(N) - CPU(0)) / windows``
  where ``windows`` are those the N devices stored in that time;
- what the devices did meanwhile: requests answered against those offered
  (``N * RATE * MEASURE_S``), windows stored, devices online (a window
  starts at its first request and closes at the first telemetry tick
  ``WINDOW_S`` later, so at this rate a device closes one about every 6.5 s);
- the time from starting the devices until all of them had booted (factory
  model provisioned, installer recovered, first director check), were
  online and had stored a window.

The baseline (N = 0) is the same process — the same imports, the runtime
with the model loaded, the event loop and its thread pool running — without
devices. ``python -m benchmarks.sim_devices [N ...]`` (default 100 500 1000).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RATE = 1.0  # requests a second per device
WINDOW_S = 5.0
SETTLE_S = 10.0
MEASURE_S = 30.0
UP_TIMEOUT_S = 600.0
DEFAULT_SIZES = (100, 500, 1000)


@dataclass(frozen=True)
class Measured:
    """One process's figures (see the module docstring)."""

    devices: int
    up_s: float
    rss_mb: float
    hwm_mb: float
    cpu_s: float
    measured_s: float
    windows: int
    requests: int
    answered: int
    failed: int
    online: int
    threads: int


def _status(field: str) -> float:
    """A ``VmRSS``-like field of ``/proc/self/status``, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(spec_path: Path, n: int, out: Path) -> None:
    """Run ``n`` devices of the spec in this process and write what was measured to ``out``."""
    from agent.ota.journal import InstallTarget
    from firmware_images.datagen import generate
    from model_runtime import default_runtime
    from simulator.device_parts import shared_runtime
    from simulator.hybrid_fleet import SimFleet, Traffic
    from simulator.sim_device import InstalledModel, SimDevice, SimDeviceConfig
    from testbed.waiting import wait_until

    spec = json.loads(spec_path.read_text())
    installed = InstalledModel.from_bundle(
        Path(spec["bundle"]).read_bytes(), InstallTarget.model_validate(spec["target"])
    )
    runtime = shared_runtime(default_runtime())
    runtime.load(Path(spec["model"]))  # the baseline holds the model too
    work = Path(spec["workdir"]) / f"devices-{n}"
    devices = []
    for i, d in enumerate(spec["devices"][:n]):
        config = SimDeviceConfig(
            device_id=d["device_id"],
            password=d["password"],
            namespace=d["namespace"],
            hardware_id=spec["hardware_id"],
            server_url=spec["server_url"],
            broker=spec["broker"],
            director_root=Path(spec["director_root"]),
            repository_root=Path(spec["repository_root"]),
            data_dir=work / d["device_id"],
            window_s=WINDOW_S,
            plan_poll_s=600.0,
            poll_s=600.0,
            heartbeat_s=30.0,
            telemetry_tick_s=1.0,
        )
        devices.append(SimDevice(config, installed, runtime, seed=i))
    rows, labels = generate(500, 3)
    started = time.monotonic()
    fleet = SimFleet(devices)
    fleet.start({d.device_id: Traffic(RATE, rows, labels, seed=i) for i, d in enumerate(devices)})

    def up() -> bool:
        return all((s := d.snapshot()).verified and s.online and d.stats.windows for d in devices)

    try:
        wait_until(f"{n} devices up", up, UP_TIMEOUT_S, every=0.5)
        up_s = time.monotonic() - started
        time.sleep(SETTLE_S)
        windows0 = sum(len(d.stats.windows) for d in devices)
        requests0 = sum(d.stats.requests for d in devices)
        answered0 = sum(d.stats.answered for d in devices)
        cpu0, t0 = _cpu_s(), time.monotonic()
        time.sleep(MEASURE_S)
        cpu1, t1 = _cpu_s(), time.monotonic()
        measured = Measured(
            devices=n,
            up_s=round(up_s, 1),
            rss_mb=round(_status("VmRSS"), 1),
            hwm_mb=round(_status("VmHWM"), 1),
            cpu_s=round(cpu1 - cpu0, 3),
            measured_s=round(t1 - t0, 2),
            windows=sum(len(d.stats.windows) for d in devices) - windows0,
            requests=sum(d.stats.requests for d in devices) - requests0,
            answered=sum(d.stats.answered for d in devices) - answered0,
            failed=sum(len(d.stats.failed) for d in devices),
            online=sum(d.snapshot().online for d in devices),
            threads=len(os.listdir("/proc/self/task")),
        )
    finally:
        fleet.stop(60)
    out.write_text(json.dumps(asdict(measured)))


def _deployment_spec(workdir: Path, n: int) -> tuple[Any, Path]:
    """A running deployment with ``n`` devices registered, and the spec the children read."""
    from simulator.hybrid_fleet import HybridDeployment
    from testbed.images import HARDWARE, MODELS

    deployment = HybridDeployment(workdir / "fleet")
    bundle = workdir / "factory.bundle"  # the bundle released as 2.0.0, as the devices hold it
    assert deployment.installed.bundle is not None
    bundle.write_bytes(deployment.installed.bundle)
    registered = []
    for i in range(n):
        r = deployment.register(f"bench-{i:05d}")
        registered.append(
            {"device_id": r.device_id, "password": r.password, "namespace": r.namespace}
        )
    spec = {
        "workdir": str(workdir),
        "bundle": str(bundle),
        "model": str(MODELS / "v2.tflite"),
        "target": deployment.installed.target.model_dump(mode="json"),
        "hardware_id": HARDWARE,
        "server_url": deployment.server.url,
        "broker": deployment.broker,
        "director_root": str(deployment.director_root),
        "repository_root": str(deployment.repo.trusted_root_path),
        "devices": registered,
    }
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    return deployment, path


def _run_child(spec: Path, n: int) -> Measured:
    out = spec.parent / f"measured-{n}.json"
    log = spec.parent / f"devices-{n}.log"
    with log.open("wb") as stderr:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.sim_devices",
                "--child",
                str(spec),
                str(n),
                str(out),
            ],
            stderr=stderr,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{n} devices: exit {done.returncode}:\n{log.read_text()[-3000:]}")
    return Measured(**json.loads(out.read_text()))


def report(base: Measured, runs: list[Measured]) -> str:
    lines = [
        f"{RATE:g} request/s per device, windows of {WINDOW_S:g} s, measured over "
        f"{MEASURE_S:g} s after {SETTLE_S:g} s settling",
        "",
        "| devices | up after | RSS | peak | RSS per device | CPU | CPU per device per window "
        "| requests per window | CPU per request | windows stored | requests answered / offered "
        "| online |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 0 (baseline) | – | {base.rss_mb:.1f} MB | {base.hwm_mb:.1f} MB | – | "
        f"{base.cpu_s / base.measured_s * 100:.1f} % of a core | – | – | – | – | – | – |",
    ]
    for m in runs:
        per_rss = (m.rss_mb - base.rss_mb) / m.devices
        cpu = m.cpu_s - base.cpu_s * m.measured_s / base.measured_s
        per_window_ms = cpu / m.windows * 1000 if m.windows else float("nan")
        offered = m.devices * RATE * m.measured_s
        per_request_ms = cpu / m.answered * 1000 if m.answered else float("nan")
        requests_per_window = m.answered / m.windows if m.windows else float("nan")
        lines.append(
            f"| {m.devices} | {m.up_s:.0f} s | {m.rss_mb:.0f} MB | {m.hwm_mb:.0f} MB | "
            f"{per_rss:.2f} MB | {m.cpu_s / m.measured_s * 100:.0f} % of a core | "
            f"{per_window_ms:.1f} ms | {requests_per_window:.1f} | {per_request_ms:.2f} ms | "
            f"{m.windows} | {m.answered} / {offered:.0f} | {m.online} |"
        )
    return "\n".join(lines)


def main(sizes: tuple[int, ...] = DEFAULT_SIZES) -> None:
    with tempfile.TemporaryDirectory(prefix="sim-devices-") as tmp:
        workdir = Path(tmp)
        deployment, spec = _deployment_spec(workdir, max(sizes))
        try:
            base = _run_child(spec, 0)
            runs = [_run_child(spec, n) for n in sizes]
        finally:
            deployment.close()
    print(report(base, runs))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main(tuple(int(a) for a in sys.argv[1:]) or DEFAULT_SIZES)
