"""The virtual-clock mode: a seeded fleet on a simulated clock through real rollouts.

Real parts throughout: the sample models run by a shared interpreter, the
agent's window recorder and watchdog, the server's ingest into SQLite and its
rollout controller and gates. Only the clock is simulated.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from simulator.report import Sample
from simulator.scenario import Scenario
from simulator.virtual import TraceError, replay, run_virtual, same_report

pytestmark = pytest.mark.integration


def scenario(model: str, devices: int = 250, **expect: Any) -> Scenario:
    """``devices`` on v1 (a request every 20 s, half-hour windows); at one hour in, ``model`` is
    released and rolled out in waves of 10 %, 50 % and 100 % with a 10 % holdback, rolled back
    on harm. With 250 devices each arm of each wave has the gates' 20 devices; a small fleet's
    rehearsal allows 20 % install failures, so that 125 installs can show the install gate's
    pass."""
    return Scenario.model_validate(
        {
            "name": f"virtual-{model}",
            "mode": "virtual",
            "seed": 3,
            "duration": "5h",
            "traffic": {"rate": 0.05, "window": "30m"},
            "cohorts": [{"name": "plant", "devices": devices}],
            "server": {"tick": "10m"},
            "steps": [
                {"at": "1h", "action": "release", "model": model},
                {
                    "at": "1h",
                    "action": "rollout",
                    "rollout": {
                        "waves": [10, 50, 100],
                        "bake": "30m",
                        "holdback": 10,
                        "on_failure": "rollback",
                        "gates": {"install_failures": {"allowed_rate": 0.2}},
                    },
                },
            ],
            "expect": expect,
        }
    )


def test_v2_goes_out_to_the_whole_fleet_in_stages(tmp_path: Path) -> None:
    # Completed at 3.5 h; the holdback's installs are committed by 4.2 h.
    chosen = scenario("v2", rollout="completed").model_copy(
        update={"duration": timedelta(hours=4.5)}
    )
    report = run_virtual(chosen, tmp_path / "run")
    assert report.passed, report.summary()
    assert report.figures["installs"] == {"committed": 250}
    assert report.series[-1].versions == "2.0.0=250"
    stages = [d["stage"] for d in report.decisions if d["action"].startswith("start")]
    assert stages == [1, 2, 3, 4]  # each wave, then the holdback
    assert report.figures["windows_stored"] == report.figures["windows_produced"] > 0


def test_v3_bad_is_stopped_in_wave_1_and_rolled_back(tmp_path: Path) -> None:
    chosen = scenario("v3-bad", rollout="rolled-back", rollout_stopped_in_wave=1)
    chosen = chosen.model_copy(update={"duration": timedelta(hours=3)})
    report = run_virtual(chosen, tmp_path / "run")
    assert report.passed, report.summary()
    assert report.figures["reached"] == 25  # wave 1 only: 10 % of 250
    # Idle rows give NaN: the watchdog rolls some devices back on its own, the others
    # answer those requests from v1, and the gates see the harm.
    assert report.figures["installs"]["rolled-back"] >= 1
    assert report.figures["fallback_answers"] > 0
    stop = next(d for d in report.decisions if d["phase"] == "rolling_back")
    assert stop["stage"] == 1 and "fail" in stop["gates"].values()
    assert report.series[-1].versions == "1.0.0=250"  # every device back on v1


def test_same_seed_same_report_and_replay_gives_it_too(tmp_path: Path) -> None:
    chosen = scenario("v3-bad", devices=60).model_copy(update={"duration": timedelta(hours=3)})
    first = run_virtual(chosen, tmp_path / "a", trace=tmp_path / "trace.jsonl")
    second = run_virtual(chosen, tmp_path / "b")
    assert same_report(first, second)
    again = replay(tmp_path / "trace.jsonl", tmp_path / "c")
    assert same_report(first, again)
    assert first.figures["windows_produced"] > 0 and first.figures["installs"]
    other = run_virtual(chosen.model_copy(update={"seed": 4}), tmp_path / "d")
    assert not same_report(first, other)


def test_a_bad_trace_is_refused_naming_the_line(tmp_path: Path) -> None:
    chosen = scenario("v2", devices=5).model_copy(update={"duration": timedelta(hours=1)})
    trace = tmp_path / "trace.jsonl"
    samples: list[Sample] = []
    report = run_virtual(chosen, tmp_path / "a", trace=trace, progress=samples.append)
    assert samples and samples[-1] == report.series[-1] and report.passed
    lines = trace.read_text().splitlines()
    lines.insert(3, '{"kind": "window", "t": 5.0, "device": "line-00001", "seed": 1}')
    trace.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"trace.jsonl:4: a window event needs requests"):
        replay(trace, tmp_path / "b")
    lines[3] = '{"kind": "window", "t": 5.0, "device": "plant-09999", "requests": 3, "seed": 1}'
    trace.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"trace.jsonl:4: no device 'plant-09999'"):
        replay(trace, tmp_path / "b")
    trace.write_text("not json\n")
    with pytest.raises(TraceError, match=r"trace.jsonl:1: not JSON"):
        replay(trace, tmp_path / "c")


def test_ingest_in_a_process_of_its_own_stores_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large fleet's ingest runs beside the devices, in its own process; a small one's in
    # the run's. Forced here for 40 devices: the same steps, the same report.
    chosen = scenario("v2", devices=40).model_copy(update={"duration": timedelta(hours=2)})
    here = run_virtual(chosen, tmp_path / "here")
    monkeypatch.setattr("simulator.virtual.run.INGEST_PROCESS", 1)
    beside = run_virtual(chosen, tmp_path / "beside")
    assert same_report(here, beside)
    assert beside.figures["windows_stored"] == beside.figures["windows_produced"] > 0
    assert beside.figures["installs"]


def faulty(devices: int = 40) -> Scenario:
    """v2 to every device at once at 0.5 h; half of the installs cut by a power failure while
    staging, half of the devices losing power at a random moment of the next half hour,
    and every link down from 1.5 h to 2 h."""
    return Scenario.model_validate(
        {
            "name": "virtual-faults",
            "mode": "virtual",
            "seed": 5,
            "duration": "2.5h",
            "traffic": {"rate": 0.05, "window": "30m"},
            "cohorts": [{"name": "plant", "devices": devices}],
            "server": {"tick": "10m"},
            "steps": [
                {"at": "30m", "action": "release", "model": "v2"},
                {
                    "at": "30m",
                    "action": "rollout",
                    "rollout": {"waves": [100], "holdback": 0, "bake": "30m"},
                },
            ],
            "faults": [
                {
                    "kind": "power-cut",
                    "at": "30m",
                    "duration": "30m",
                    "step": "staging",
                    "target": {"share": 0.5},
                },
                {"kind": "power-cut", "at": "1h", "duration": "30m", "target": {"share": 0.5}},
                {"kind": "link-down", "at": "90m", "duration": "30m"},
                {"kind": "disk-full", "at": "1h"},
            ],
        }
    )


def test_power_cuts_and_a_link_down_in_virtual_mode(tmp_path: Path) -> None:
    report = run_virtual(faulty(), tmp_path / "run", trace=tmp_path / "trace.jsonl")
    assert report.passed, report.summary()
    applied = [(f["kind"], f["targets"], f["applied"]) for f in report.faults]
    assert applied[:3] == [("power-cut", 20, "yes"), ("power-cut", 20, "yes"),
                           ("link-down", 40, "yes")]  # fmt: skip
    assert applied[3][2].startswith("no: disk-full")
    # Every install went through, the 20 cut mid-install after their journal took it up again.
    assert report.figures["installs"] == {"committed": 40}
    assert report.figures["power_cuts"] == 40
    assert report.figures["requests_lost_in_power_cuts"] > 0
    # Nothing reached the server while the links were down; the outboxes were delivered
    # when they came back, every window stored once.
    stored = {s.t: s.windows_stored for s in report.series}
    assert stored[5400.0] == stored[6000.0] == stored[6600.0] < stored[7200.0]
    assert report.figures["windows_held"] == 0
    assert report.figures["windows_stored"] == report.figures["windows_produced"]
    assert same_report(report, replay(tmp_path / "trace.jsonl", tmp_path / "again"))
