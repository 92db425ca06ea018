"""Free-form JSON is bounded at the ingest gate, and whatever is stored can still be shown."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

from fleet_server.mqtt.ingest import Accepted, Dropped, classify
from fleet_server.stored_json import Shown, load_json, show_object
from protocol.messages import (
    FREEFORM_BOUNDS,
    FREEFORM_MAX_BYTES,
    FREEFORM_MAX_DEPTH,
    FREEFORM_MAX_ITEMS,
    FREEFORM_MAX_STRING,
    freeform_problem,
)
from protocol.topics import MAX_PAYLOAD_BYTES, device_topic

DEVICE = "pump-1"
NS = "bounds-test"


def nested(depth: int) -> dict[str, Any]:
    """An object nesting ``depth`` objects (itself included)."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def event(details: Any) -> bytes:
    return json.dumps(
        {
            "kind": "event",
            "device_id": DEVICE,
            "message_id": "abcdef0123",
            "sent_at": 1.0,
            "event": "committed",
            "at": 1.0,
            "details": details,
        }
    ).encode()


def heartbeat(served: dict[str, int]) -> bytes:
    return json.dumps(
        {
            "kind": "heartbeat",
            "device_id": DEVICE,
            "message_id": "abcdef0123",
            "sent_at": 1.0,
            "uptime_s": 5.0,
            "served": served,
        }
    ).encode()


def gate(channel: Literal["events", "heartbeat"], payload: bytes) -> Accepted | Dropped:
    return classify(device_topic(NS, DEVICE, channel), payload, MAX_PAYLOAD_BYTES, namespace=NS)


def test_an_event_nesting_300_levels_is_dropped_as_too_deep() -> None:
    payload = event(nested(300))
    assert len(payload) < 4096  # small: no size limit catches it
    verdict = gate("events", payload)
    assert isinstance(verdict, Dropped), verdict
    assert verdict.reason == "field-too-deep"
    assert "details" in verdict.detail and f"deeper than {FREEFORM_MAX_DEPTH}" in verdict.detail


def test_details_at_the_depth_bound_pass_and_one_more_level_does_not() -> None:
    assert isinstance(gate("events", event(nested(FREEFORM_MAX_DEPTH))), Accepted)
    verdict = gate("events", event(nested(FREEFORM_MAX_DEPTH + 1)))
    assert isinstance(verdict, Dropped) and verdict.reason == "field-too-deep"
    # Arrays count as levels too.
    deep_list: Any = [1]
    for _ in range(FREEFORM_MAX_DEPTH):
        deep_list = [deep_list]
    verdict = gate("events", event({"x": deep_list}))
    assert isinstance(verdict, Dropped) and verdict.reason == "field-too-deep"


@pytest.mark.parametrize(
    ("details", "says"),
    [
        ({"s": "x" * (FREEFORM_MAX_STRING + 1)}, "string longer"),
        ({"k" * (FREEFORM_MAX_STRING + 1): 1}, "key longer"),
        ({"list": list(range(FREEFORM_MAX_ITEMS + 1))}, "keys and items"),
        ({"n": 2**70}, "beyond 64 bits"),
    ],
)
def test_oversized_details_are_dropped_naming_the_bound(details: Any, says: str) -> None:
    verdict = gate("events", event(details))
    assert isinstance(verdict, Dropped) and verdict.reason == "field-too-large", verdict
    assert says in verdict.detail


def test_the_byte_bound_holds_where_a_server_allows_larger_messages() -> None:
    details = {f"k{i}": "é" * 1900 for i in range(20)}  # 76 KB in UTF-8
    payload = event(details).replace(b"\\u00e9", "é".encode())
    verdict = classify(device_topic(NS, DEVICE, "events"), payload, 1 << 20, namespace=NS)
    assert isinstance(verdict, Dropped) and verdict.reason == "field-too-large", verdict
    assert f"more than {FREEFORM_MAX_BYTES}" in verdict.detail
    assert isinstance(gate("events", payload), Dropped)  # over the default message limit too


def test_what_the_agent_sends_passes() -> None:
    details = {f"k{i}": "y" * 900 for i in range(32)} | {"n": 3, "ok": True, "none": None}
    details = dict(list(details.items())[:32])
    assert isinstance(gate("events", event(details)), Accepted)
    assert isinstance(gate("events", event({"a": {"b": [1, 2.5, "c"]}})), Accepted)


def test_a_heartbeat_stage_name_is_bounded() -> None:
    assert isinstance(gate("heartbeat", heartbeat({"primary": 3})), Accepted)
    verdict = gate("heartbeat", heartbeat({"s" * 5000: 3}))
    assert isinstance(verdict, Dropped) and verdict.reason == "invalid-payload"
    assert "served" in verdict.detail


def test_freeform_problem_takes_any_python_value_without_recursing() -> None:
    deep: Any = 1
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    problem = freeform_problem({"d": deep})
    assert problem is not None and problem.kind == "too-deep"
    assert freeform_problem({"x": float("nan")}) is not None
    assert freeform_problem({1: "x"}) is not None
    assert freeform_problem({"ok": [1, {"two": None}]}) is None


# -- what readers do with what is already stored ----------------------------------------


def test_stored_text_that_cannot_be_shown_becomes_a_note() -> None:
    too_deep = json.dumps(nested(300))
    shown = show_object(too_deep, FREEFORM_BOUNDS, "details")
    assert shown.value == {}
    assert shown.omitted is not None and "details not shown" in shown.omitted
    assert f"deeper than {FREEFORM_MAX_DEPTH}" in shown.omitted

    beyond_parser = '{"a":' * 50_000 + "1" + "}" * 50_000
    shown = show_object(beyond_parser, FREEFORM_BOUNDS, "details")
    assert shown.value == {} and shown.omitted is not None and "parser" in shown.omitted
    assert load_json(beyond_parser).problem is not None

    for raw, says in [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON array"),
        ('{"x": NaN}', "NaN"),
        ('"text"', "JSON string"),
    ]:
        shown = show_object(raw, FREEFORM_BOUNDS, "details")
        assert shown.value == {} and shown.omitted is not None and says in shown.omitted, raw


def test_stored_text_within_bounds_is_shown_as_is() -> None:
    assert show_object('{"a": [1, "b"]}', FREEFORM_BOUNDS, "details").value == {"a": [1, "b"]}
    for nothing in (None, "null"):
        assert show_object(nothing, FREEFORM_BOUNDS, "details") == Shown({})
