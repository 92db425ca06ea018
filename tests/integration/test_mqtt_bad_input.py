"""Bad input on the server's MQTT topics, through a real broker to a real server process.

A few thousand payloads, generated from a fixed seed so every run sends the
same ones: random bytes; valid messages truncated, byte-flipped, with fields
dropped, added or of the wrong type; huge numbers, NaN and Infinity literals,
deep nesting, long strings, payloads over 64 KiB; valid messages with a device
id that is not the topic's (a device publishing under another's prefix), of
the wrong kind for their channel, from an unregistered device, and on topics
under the prefix that name no valid device. Afterwards the server still runs
and still ingests, and every message it received was counted exactly once:
ingested, or dropped under a reason.

The expected reason of most messages is the ingest gate's own verdict, run
here on the same bytes; the end-to-end point is that the real process counts
each of them once, under that reason. A few payloads are known hazards (deep
nesting, integers of thousands of digits, numbers no timestamp or database
column can hold): for those only "counted once, never ingested twice, no
crash" is pinned, not which reason names them.
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet_server.mqtt.ingest import Dropped, classify
from protocol.messages import DeviceEvent, Heartbeat, Presence, ReportedState
from protocol.topics import MAX_PAYLOAD_BYTES, device_topic
from testbed.server_process import (
    DROPPED,
    FAN_IN_LIMITS,
    INGESTED,
    DeviceClient,
    ServerProcess,
    private_broker,
    wait_until,
)
from testbed.waiting import observe_for
from tests.support.databases import postgres_database

pytestmark = pytest.mark.integration

SEED = 20240611
EPOCH = 1_700_000_000  # device clocks of the run: a fixed day, so the bytes are the same
HARDWARE = "rpi4-arm64"
NS = "bad-input"  # the server's namespace, on a broker of the test's own
ROOT = f"edgefleet/v1/{NS}/devices"
CHANNELS = ("state", "events", "heartbeat", "presence")
KIND_OF = {"state": "state", "events": "event", "heartbeat": "heartbeat", "presence": "presence"}
# What the server subscribes to, written out independently of protocol.topics.
RECEIVED = re.compile(rf"^{re.escape(ROOT)}/[^/]*/(state|events|heartbeat|presence)$")
GATE_REASONS = (
    "malformed-json",
    "invalid-payload",
    "spoofed-device-id",
    "oversized",
    "wrong-channel",
    "bad-topic",
)
INGESTED_KEY = "(ingested)"
# The fields of each kind that have no default (and are not the discriminator or device id).
REQUIRED = {
    "event": ["message_id", "sent_at", "event", "at"],
    "heartbeat": ["message_id", "sent_at", "uptime_s"],
    "presence": ["message_id", "sent_at", "online"],
    "state": [
        "message_id",
        "sent_at",
        "agent_version",
        "hardware_id",
        "installed_counter",
        "phase",
    ],
}


@dataclass(frozen=True)
class Sent:
    """One message to publish: who sends it, where, what, and what it is meant to be."""

    sender: str
    topic: str
    payload: bytes
    category: str
    intended: str | None = None  # the reason it is built to earn, if one is unambiguous
    hazard: bool = False  # counted once and not ingested; which reason is not pinned


@dataclass(frozen=True)
class Fleet:
    good: str  # registered
    other: str  # registered
    ghost: str  # never registered

    @property
    def registered(self) -> set[str]:
        return {self.good, self.other}


# -- valid messages -------------------------------------------------------------


def valid(rng: random.Random, device_id: str, kind: str) -> dict[str, Any]:
    """A valid message of ``kind`` from ``device_id`` (JSON-ready)."""
    now = float(EPOCH + rng.randrange(86_400))
    common = {"device_id": device_id, "message_id": rng.randbytes(8).hex(), "sent_at": now}
    bundle = {"name": "pump-health", "version": "1.0.0", "release_counter": 1_000_000}
    if kind == "event":
        message: Any = DeviceEvent(
            **common, event=rng.choice(["verified", "staged", "switched"]), at=now
        )
    elif kind == "heartbeat":
        message = Heartbeat(**common, uptime_s=rng.uniform(0, 1e5), served={"ok": 3})
    elif kind == "presence":
        message = Presence(**common, online=True)
    else:
        message = ReportedState(
            **common,
            agent_version="0.1.0",
            hardware_id=HARDWARE,
            active=bundle,
            installed_counter=1_000_000,
            phase="idle",
        )
    return dict(message.model_dump(mode="json"))


def dump(body: Any) -> bytes:
    return json.dumps(body).encode()


# -- the corpus -------------------------------------------------------------------


def corpus(rng: random.Random, fleet: Fleet) -> list[Sent]:
    """Every bad (and some good) message of the run, in a seeded random order."""
    good = fleet.good
    out: list[Sent] = []

    def add(n: int, make: Callable[[], Sent]) -> None:
        out.extend(make() for _ in range(n))

    def any_channel() -> str:
        return rng.choice(CHANNELS)

    def valid_on_own_channel(device_id: str) -> tuple[str, dict[str, Any]]:
        channel = any_channel()
        return channel, valid(rng, device_id, KIND_OF[channel])

    def good_message(category: str, make_payload: Callable[[str], bytes], **kw: Any) -> Sent:
        channel = any_channel()
        return Sent(good, device_topic(NS, good, channel), make_payload(channel), category, **kw)

    # Random bytes, and valid JSON cut short or with bytes overwritten.
    add(400, lambda: good_message("random-bytes", lambda _: rng.randbytes(rng.randint(0, 600))))

    def truncated(channel: str) -> bytes:
        whole = dump(valid(rng, good, KIND_OF[channel]))
        return whole[: rng.randrange(len(whole))]

    add(300, lambda: good_message("truncated", truncated, intended="malformed-json"))

    def flipped(channel: str) -> bytes:
        body = bytearray(dump(valid(rng, good, KIND_OF[channel])))
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body)

    add(1000, lambda: good_message("byte-flips", flipped))

    # Schema violations: each is a message the schema refuses, whatever else it carries.
    def field_mutation(channel: str) -> bytes:
        kind = KIND_OF[channel]
        body = valid(rng, good, kind)
        victim = rng.choice(REQUIRED[kind])
        mutation = rng.choice(["drop", "add", "type", "v", "message_id", "negative"])
        if mutation == "drop":
            del body[victim]
        elif mutation == "add":
            body[f"unexpected_{rng.randrange(1000)}"] = rng.choice([1, "x", None, [], {}])
        elif mutation == "type":
            # Lax validation turns true into 1, so a boolean is no wrong type for a number.
            text = isinstance(body[victim], str)
            body[victim] = rng.choice([[1, 2], {"x": 1}, None, 12345 if text else "text"])
        elif mutation == "v":
            body["v"] = rng.choice([0, 2, "1", 1.5])
        elif mutation == "message_id":
            body["message_id"] = rng.choice(["short", "has space in it", "x" * 65, "ünïcödé-id"])
        else:
            body["sent_at"] = -rng.uniform(1, 1e9)
        return dump(body)

    add(400, lambda: good_message("schema", field_mutation, intended="invalid-payload"))

    def not_an_object(_: str) -> bytes:
        return dump(rng.choice([[], [1, 2], "event", 42, 4.2, None, True]))

    add(40, lambda: good_message("not-an-object", not_an_object, intended="invalid-payload"))

    def nan_literal(channel: str) -> bytes:
        body = valid(rng, good, KIND_OF[channel])
        body["sent_at"] = rng.choice([math.nan, -math.inf])
        return dump(body)  # Python writes the NaN / -Infinity literals

    add(40, lambda: good_message("nan", nan_literal, intended="malformed-json"))

    def long_string(_: str) -> bytes:
        body = valid(rng, good, "event")
        body["event"] = "e" * rng.randint(65, 60_000)
        return dump(body)

    out.extend(
        Sent(
            good,
            device_topic(NS, good, "events"),
            long_string(""),
            "long-string",
            intended="invalid-payload",
        )
        for _ in range(20)
    )

    # Over the size limit: checked before any parsing.
    def oversized(channel: str) -> bytes:
        if rng.random() < 0.5:
            return rng.randbytes(rng.randint(MAX_PAYLOAD_BYTES + 1, 3 * MAX_PAYLOAD_BYTES))
        body = valid(rng, good, KIND_OF[channel])
        body["padding"] = "p" * rng.randint(MAX_PAYLOAD_BYTES, 2 * MAX_PAYLOAD_BYTES)
        return dump(body)

    add(30, lambda: good_message("oversized", oversized, intended="oversized"))

    # Someone else's device id: in the payload on this device's topic, and the other way round.
    def spoofed() -> Sent:
        channel = any_channel()
        claimed, topic_owner, sender = rng.choice(
            [
                (fleet.other, good, fleet.other),  # other publishes under good's prefix
                (good, fleet.other, good),  # good publishes under other's prefix as itself
                (fleet.ghost, good, fleet.ghost),
            ]
        )
        body = valid(rng, claimed, KIND_OF[channel])
        return Sent(
            sender,
            device_topic(NS, topic_owner, channel),
            dump(body),
            "spoofed",
            intended="spoofed-device-id",
        )

    add(200, spoofed)

    # A valid message of another kind than its channel carries.
    def wrong_channel() -> Sent:
        channel = any_channel()
        kind = rng.choice([k for k in KIND_OF.values() if k != KIND_OF[channel]])
        return Sent(
            good,
            device_topic(NS, good, channel),
            dump(valid(rng, good, kind)),
            "wrong-channel",
            intended="wrong-channel",
        )

    add(200, wrong_channel)

    # A device the registry does not know: valid messages, and some garbage too.
    def unknown() -> Sent:
        channel, body = valid_on_own_channel(fleet.ghost)
        return Sent(
            fleet.ghost,
            device_topic(NS, fleet.ghost, channel),
            dump(body),
            "unknown-device",
            intended="unknown-device",
        )

    add(200, unknown)
    add(
        100,
        lambda: Sent(
            fleet.ghost,
            device_topic(NS, fleet.ghost, any_channel()),
            flipped("events"),
            "unknown-device-garbage",
        ),
    )

    # Topics under the prefix the server receives but which name no valid device.
    bad_ids = ["-dash", ".dot", "a b", "pümp", "x" * 129, "", "semi;colon", "$dollar", "é"]

    def bad_topic() -> Sent:
        channel, body = valid_on_own_channel(good)
        return Sent(
            "intruder",
            f"{ROOT}/{rng.choice(bad_ids)}/{channel}",
            dump(body),
            "bad-topic",
            intended="bad-topic",
        )

    add(150, bad_topic)

    # Topics the server does not subscribe to: never received, so never counted.
    not_subscribed = [
        f"{ROOT}/{good}/secrets",
        f"{ROOT}/{good}/events/more",
        f"{ROOT}/{good}",
        f"{ROOT}/{good}/desired",
        "edgefleet/v1/other",
        f"edgefleet/v1/other-fleet/devices/{good}/events",
        "edgefleet/v2/devices/x/events",
    ]
    add(
        60,
        lambda: Sent("intruder", rng.choice(not_subscribed), rng.randbytes(40), "not-subscribed"),
    )

    # Good messages among the bad ones.
    def fine() -> Sent:
        channel, body = valid_on_own_channel(good)
        return Sent(
            good, device_topic(NS, good, channel), dump(body), "valid", intended=INGESTED_KEY
        )

    add(300, fine)

    # Known hazards for a JSON parser, a timestamp or a database column.
    def deep(_: str) -> bytes:
        # Far deeper than any message, yet under the size limit.
        if rng.random() < 0.5:
            depth = rng.randint(2_000, 30_000)
            return b"[" * depth + b"]" * depth
        depth = rng.randint(2_000, 10_000)
        return b'{"a":' * depth + b"1" + b"}" * depth

    add(20, lambda: good_message("deep-nesting", deep, hazard=True))

    def huge_integer(channel: str) -> bytes:
        digits = str(rng.randint(1, 9)) + "0" * rng.randint(4_400, 20_000)
        body = dump(valid(rng, good, KIND_OF[channel]))
        return body.replace(b'"sent_at": ', b'"sent_at": ' + digits.encode() + b', "_": ', 1)

    add(20, lambda: good_message("huge-integer", huge_integer, hazard=True))

    def unstorable() -> Sent:
        choice = rng.randrange(5)
        if choice == 0:  # a time no datetime holds (Python writes the Infinity literal)
            body = valid(rng, good, "event")
            body["at"] = rng.choice([math.inf, 1e308])
            return Sent(
                good, device_topic(NS, good, "events"), dump(body), "unstorable", hazard=True
            )
        if choice == 1:  # a year past 9999
            body = valid(rng, good, "event")
            body["at"] = rng.uniform(3e11, 1e15)
            return Sent(
                good, device_topic(NS, good, "events"), dump(body), "unstorable", hazard=True
            )
        if choice == 2:  # more than a BIGINT holds
            body = valid(rng, good, "state")
            body["installed_counter"] = 10 ** rng.randint(19, 40)
            return Sent(
                good, device_topic(NS, good, "state"), dump(body), "unstorable", hazard=True
            )
        if choice == 3:  # NUL, which a PostgreSQL text column cannot hold
            body = valid(rng, good, "event")
            body["event"] = "before\u0000after"
            return Sent(
                good, device_topic(NS, good, "events"), dump(body), "unstorable", hazard=True
            )
        body = valid(rng, good, "event")  # NaN inside free-form details: not JSON to PostgreSQL
        body["details"] = {"reading": math.nan}
        return Sent(good, device_topic(NS, good, "events"), dump(body), "unstorable", hazard=True)

    add(40, unstorable)

    rng.shuffle(out)
    return out


# -- what the server should count ----------------------------------------------------


def expected_count(message: Sent, fleet: Fleet) -> str | None:
    """Where ``message`` should be counted: a drop reason, ingested, or ``None`` if unpinned."""
    if message.hazard:
        return None
    try:
        verdict = classify(message.topic, message.payload, MAX_PAYLOAD_BYTES, namespace=NS)
    except Exception:
        return None  # the gate itself fails on it: a hazard found by the fuzzing
    if isinstance(verdict, Dropped):
        return verdict.reason
    return INGESTED_KEY if verdict.device_id in fleet.registered else "unknown-device"


@dataclass
class Setup:
    server: ServerProcess
    broker: str
    token: str
    fleet: Fleet


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    suffix = secrets.token_hex(3)
    fleet = Fleet(
        good=f"bad-in-{suffix}-good", other=f"bad-in-{suffix}-other", ghost=f"bad-in-{suffix}-ghost"
    )
    with private_broker(tmp_path / "broker", FAN_IN_LIMITS) as broker, postgres_database() as db:
        # --verbose: each drop is logged (at debug level) with its reason.
        server = ServerProcess(
            tmp_path,
            db_url=db,
            broker=broker.url,
            replica_id=f"bad-input-{suffix}",
            namespace=NS,
            extra_args=["--verbose"],
        )
        try:
            server.start()
            token = server.admin_token()
            for device_id in fleet.registered:
                server.api(
                    "POST", "/devices", token, {"device_id": device_id, "hardware_id": HARDWARE}
                )
            yield Setup(server, broker.url, token, fleet)
        finally:
            server.stop()


def test_thousands_of_bad_messages_are_each_counted_and_dropped_and_the_server_survives(
    setup: Setup,
) -> None:
    server, fleet = setup.server, setup.fleet
    messages = corpus(random.Random(SEED), fleet)

    expected: Counter[str] = Counter()
    unpinned = 0
    received = 0
    for m in messages:
        if not RECEIVED.match(m.topic):
            continue
        received += 1
        where = expected_count(m, fleet)
        if where is None:
            unpinned += 1
        else:
            expected[where] += 1
        # The corpus is what it claims to be.
        assert m.intended is None or where == m.intended, (m.category, where, m.payload[:200])
    assert received >= 2500 and received < len(messages)

    senders = {name: DeviceClient(setup.broker, name) for name in {m.sender for m in messages}}
    last = valid(random.Random(SEED + 1), fleet.good, "event")
    try:
        for m in messages:
            senders[m.sender].publish(m.topic, m.payload)
        # A valid event sent last must still be stored: ingest goes on after all of that.
        senders[fleet.good].publish(device_topic(NS, fleet.good, "events"), dump(last))
        received += 1
        expected[INGESTED_KEY] += 1
        for client in senders.values():
            client.flush()
    finally:
        for client in senders.values():
            client.close()

    def counted() -> dict[str, float]:
        if not server.alive:
            raise AssertionError(
                f"the server exited with status {server.returncode}:\n{server.log_tail()}"
            )
        dropped = server.counter(DROPPED, "reason")
        dropped[INGESTED_KEY] = sum(server.counter(INGESTED, "channel").values())
        return dropped

    def all_counted() -> bool:
        return sum(counted().values()) >= received

    try:
        wait_until(f"all {received} received messages to be counted", all_counted, timeout=20)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; counted so far {counted()}, expected {dict(expected)}"
        ) from None
    observe_for(0.5, lambda: sum(counted().values()) > received, every=0.1)  # counted twice
    actual = counted()

    # The server runs, answers and ingests.
    assert server.alive
    assert server.request("GET", "/healthz").status == 200

    def last_stored() -> bool:
        path = f"/devices/{fleet.good}/events?limit=1000"
        events = server.api("GET", path, setup.token)["events"]
        return last["message_id"] in {e["message_id"] for e in events}

    wait_until("the event sent last to be stored", last_stored, timeout=10)

    # Every received message was counted exactly once...
    assert sum(actual.values()) == received, (actual, received)
    # ...under the reason the gate gives it (the hazards are free to take any drop reason).
    for reason, n in expected.items():
        assert actual.get(reason, 0) >= n, (reason, actual, dict(expected))
    assert actual[INGESTED_KEY] <= expected[INGESTED_KEY] + unpinned
    for reason in (*GATE_REASONS, "unknown-device"):
        assert actual.get(reason, 0) > 0, f"no message was dropped as {reason}"
    # And each reason was logged (the first few of each in full, then one in a thousand).
    log = server.log()
    for reason in (*GATE_REASONS, "unknown-device"):
        assert f"dropped a device message ({reason}," in log, reason
