"""The server's jobs: each on its interval, a failure logged and not fatal, at_stop honoured."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fleet_server.jobs import Job, run_jobs


async def _until(condition: asyncio.Event) -> None:
    await asyncio.wait_for(condition.wait(), 30)


def test_each_job_runs_again_after_a_failure_and_only_at_stop_jobs_run_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = {"flaky": 0, "anchor": 0}
    third_flaky, first_anchor = asyncio.Event(), asyncio.Event()

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] >= 3:
            third_flaky.set()
        raise RuntimeError("database away")

    async def anchor() -> None:
        runs["anchor"] += 1
        first_anchor.set()

    async def main() -> None:
        stop = asyncio.Event()
        jobs = [Job("flaky sweep", 0.001, flaky), Job("anchor", 3600, anchor, at_stop=True)]
        running = asyncio.create_task(run_jobs(jobs, stop))
        await _until(third_flaky)  # it failed twice and was run again each time
        await _until(first_anchor)
        flaky_before_stop = runs["flaky"]
        stop.set()
        await asyncio.wait_for(running, 30)
        # The at_stop job ran once more although its hour had not passed; the other did not.
        assert runs["anchor"] == 2
        assert runs["flaky"] <= flaky_before_stop + 1

    with caplog.at_level(logging.ERROR, logger="fleet_server.jobs"):
        asyncio.run(main())
    failures = [r for r in caplog.records if r.getMessage() == "flaky sweep failed"]
    assert len(failures) >= 2 and all(r.exc_info for r in failures)


def test_a_job_started_after_stop_runs_once_and_returns() -> None:
    runs: list[str] = []

    async def once() -> None:
        runs.append("ran")

    async def main() -> None:
        stop = asyncio.Event()
        stop.set()
        await asyncio.wait_for(run_jobs([Job("once", 3600, once)], stop), 30)

    asyncio.run(main())
    assert runs == ["ran"]
