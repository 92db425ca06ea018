"""A device's stored state: the newest report wins, whatever the device's clock said.

States are ordered by the time the device sent them, so a late redelivery
never replaces a newer state. A device whose clock ran ahead (booted without
NTP, say) must not freeze its own record: its times are capped at arrival, and
a time ahead of the server's stored before the cap never outranks a report.
Real databases, SQLite and PostgreSQL, through the ingest's own batch writer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import update

from fleet_server.db import Database, migrate
from fleet_server.db.models import Device
from fleet_server.mqtt.ingest import Accepted, write_batch
from protocol.messages import ReportedState
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

DEVICE = "clock-1"
YEAR_2038 = 2_145_916_800.0


def state(counter: int, sent_at: float) -> Accepted:
    message = ReportedState(
        device_id=DEVICE,
        message_id=uuid.uuid4().hex,
        sent_at=sent_at,
        agent_version="1.0.0",
        hardware_id="rpi4-arm64",
        installed_counter=counter,
        phase="idle",
    )
    return Accepted(DEVICE, "state", message)


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        migrate(url)
        yield url


def stored_counter_after(url: str, *steps: Accepted | datetime) -> int:
    """Write each step in its own batch (a datetime: store it as the state's time directly)."""

    async def run() -> int:
        db = Database(url)
        try:
            async with db.session() as session:
                session.add(
                    Device(id=DEVICE, hardware_id="rpi4-arm64", enrolled_at=datetime.now(UTC))
                )
            for step in steps:
                if isinstance(step, datetime):
                    async with db.session() as session:
                        await session.execute(
                            update(Device).where(Device.id == DEVICE).values(reported_at=step)
                        )
                else:
                    await write_batch(db, [step], "test")
            async with db.session() as session:
                device = await session.get(Device, DEVICE)
                assert device is not None
                return device.installed_counter
        finally:
            await db.close()

    return asyncio.run(run())


def test_a_late_redelivery_does_not_replace_a_newer_state(url: str) -> None:
    now = time.time()
    assert stored_counter_after(url, state(2, now), state(1, now - 60)) == 2


def test_a_clock_that_ran_ahead_does_not_freeze_the_devices_state(url: str) -> None:
    # The first state was sent before NTP corrected the device's clock, the second a few
    # seconds after the first arrived.
    assert stored_counter_after(url, state(1, YEAR_2038), state(2, time.time() + 5)) == 2


def test_a_future_time_stored_before_the_cap_never_outranks_a_report(url: str) -> None:
    stored_in_2038 = datetime.fromtimestamp(YEAR_2038, UTC)
    assert (
        stored_counter_after(url, state(1, time.time()), stored_in_2038, state(3, time.time())) == 3
    )
