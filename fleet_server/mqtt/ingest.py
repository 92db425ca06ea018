"""Ingest of device messages: validate each, drop what is bad (counted), write in batches.

:func:`classify` is the pure gate every message passes: right topic, size,
JSON, schema, channel and — the anti-spoofing rule — the device id in the
payload equals the one in the topic. Windows are binary (:mod:`protocol.window`),
not JSON: the gate decodes them, with their own size limit, and keeps the
received bytes for storage. :func:`write_batch` stores a batch in one
transaction; events are keyed by ``message_id`` and windows by ``window_id``, so
a message delivered twice (QoS 1, a replica restart, a device resending a
window it has no ack for) is stored once, and a reported state older than the
one stored (delivered again after a replica restart, or by a slower replica)
does not replace it. It returns, per device, the windows
of the batch that are stored (newly or before): the acks to send once the
transaction has committed. Each window stored for the first time is folded, in
the same transaction, into its device's hourly rollout aggregates and hybrid
stats (:mod:`fleet_server.hybrid.aggregates`: request rate, confidence, what it
did under its hybrid plan).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from pydantic import ValidationError
from sqlalchemy import select, update

from fleet_server.db import Database
from fleet_server.db.bulk import InsertReturningKeys
from fleet_server.db.dialects import insert_for
from fleet_server.db.models import Device, DeviceEventRow, WindowRow
from fleet_server.devices.store import reported_state_columns, write_reported_state
from fleet_server.hybrid.aggregates import fold_hybrid
from fleet_server.hybrid.store import add_to_hybrid_stats
from fleet_server.metrics import Metrics
from fleet_server.mqtt import store
from fleet_server.rollouts.aggregates import fold, fold_shadow
from fleet_server.rollouts.store import add_to_hour_stats
from protocol.messages import DEVICE_MESSAGE, DeviceEvent, Heartbeat, Presence, ReportedState
from protocol.topics import MAX_WINDOW_BYTES, parse_device_topic
from protocol.window import WindowCodecError, WindowSummary, decode_window_head

DeviceMessage = ReportedState | DeviceEvent | Heartbeat | Presence

# The tables ingest inserts into, written without the ORM's per-row bookkeeping.
_EVENTS: Final = DeviceEventRow.metadata.tables[DeviceEventRow.__tablename__]
_WINDOWS: Final = WindowRow.metadata.tables[WindowRow.__tablename__]
# Windows go in through the driver as tuples of these columns (a batch is hundreds).
_WINDOW_COLUMNS: Final = (
    "window_id",
    "device_id",
    "model_name",
    "model_version",
    "baseline_id",
    "cohort_id",
    "plan_id",
    "start",
    "end",
    "requests",
    "errors",
    "payload",
    "received_at",
    "ingested_by",
)
_INSERT_WINDOWS: Final = InsertReturningKeys(_WINDOWS, _WINDOW_COLUMNS, "window_id")

# What a window must fit to be stored: the bounds messages' times and counters have.
_LAST_TIME = 4_102_444_800  # 2100-01-01
_MAX_COUNT = 2**63 - 1


@dataclass(frozen=True)
class Accepted:
    """A message that passed the gate; a window keeps its bytes as received (``payload``).

    A window that came through :func:`classify` is its head
    (:func:`~protocol.window.decode_window_head`): every field but the
    features, which were checked as :func:`~protocol.window.decode_window`
    checks them and stay in ``payload``, the bytes stored. Nothing ingest
    writes or folds reads a feature.
    """

    device_id: str
    channel: str
    message: DeviceMessage | WindowSummary
    payload: bytes | None = None


@dataclass(frozen=True)
class Dropped:
    reason: str
    detail: str


def classify(
    topic: str,
    payload: bytes,
    max_bytes: int,
    max_window_bytes: int = MAX_WINDOW_BYTES,
    *,
    namespace: str,
) -> Accepted | Dropped:
    """Accept a well-formed message from the device its topic names, or say why not.

    ``max_bytes`` limits JSON messages and ``max_window_bytes`` binary windows; a
    topic outside the deployment's ``namespace`` is a bad topic.
    """
    parsed = parse_device_topic(namespace, topic)
    if parsed is None:
        return Dropped("bad-topic", topic[:200])
    device_id, channel = parsed
    if channel == "windows":
        return _classify_window(topic, device_id, payload, max_window_bytes)
    if len(payload) > max_bytes:
        return Dropped("oversized", f"{len(payload)} bytes on {topic}")
    expected_kind = _KIND_OF_CHANNEL[channel]
    # Fast path (pydantic's JSON parser, in Rust) for the messages that are fine; anything
    # else goes through the slow path below, which says exactly what is wrong.
    # JSON spells the escape with a lowercase u and digits only, so no case folding.
    suspicious = b"\\u0000" in payload or b"NaN" in payload or b"Infinity" in payload
    if not suspicious:
        try:
            message = DEVICE_MESSAGE.validate_json(payload)
        except (ValidationError, ValueError, RecursionError):
            pass
        else:
            if message.device_id == device_id and message.kind == expected_kind:
                return Accepted(device_id, channel, message)
    try:
        # parse_constant refuses NaN/Infinity literals, which no database column stores.
        raw = json.loads(payload, parse_constant=_no_constants, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert;
        # RecursionError, nesting deeper than the parser goes.
        return Dropped("malformed-json", f"{topic}: {type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(raw, dict):
        return Dropped("invalid-payload", f"{topic}: not a JSON object")
    if b"\\u0000" in payload:
        return Dropped("invalid-payload", f"{topic}: a string holds a NUL character")
    if raw.get("device_id") is not None and raw.get("device_id") != device_id:
        # Checked before the schema so a spoof is named as one.
        return Dropped(
            "spoofed-device-id", f"{topic} carries device_id {str(raw.get('device_id'))[:128]!r}"
        )
    try:
        message = DEVICE_MESSAGE.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        reason = _FREEFORM_REASONS.get(err["type"], "invalid-payload")
        return Dropped(reason, f"{topic}: {where}: {err['msg']}")
    if message.kind != expected_kind:
        return Dropped("wrong-channel", f"a {message.kind} message on {topic}")
    return Accepted(device_id, channel, message)


def _classify_window(
    topic: str, device_id: str, payload: bytes, max_bytes: int
) -> Accepted | Dropped:
    if len(payload) > max_bytes:
        return Dropped("oversized", f"{len(payload)} bytes on {topic}")
    try:
        # Checked as a whole, made without its features: ingest stores the bytes.
        window = decode_window_head(payload)
    except WindowCodecError as exc:
        return Dropped("malformed-window", f"{topic}: {str(exc)[:200]}")
    if window.device_id != device_id:
        return Dropped(
            "spoofed-device-id", f"{topic} carries a window of device_id {window.device_id!r}"
        )
    # The codec takes what its format can say; these are what the columns cannot hold.
    if max(window.start, window.end) > _LAST_TIME:
        return Dropped("invalid-window", f"{topic}: a window ending after 2100")
    if max(window.requests, window.errors) > _MAX_COUNT:
        return Dropped("invalid-window", f"{topic}: counts beyond a 64-bit integer")
    if "\x00" in window.model_name + window.model_version:
        return Dropped("invalid-window", f"{topic}: a model name or version holds a NUL character")
    return Accepted(device_id, "windows", window, payload)


# Free-form fields out of protocol.messages.FREEFORM_BOUNDS, counted by what was wrong.
_FREEFORM_REASONS = {
    "freeform_too_deep": "field-too-deep",
    "freeform_too_large": "field-too-large",
    "freeform_not_json": "invalid-payload",
}

_KIND_OF_CHANNEL = {
    "state": "state",
    "events": "event",
    "heartbeat": "heartbeat",
    "presence": "presence",
}


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a double")
    return value


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass
class BatchResult:
    """What one batch did, counted only once its transaction committed."""

    ingested: dict[str, int]
    dropped: dict[str, int]
    # Per device, in order of arrival: the batch's windows that are stored, now or before.
    acks: dict[str, list[str]] = field(default_factory=dict)


async def write_batch(db: Database, batch: Sequence[Accepted], replica: str) -> BatchResult:
    """Store one batch in one transaction; messages from unknown or decommissioned devices
    are dropped (``unknown-device``, ``decommissioned-device``).

    The batch's device rows are locked up front in device-id order, and events
    and windows are inserted in id order, so replicas writing overlapping
    batches take row locks in the same order and cannot deadlock. The result's ``acks``
    name every window of the batch that is stored for the device that sent it,
    including resends of windows stored before; they are for the caller to
    send once this has returned, that is once the transaction has committed.
    """
    now = datetime.now(UTC)
    result = BatchResult(ingested={}, dropped={})
    async with db.session() as session:
        ids = {a.device_id for a in batch}
        # The batch's device rows are locked first, all at once and in id order, so two
        # replicas whose batches share devices wait for each other instead of deadlocking.
        rows = await store.lock_devices(session, ids)
        known = {device_id for device_id, gone in rows if gone is None}
        decommissioned = {device_id for device_id, gone in rows if gone is not None}
        updates: dict[str, dict[str, object]] = {}
        events: dict[str, dict[str, object]] = {}
        windows: dict[str, tuple[object, ...]] = {}
        summaries: dict[str, WindowSummary] = {}
        sent_windows: list[tuple[str, str]] = []  # (device_id, window_id), as they came
        for item in batch:
            if item.device_id not in known:
                reason = (
                    "decommissioned-device"
                    if item.device_id in decommissioned
                    else "unknown-device"
                )
                result.dropped[reason] = result.dropped.get(reason, 0) + 1
                continue
            msg = item.message
            values = updates.setdefault(item.device_id, {})
            values["last_seen_at"] = now
            if isinstance(msg, DeviceEvent):
                events[msg.message_id] = {
                    "message_id": msg.message_id,
                    "device_id": msg.device_id,
                    "kind": "event",
                    "event": msg.event,
                    "at": _at(msg.at),
                    "received_at": now,
                    "details": msg.details,
                    "ingested_by": replica,
                }
            elif isinstance(msg, WindowSummary):
                # In the order of _WINDOW_COLUMNS.
                windows[msg.window_id] = (
                    msg.window_id,
                    msg.device_id,
                    msg.model_name,
                    msg.model_version,
                    msg.baseline_id,
                    msg.cohort_id,
                    msg.plan_id,
                    _at(msg.start),
                    _at(msg.end),
                    msg.requests,
                    msg.errors,
                    item.payload,
                    now,
                    replica,
                )
                sent_windows.append((msg.device_id, msg.window_id))
                summaries[msg.window_id] = msg
            elif isinstance(msg, Presence):
                values["online"] = msg.online
            elif isinstance(msg, Heartbeat):
                values["online"] = True
            elif isinstance(msg, ReportedState):
                previous = values.get("reported_at")
                # A device clock ahead of ours must not outrank every later report.
                stamp = min(_at(msg.sent_at), now)
                if not isinstance(previous, datetime) or stamp >= previous:
                    values.update(reported_state_columns(msg, stamp))
            result.ingested[item.channel] = result.ingested.get(item.channel, 0) + 1
        # Devices that only said "alive" (heartbeats, presence, events) share one UPDATE;
        # a reported state is a statement of its own.
        groups: dict[tuple[tuple[str, object], ...], list[str]] = {}
        for device_id in sorted(updates):
            values = updates[device_id]
            if "reported" in values:
                await write_reported_state(session, device_id, values, now)
            else:
                groups.setdefault(tuple(sorted(values.items())), []).append(device_id)
        for key, device_ids in sorted(groups.items(), key=lambda g: g[1][0]):
            await session.execute(
                update(Device)
                .where(store.listed(session, Device.id, device_ids))
                .values(**dict(key))
                .execution_options(synchronize_session=False)
            )
        if events:
            insert = insert_for(db.is_postgres)
            await session.execute(
                insert(_EVENTS).on_conflict_do_nothing(index_elements=["message_id"]),
                [events[k] for k in sorted(events)],
            )
        if windows:
            inserted = await _INSERT_WINDOWS.execute(session, [windows[k] for k in sorted(windows)])
            # Only windows stored now count in the aggregates: a resend is counted once.
            new = [summaries[w] for w in inserted]
            shadows = [d for d in map(fold_shadow, new) if d is not None]
            await add_to_hour_stats(session, [*map(fold, new), *shadows])
            await add_to_hybrid_stats(session, [fold_hybrid(w) for w in new])
            # A window stored now belongs to the device whose row was inserted; only
            # the others (resends, or an id another device's window holds) are looked up.
            owners = {w.window_id: w.device_id for w in new}
            resent = [w for w in windows if w not in owners]
            if resent:
                owners.update(await store.window_owners(session, resent))
            stored: dict[str, dict[str, None]] = {}  # ordered sets
            for device_id, window_id in sent_windows:
                if owners.get(window_id) == device_id:
                    stored.setdefault(device_id, {})[window_id] = None
                else:
                    # Another device's window holds this id: this one is not stored.
                    result.ingested["windows"] -= 1
                    result.dropped["window-id-taken"] = result.dropped.get("window-id-taken", 0) + 1
            result.acks = {d: list(ids) for d, ids in stored.items()}
    return result


async def sweep_offline(db: Database, metrics: Metrics, timeout_s: float) -> None:
    """Devices silent for longer than ``timeout_s`` are offline; update the gauges."""
    cutoff = datetime.now(UTC) - timedelta(seconds=timeout_s)
    async with db.session() as session:
        await session.execute(
            update(Device)
            .where(Device.online.is_(True), Device.last_seen_at < cutoff)
            .values(online=False)
        )
        online = len(
            (await session.scalars(select(Device.id).where(Device.online.is_(True)))).all()
        )
        total = len(
            (
                await session.scalars(select(Device.id).where(Device.decommissioned_at.is_(None)))
            ).all()
        )
    metrics.devices_online.set(online)
    metrics.devices_registered.set(total)
