"""The device side end to end, with real agent processes, real files and the real runtime.

Power is cut (SIGKILL) at every step of an install, and the agent is stopped
mid-download; the install always ends with a working model. (Rollbacks and
refusals: ``test_agent_install_rollback.py``.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from testbed.fleet import AgentProcess, Fleet
from tests.support.install_fleet import (
    DEVICE,
    assert_slots_intact,
    built,
    field_rows,
    fleet,
    install_v1,
    installed,
    keys,
)

pytestmark = pytest.mark.integration

__all__ = ["built", "fleet", "keys"]  # fixtures, used by name

STEPS = ["download", "verified", "staging", "staged", "trial"]


@pytest.mark.parametrize("step", STEPS)
def test_power_cut_at_every_install_step_leaves_a_working_model(
    step: str, fleet: Fleet, built: dict[str, Path]
) -> None:
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    released = install_v1(fleet, built, agent)
    agent.stop()

    # The same device, now set to hold (as if the power were about to go) at `step`.
    agent = AgentProcess(
        fleet.agent_config(DEVICE, update={"health_period_s": 0.5}, faults={"hold_at": [step]})
    )
    agent.wait_ready()
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for(f"the agent to reach {step}", lambda: agent.holding(step))
    agent.kill()
    assert_slots_intact(agent.data_dir)

    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    url = agent.wait_ready()
    answer = agent.infer(url, field_rows(1))
    assert answer.status == 200, answer.data
    body = json.loads(answer.data)
    assert body["parameters"]["stage"] in ("active", "previous")
    assert body["model_version"] in ("1.0.0", "2.0.0")
    agent.wait_for("v2 committed after the restart", lambda: installed(agent) == "2.0.0")
    assert_slots_intact(agent.data_dir)
    assert json.loads(agent.infer(url, field_rows(1)).data)["model_version"] == "2.0.0"
    events = [e["event"] for e in agent.events()]
    assert events.count("committed") == 2
    assert "rolled-back" not in events and "refused" not in events
    agent.stop()


def test_a_stop_mid_download_does_not_wait_for_the_fetcher_and_the_install_resumes(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    released = install_v1(fleet, built, agent)
    agent.stop()
    agent = AgentProcess(
        fleet.agent_config(
            DEVICE, update={"health_period_s": 0.5}, faults={"hold_at": ["download"]}
        )
    )
    agent.wait_ready()
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for("the fetcher to hold mid-download", lambda: agent.holding("download"))
    fetchers = _fetchers_of(agent.proc.pid)
    assert fetchers, "no fetcher child while holding at download"

    # SIGTERM to the agent alone (as `kill PID` sends it), not to its process group.
    os.kill(agent.proc.pid, signal.SIGTERM)
    assert agent.proc.wait(timeout=15) == 0
    assert "update check interrupted by the stop" in agent.tail()
    for pid in fetchers:  # the fetcher went with the agent, not left behind
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"fetcher {pid} outlived"
    agent.stop()

    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    agent.wait_for("v2 committed after the restart", lambda: installed(agent) == "2.0.0")
    assert_slots_intact(agent.data_dir)
    agent.stop()


def _fetchers_of(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"agent.ota.fetch_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
