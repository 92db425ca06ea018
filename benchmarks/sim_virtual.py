"""A staged rollout across 10,000 devices in virtual-clock mode: wall time against simulated time.

The scenario (seeded): ``DEVICES`` devices on v1 (one hardware id), each
answering a request a minute and sending a window every half hour; at one
hour in, v2 is released and rolled out in waves of 1 %, 10 %, 50 % and 100 %
(a 5 % holdback) with a bake of half an hour, the controller ticking every 10
minutes, with the default gates; four hours simulated. What
:func:`simulator.virtual.run_virtual` does throughout is real: the sample
models by a shared interpreter (on a pool of generated rows), the agent's
recorder and watchdog, the server's window codec, ingest into SQLite and
rollout controller and gates; only the clock is simulated. From 1,000
devices the ingest runs in a process of its own beside the devices (classify
and the writes), so "devices" is then the devices' own work and "ingest" the
wait for the writes at a flush.

Measured: the wall time of the whole run (building the fleet, the database,
everything) beside the simulated time it covers — the baseline is the
simulated time itself, so the ratio is how much faster than real time a
rehearsal runs — and where the wall time went: devices (answering the
requests, recording and encoding their windows, the server classifying them),
the ingest's writes, and the controller's ticks (reading the aggregates back,
the gates). The goal: a complete staged rollout of 10,000 devices in under
5 minutes. ``python -m benchmarks.sim_virtual [devices]``.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

from simulator.scenario import Scenario
from simulator.virtual import run_virtual

DEVICES = 10_000
GOAL_S = 300.0


def scenario(devices: int) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "virtual-rollout",
            "mode": "virtual",
            "seed": 1,
            "duration": "4h",
            "traffic": {"rate": 1 / 60, "window": "30m"},
            "cohorts": [{"name": "fleet", "devices": devices}],
            "server": {"tick": "10m"},
            "steps": [
                {"at": "1h", "action": "release", "model": "v2"},
                {
                    "at": "1h",
                    "action": "rollout",
                    "rollout": {"waves": [1, 10, 50, 100], "bake": "30m"},
                },
            ],
            "expect": {"rollout": "completed"},
        }
    )


def main(devices: int = DEVICES) -> None:
    with tempfile.TemporaryDirectory(prefix="sim-virtual-") as tmp:
        report = run_virtual(scenario(devices), Path(tmp))
    own = resource.getrusage(resource.RUSAGE_SELF)
    ingest = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ingest process, reaped
    f = report.figures
    done = next((d["at"] for d in report.decisions if d["action"] == "complete"), None)
    print(report.summary())
    print(f"devices                      {report.devices:>10,}")
    print(f"simulated time (baseline)    {report.duration_s:>10,.0f} s")
    speed = report.duration_s / report.wall_s
    print(f"wall time                    {report.wall_s:>10,.1f} s  "
          f"({speed:,.0f}x real time; goal < {GOAL_S:.0f} s)")  # fmt: skip
    print(f"CPU: the run's process       {own.ru_utime + own.ru_stime:>10,.1f} s")
    print(f"CPU: its ingest process      {ingest.ru_utime + ingest.ru_stime:>10,.1f} s")
    print(f"load average (1 min) at end  {os.getloadavg()[0]:>10,.1f}")
    print(f"  devices (and classify)     {f['wall_s_devices']:>10,.1f} s")
    print(f"  waiting for ingest writes  {f['wall_s_ingest']:>10,.1f} s")
    print(f"  controller ticks           {f['wall_s_ticks']:>10,.1f} s ({f['ticks']} ticks)")
    print(f"rollout                      {f['rollout_phase']} "
          f"(at {done / 3600 if done else float('nan'):.2f} h simulated)")  # fmt: skip
    print(f"requests                     {f['requests']:>10,}")
    print(f"windows produced / stored    {f['windows_produced']:>10,} / {f['windows_stored']:,}")
    print(f"installs                     {f['installs']}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES)
