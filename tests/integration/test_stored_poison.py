"""A hostile free-form value: dropped at the gate, and harmless if it is already stored.

An event whose ``details`` nest 300 levels (about 1.2 KB) once passed the gate
and from then on made a device's event list answer 500. Here it is published
over a real broker to a real server process (dropped, counted under a reason
naming the problem), and written straight into the database, as an older
version would have stored it, on SQLite and PostgreSQL: the events list, the
device, the audit list and ``fleetctl`` still answer, showing a marked note in
place of what cannot be shown.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleet_server import audit
from fleet_server.fleetctl import main
from protocol.messages import FREEFORM_MAX_DEPTH
from protocol.topics import device_topic
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from testbed.server_process import (
    DROPPED,
    INGESTED,
    DeviceClient,
    ServerProcess,
    private_broker,
    wait_until,
)
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

EPOCH = 1_700_000_000.0


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def deep_text(depth: int) -> str:
    """``nested(depth)`` as JSON text, built without recursion (json.dumps would recurse)."""
    return '{"a":' * (depth - 1) + '{"leaf":1}' + "}" * (depth - 1)


def event(device_id: str, details: Any) -> dict[str, Any]:
    return {
        "kind": "event",
        "device_id": device_id,
        "message_id": uuid.uuid4().hex,
        "sent_at": EPOCH,
        "event": "committed",
        "at": EPOCH,
        "details": details,
    }


# -- at the gate, over a real broker ---------------------------------------------------


@pytest.mark.parametrize("kind", DATABASES)
def test_a_300_level_event_over_the_broker_is_dropped_and_counted(
    kind: str, tmp_path: Path
) -> None:
    device = f"poison-{secrets.token_hex(3)}"
    with private_broker(tmp_path / "broker") as broker, database_url(kind, tmp_path) as db_url:
        server = ServerProcess(
            tmp_path,
            db_url=db_url,
            broker=broker.url,
            replica_id=f"poison-{secrets.token_hex(3)}",
        )
        try:
            server.start()
            token = server.admin_token()
            server.api("POST", "/devices", token, {"device_id": device, "hardware_id": HARDWARE})
            hostile = json.dumps(event(device, nested(300))).encode()
            assert len(hostile) < 4096
            good = event(device, {"step": "after the hostile one"})
            client = DeviceClient(broker.url, device)
            try:
                client.publish(device_topic(server.namespace, device, "events"), hostile)
                client.publish(
                    device_topic(server.namespace, device, "events"), json.dumps(good).encode()
                )
                client.flush()
            finally:
                client.close()

            def stored() -> list[dict[str, Any]]:
                events: list[dict[str, Any]] = server.api(
                    "GET", f"/devices/{device}/events", token
                )["events"]
                return events

            wait_until("the good event to be stored", lambda: len(stored()) >= 1)
            events = stored()
            assert [e["message_id"] for e in events] == [good["message_id"]]
            assert server.counter(DROPPED, "reason").get("field-too-deep") == 1
            assert server.counter(INGESTED, "channel").get("events") == 1
        finally:
            server.stop()


# -- already stored: every read path still answers -----------------------------------------


class Stored:
    """A server thread whose database holds poisoned rows for one device."""

    def __init__(self, api: ServerThread, kind: str, device: str) -> None:
        self.api = api
        self.kind = kind
        self.device = device
        self.token_file = api.admin_token_file

    def get(self, path: str) -> tuple[int, Any]:
        r = self.api.request("GET", f"/api/v1{path}", token=self.api.admin_token)
        return r.status, json.loads(r.data) if r.data else None


# What older versions (or a hand) stored; the label says what the note must mention.
def poisons(kind: str) -> list[tuple[str, str, str]]:
    rows = [
        ("deep-300", json.dumps(nested(300)), f"deeper than {FREEFORM_MAX_DEPTH}"),
        ("deep-3000", deep_text(3000), "deeper than"),
        ("huge-string", json.dumps({"s": "x" * 200_000}), "string longer"),
        ("an-array", "[1, 2, 3]", "JSON array"),
    ]
    if kind == "sqlite":  # PostgreSQL's json type refuses these on the way in
        rows += [("not-json", "{this is not json", "not JSON"), ("nan", '{"x": NaN}', "NaN")]
    return rows


async def _insert(api: ServerThread, kind: str, device: str) -> None:
    cast = "CAST(:details AS json)" if kind == "postgresql" else ":details"
    async with api.server.db.session() as session:
        for i, (label, raw, _) in enumerate(poisons(kind)):
            await session.execute(
                text(
                    "INSERT INTO device_events (message_id, device_id, kind, event, at, "
                    f"received_at, details) VALUES (:m, :d, 'event', :e, :at, :at, {cast})"
                ),
                {
                    "m": f"poison{i:04d}{secrets.token_hex(4)}",
                    "d": device,
                    "e": label,
                    "at": datetime.fromtimestamp(EPOCH + i, UTC),
                    "details": raw,
                },
            )
        await session.execute(
            text(
                "INSERT INTO device_events (message_id, device_id, kind, event, at, "
                f"received_at, details) VALUES (:m, :d, 'event', 'fine', :at, :at, {cast})"
            ),
            {
                "m": f"fine{secrets.token_hex(6)}",
                "d": device,
                "at": datetime.fromtimestamp(EPOCH + 100, UTC),
                "details": json.dumps({"step": "fine"}),
            },
        )
        await session.execute(
            text(f"UPDATE devices SET reported = {cast} WHERE id = :d"),
            {"d": device, "details": json.dumps(nested(300))},
        )
        # Deeper than Python's JSON parser goes: the ORM itself reads this column.
        await session.execute(
            text(f"UPDATE devices SET reported = {cast} WHERE id = :d"),
            {"d": f"{device}-deeper", "details": deep_text(3000)},
        )


@pytest.fixture(scope="module", params=DATABASES)
def stored(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stored]:
    tmp = tmp_path_factory.mktemp(f"poison-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            device = "poisoned-1"
            for device_id in (device, f"{device}-deeper"):
                r = api.request(
                    "POST",
                    "/api/v1/devices",
                    token=api.admin_token,
                    json={"device_id": device_id, "hardware_id": HARDWARE},
                )
                assert r.status == 201, r.data
            api.call(_insert(api, request.param, device))
            yield Stored(api, request.param, device)
        finally:
            api.close()


def test_the_events_list_answers_with_a_note_in_place_of_each_poisoned_value(
    stored: Stored,
) -> None:
    status, body = stored.get(f"/devices/{stored.device}/events")
    assert status == 200, body
    by_event = {e["event"]: e for e in body["events"]}
    assert by_event["fine"]["details"] == {"step": "fine"}
    assert by_event["fine"]["details_omitted"] is None
    for label, _, says in poisons(stored.kind):
        shown = by_event[label]
        assert shown["details"] == {}, label
        assert shown["details_omitted"].startswith("details not shown"), shown
        assert says in shown["details_omitted"], (label, shown["details_omitted"])


def test_the_device_answers_with_a_note_in_place_of_a_poisoned_report(stored: Stored) -> None:
    status, device = stored.get(f"/devices/{stored.device}")
    assert status == 200, device
    assert device["reported"] is None
    assert "deeper than" in device["reported_omitted"]
    status, deeper = stored.get(f"/devices/{stored.device}-deeper")
    assert status == 200, deeper
    assert deeper["reported"] is None
    assert "deeper than the JSON parser goes" in deeper["reported_omitted"]
    status, listed = stored.get("/devices")
    assert status == 200, listed
    assert {stored.device, f"{stored.device}-deeper"} <= {d["id"] for d in listed["devices"]}


def test_fleetctl_devices_events_shows_the_notes(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = ["--server", stored.api.url, "--token-file", str(stored.token_file)]
    capsys.readouterr()
    assert main(["devices", "events", stored.device, *remote]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("[details not shown: what is stored") == len(poisons(stored.kind))
    assert '{"step": "fine"}' in out
    assert main(["devices", "events", stored.device, "--json", *remote]) == 0
    events = json.loads(capsys.readouterr().out)
    assert sum(1 for e in events if e["details_omitted"]) == len(poisons(stored.kind))


def test_a_poisoned_audit_entry_is_listed_with_a_note_and_reported_as_changed(
    stored: Stored, capsys: pytest.CaptureFixture[str]
) -> None:
    async def poison_newest() -> int:
        cast = "CAST(:d AS json)" if stored.kind == "postgresql" else ":d"
        async with stored.api.server.db.session() as session:
            seq = (await session.execute(text("SELECT max(seq) FROM audit_log"))).scalar_one()
            await session.execute(
                text(f"UPDATE audit_log SET details = {cast} WHERE seq = :s"),
                {"s": seq, "d": deep_text(3000)},
            )
            return int(seq)

    seq = stored.api.call(poison_newest())
    status, page = stored.get("/audit?limit=1000")
    assert status == 200, page
    entry = next(e for e in page["entries"] if e["seq"] == seq)
    assert entry["details"] == {} and "deeper than" in entry["details_omitted"]
    status, report = stored.get("/audit/verify")
    assert status == 200, report
    assert (report["ok"], report["broken_at"]) == (False, seq)
    assert "changed" in report["problem"]
    remote = ["--server", stored.api.url, "--token-file", str(stored.token_file)]
    capsys.readouterr()
    assert main(["audit", "list", "--limit", "1000", *remote]) == 0
    assert main(["audit", "verify", *remote]) == 1
    out, err = capsys.readouterr()
    assert f"BROKEN at entry {seq}" in out and "Traceback" not in err


def test_audit_details_beyond_the_bounds_are_recorded_as_a_note(stored: Stored) -> None:
    async def record_deep() -> int:
        async with stored.api.server.db.session() as session:
            entry = await audit.record(session, "test", "test.deep", "deep", nested(300))
            return entry.seq

    seq = stored.api.call(record_deep())
    status, page = stored.get(f"/audit?after={seq - 1}&limit=1")
    assert status == 200, page
    details = page["entries"][0]["details"]
    assert details == {
        "details_omitted": "not recorded: what was given nests deeper than 32 levels of "
        "objects and arrays"
    }
    assert page["entries"][0]["details_omitted"] is None
