"""The ingest gate: every bad message is dropped with a reason, good ones pass."""

from __future__ import annotations

import json

import pytest

from fleet_server.mqtt.ingest import Accepted, Dropped, classify

NS = "fleet-test"
TOPIC = f"edgefleet/v1/{NS}/devices/pump-1"


def event(**changes: object) -> bytes:
    body: dict[str, object] = {
        "kind": "event",
        "device_id": "pump-1",
        "message_id": "abcdef0123",
        "sent_at": 1.0,
        "event": "committed",
        "at": 1.0,
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_a_good_event_is_accepted() -> None:
    verdict = classify(f"{TOPIC}/events", event(), 65536, namespace=NS)
    assert isinstance(verdict, Accepted) and verdict.device_id == "pump-1"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{TOPIC}/secrets", event(), "bad-topic"),
        (f"edgefleet/v1/{NS}/devices/+/events", event(), "bad-topic"),
        ("edgefleet/v1/devices/pump-1/events", event(), "bad-topic"),
        ("edgefleet/v1/other-fleet/devices/pump-1/events", event(), "bad-topic"),
        ("other/topic", event(), "bad-topic"),
        (f"{TOPIC}/events", b"x" * 70000, "oversized"),
        (f"{TOPIC}/events", b"{not json", "malformed-json"),
        (f"{TOPIC}/events", b"\xff\xfe", "malformed-json"),
        (f"{TOPIC}/events", b"[1, 2]", "invalid-payload"),
        (f"{TOPIC}/events", event(device_id="pump-2"), "spoofed-device-id"),
        (f"{TOPIC}/events", event(message_id="x"), "invalid-payload"),
        (f"{TOPIC}/events", event(v=2), "invalid-payload"),
        (f"{TOPIC}/events", event(extra="field"), "invalid-payload"),
        (f"{TOPIC}/events", event(at=-5), "invalid-payload"),
        (f"{TOPIC}/heartbeat", event(), "wrong-channel"),
    ],
)
def test_bad_messages_are_dropped_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    verdict = classify(topic, payload, 65536, namespace=NS)
    assert isinstance(verdict, Dropped) and verdict.reason == reason, verdict
