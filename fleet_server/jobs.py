"""The server's background work: each job, its interval, started and stopped in one place.

A :class:`Job` is one periodic piece of work: the presence sweep, the
director's re-signing, the audit anchor, the drift evaluation (and the jobs
that came next: the rollout controller, hybrid planning). :func:`run_jobs` runs each on its own
interval until the server stops: a failed run is logged and the next runs on
time, so one failing job never stops another. A job with ``at_stop`` runs once
more when the server stops (the audit anchor records the head at a clean stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    name: str  # for the log: "<name> failed"
    interval_s: float
    run: Callable[[], Awaitable[object]]
    at_stop: bool = False


async def run_jobs(jobs: Sequence[Job], stop: asyncio.Event) -> None:
    """Run every job on its interval until ``stop`` is set; return when all have ended."""
    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(_every(job, stop), name=job.name)


async def _every(job: Job, stop: asyncio.Event) -> None:
    while True:
        try:
            await job.run()
        except Exception:
            log.exception("%s failed", job.name)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), job.interval_s)
        if stop.is_set() and not job.at_stop:
            return
