"""A window's hybrid section over MQTT: a device publishes its encoded window on a real broker,
a ``fleet-server`` process ingests it, and its device's hourly hybrid stats count what it did
under its plan (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from fleet_server.db import Database
from fleet_server.db.models import DeviceHybridStats
from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary
from protocol.topics import windows_topic
from protocol.window import WindowSummary, decode_window, encode_window
from testbed.server_process import DeviceClient, ServerProcess, private_broker
from testbed.waiting import wait_until
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

HARDWARE = "rpi4-arm64"


async def _rows(db_url: str, device_id: str) -> list[DeviceHybridStats]:
    db = Database(db_url)
    try:
        async with db.session() as session:
            query = select(DeviceHybridStats).where(DeviceHybridStats.device_id == device_id)
            return list((await session.scalars(query)).all())
    finally:
        await db.close()


@pytest.fixture(scope="module", params=DATABASES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str, str]]:
    tmp: Path = tmp_path_factory.mktemp(f"hybrid-mqtt-{request.param}")
    with private_broker(tmp / "broker") as broker, database_url(request.param, tmp) as db_url:
        server = ServerProcess(
            tmp, db_url=db_url, broker=broker.url, replica_id=f"hyb-{secrets.token_hex(3)}"
        )
        try:
            server.start()
            yield server, broker.url, db_url
        finally:
            server.stop()


def test_a_windows_hybrid_section_sent_over_mqtt_is_counted_under_its_plan(
    served: tuple[ServerProcess, str, str],
) -> None:
    server, broker, db_url = served
    device = f"hyb-{secrets.token_hex(3)}"
    server.api(
        "POST", "/devices", server.admin_token(), {"device_id": device, "hardware_id": HARDWARE}
    )
    confidence = [0] * CONFIDENCE_BINS
    confidence[8], confidence[47] = 30, 90
    section = HybridSummary(
        plan_id="p-0a1b2c3d4e5f",
        mode="escalate",
        local=88,
        escalated=30,
        kept_local_quota=2,
        cloud_answered=27,
        audits=4,
        cloud_errors={"rate_limited": 2, "timeout": 1},
        escalated_compared=27,
        escalated_agreements=20,
        audit_compared=4,
        audit_agreements=4,
        audit_confidence_sum=3.8,
        local_latency_ms=record(ExponentialHistogram(), np.full(90, 3.0)),
        cloud_latency_ms=record(ExponentialHistogram(), np.full(27, 60.0)),
        confidence=confidence,
    )
    w = WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device,
        model_name="pump-health",
        model_version="2.0.0",
        baseline_id="b1",
        start=1_780_000_000.0,
        end=1_780_000_060.0,
        requests=120,
        served={"active": 120},
        features=[],
        hybrid=section,
    )
    payload = encode_window(w)
    assert decode_window(payload).hybrid == section  # what the agent's codec keeps
    client = DeviceClient(broker, device)
    try:
        client.publish(windows_topic(server.namespace, device), payload)
        client.flush()
    finally:
        client.close()
    rows = wait_until(
        f"{device}'s hybrid stats", lambda: asyncio.run(_rows(db_url, device)), timeout=60
    )
    assert [(r.plan_id, r.requests, r.seconds) for r in rows] == [("p-0a1b2c3d4e5f", 120, 60.0)]
    row = rows[0]
    assert (row.escalated, row.kept_local_quota, row.cloud_answered, row.audits) == (30, 2, 27, 4)
    assert row.cloud_errors == {"rate_limited": 2, "timeout": 1}
    assert (row.audit_compared, row.audit_agreements) == (4, 4)
    assert row.audit_confidence_sum == pytest.approx(3.8)
    assert row.confidence == confidence
    assert sum(c for _, c in row.cloud_latency) == 27
