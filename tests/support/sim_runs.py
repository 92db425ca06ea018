"""Running ``fleet-sim run`` as a user does, for the simulator's end-to-end tests."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from simulator.scenario import CHECKS

SCENARIOS = Path(__file__).resolve().parents[2] / "simulator" / "scenarios"
RUN_TIMEOUT_S = 600  # a hung run fails the test instead of the suite


def fleet_sim(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``fleet-sim run ARGS`` in its own process; its result and the JSON report it wrote."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "run",
            *args,
            "--workdir",
            str(tmp_path / "run"),
            "--report-json",
            str(report),
            "--report-csv",
            str(tmp_path / "series.csv"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    data = json.loads(report.read_text()) if report.exists() else None
    return done, data


def checks_of(report: Any) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def assert_passed(done: subprocess.CompletedProcess[str], report: Any) -> None:
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert report is not None, said
    assert done.returncode == 0, said
    assert report["passed"] is True
    assert set(checks_of(report)) == set(CHECKS)
    assert all(c["passed"] for c in report["checks"]), said


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
