"""The pace of a simulated device's agent: the scenario's ``[agent]`` settings, how often a
device looks for a closed window, and the fetch slots checks and downloads each have."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from simulator.device_parts import FetchSlots
from simulator.runner import telemetry_tick
from simulator.scenario import Scenario, ScenarioError, load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "simulator" / "scenarios"


def test_without_agent_settings_a_device_keeps_the_short_demo_pace() -> None:
    agent = Scenario().agent
    assert agent.poll == timedelta(seconds=30)
    assert agent.heartbeat == timedelta(seconds=5)
    assert agent.trial == timedelta(seconds=10)


def test_the_full_power_cut_run_paces_its_agents_and_its_short_form_does_not() -> None:
    full = load_scenario(SCENARIOS / "power-cuts.toml")
    short = full.shortened()
    assert full.agent.poll == timedelta(minutes=5)
    # A trial spans at least a window: a device reports on the new model before it commits.
    assert full.agent.trial >= full.traffic.window
    assert short.agent.trial >= short.traffic.window
    assert short.agent.poll == timedelta(seconds=30)


def test_an_unknown_agent_setting_is_refused_by_its_place(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[agent]\npoll = "5m"\nwatchdog = "1m"\n')
    with pytest.raises(ScenarioError, match=r"agent\.watchdog"):
        load_scenario(path)


@pytest.mark.parametrize(
    ("window_s", "tick_s"), [(2.0, 0.25), (4.0, 0.25), (15.0, 0.5), (30.0, 1.0), (300.0, 1.0)]
)
def test_a_device_looks_for_a_closed_window_a_thirtieth_of_a_window_apart(
    window_s: float, tick_s: float
) -> None:
    assert telemetry_tick(window_s) == pytest.approx(tick_s)


def test_checks_and_downloads_each_have_their_own_slots() -> None:
    async def slots() -> tuple[asyncio.Semaphore, asyncio.Semaphore, asyncio.Semaphore]:
        fetches = FetchSlots(limit=2)
        check, download = fetches.semaphore("check"), fetches.semaphore("download")
        for _ in range(2):  # every check slot taken: a download still starts
            await check.acquire()
        assert check.locked() and not download.locked()
        return check, download, fetches.semaphore("check")

    check, download, again = asyncio.run(slots())
    assert check is not download
    assert again is check


def test_fetch_slots_are_a_positive_number() -> None:
    with pytest.raises(ValueError, match="0 is not a positive number"):
        FetchSlots(limit=0)
