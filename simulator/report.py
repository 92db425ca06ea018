"""What a simulation run reports: its checks, its time series, its figures.

A real-time run and a virtual-clock run report alike: :class:`RunReport`,
written as JSON (:meth:`RunReport.write_json`, everything) and CSV
(:meth:`RunReport.write_csv`, the time series, one row a sample). A run
passes when every check it made passed; ``fleet-sim run`` exits 1 otherwise
and prints each failed check with its detail.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    """One check of the run: its name (:data:`simulator.scenario.CHECKS`), verdict and why.

    ``detail`` says what was counted, passed or not (``"120,431 requests, all
    answered"``; ``"3 windows stored twice: eu-00012/…"``), so a report reader
    never has to guess what a green check covered.
    """

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Sample:
    """The fleet at one moment of the run (seconds since its traffic started)."""

    t: float
    online: int = 0
    serving: int = 0  # devices with a verified model to serve
    installing: int = 0
    requests: int = 0  # answered so far
    windows_produced: int = 0
    windows_stored: int = 0
    cloud_answers: int = 0
    faults_active: str = ""  # the kinds active, ";"-separated
    versions: str = ""  # "1.0.0=700;2.0.0=300"


@dataclass
class RunReport:
    scenario: str
    mode: str  # "real" or "virtual"
    seed: int
    devices: int
    started_at: str  # ISO 8601, wall clock
    duration_s: float  # of the scenario (simulated in a virtual run)
    wall_s: float = 0.0  # what the run took on the wall clock
    checks: list[Check] = field(default_factory=list)
    series: list[Sample] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # counts and rates, by name
    faults: list[dict[str, Any]] = field(default_factory=list)  # each applied, with when
    decisions: list[dict[str, Any]] = field(default_factory=list)  # the server's, as it said

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    def write_csv(self, path: Path) -> None:
        names = list(Sample.__dataclass_fields__)
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=names)
            writer.writeheader()
            for sample in self.series:
                writer.writerow(asdict(sample))

    def summary(self) -> str:
        """The lines ``fleet-sim run`` prints at the end."""
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"scenario {self.scenario} ({self.mode}, seed {self.seed}, {self.devices:,} devices, "
            f"{self.duration_s:.0f} s in {self.wall_s:.0f} s): {verdict}"
        ]
        for check in self.checks:
            lines.append(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
        return "\n".join(lines)
