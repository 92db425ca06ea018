"""Two shipped scenarios' short forms looked at in detail: the broker restart of the reconnect
storm takes every device offline and back, and the plans follow the capacity cut.
(Every shipped scenario passing its checks: ``test_sim_scenarios.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.runner import OUTCOMES_WAIT_S
from tests.support.sim_runs import checks_of, run_short

pytestmark = pytest.mark.integration


def test_the_reconnect_storm_takes_every_device_offline_and_back(tmp_path: Path) -> None:
    _, report = run_short(tmp_path, "reconnect-storm")
    devices = report["devices"]
    online = [s["online"] for s in report["series"]]
    restart = next(f for f in report["faults"] if f["kind"] == "broker-restart")
    assert restart["applied"] == "yes"
    during = [s for s in report["series"] if "broker-restart" in s["faults_active"]]
    assert during, "the restart was sampled"
    assert min(online) == 0 and online[-1] == devices
    # Only the share online is expected, which is the end's: nothing was waited for.
    assert "outcomes_waited_s" not in report["figures"]


def test_a_cloud_capacity_cut_is_followed_by_the_plans(tmp_path: Path) -> None:
    _, report = run_short(tmp_path, "cloud-capacity")
    assert report["figures"]["cloud_answers"] > 0
    assert [d["capacity"] for d in report["decisions"] if d["step"] == "capacity"] == [20, 6]
    assert "capacity of 6" in checks_of(report)["expectations"]["detail"]
    # The run gave the plans time to follow the cut, and said how long it waited.
    assert 0 <= report["figures"]["outcomes_waited_s"] < OUTCOMES_WAIT_S
