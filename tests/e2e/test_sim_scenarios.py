"""The shipped scenarios' short forms, run as a user runs them: ``fleet-sim run FILE --short``.

Each run starts its own broker, fleet server (and cloud endpoint) and
simulated devices, and must exit 0 with every check of its report passed,
its figures and time series agreeing; the reconnect storm and the capacity
cut are also looked at in detail. (``fleet-sim run``'s options and a run that
fails a check: ``test_sim_run_options.py``.)
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.sim_runs import SCENARIOS, assert_passed, checks_of, fleet_sim

pytestmark = pytest.mark.integration


def run_short(tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``fleet-sim run NAME.toml --short``: every check passed, every request answered, every
    window stored, a sample a second in the report and the CSV alike."""
    done, report = fleet_sim(tmp_path, str(SCENARIOS / f"{name}.toml"), "--short")
    assert_passed(done, report)
    assert report["scenario"] == name and report["mode"] == "real"
    figures = report["figures"]
    assert figures["requests"] == figures["answered"] > 0
    assert figures["windows_stored"] == figures["windows_produced"] > 0
    with (tmp_path / "series.csv").open() as rows:
        series = list(csv.DictReader(rows))
    assert len(series) == len(report["series"]) >= 10
    assert int(series[-1]["windows_stored"]) == figures["windows_stored"]
    assert ": passed" in done.stdout
    return done, report


@pytest.mark.parametrize("name", ["drift-region", "good-rollout", "bad-model", "power-cuts"])
def test_a_short_scenario_passes_every_check(tmp_path: Path, name: str) -> None:
    run_short(tmp_path, name)


def test_the_reconnect_storm_takes_every_device_offline_and_back(tmp_path: Path) -> None:
    _, report = run_short(tmp_path, "reconnect-storm")
    devices = report["devices"]
    online = [s["online"] for s in report["series"]]
    restart = next(f for f in report["faults"] if f["kind"] == "broker-restart")
    assert restart["applied"] == "yes"
    during = [s for s in report["series"] if "broker-restart" in s["faults_active"]]
    assert during, "the restart was sampled"
    assert min(online) == 0 and online[-1] == devices


def test_a_cloud_capacity_cut_is_followed_by_the_plans(tmp_path: Path) -> None:
    _, report = run_short(tmp_path, "cloud-capacity")
    assert report["figures"]["cloud_answers"] > 0
    assert [d["capacity"] for d in report["decisions"] if d["step"] == "capacity"] == [20, 6]
    assert "capacity of 6" in checks_of(report)["expectations"]["detail"]
