"""The device registry's store: enrolment, credentials, attributes, reported state.

Device credentials are random tokens shown once; only their SHA-256 is kept
(a 192-bit random secret needs no slow hash). A device enrols with a
provisioning token, or an admin pre-registers it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Text, bindparam, case, cast, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.audit import record
from fleet_server.db.models import Device, DeviceEventRow, ProvisioningToken
from fleet_server.devices.errors import (
    DeviceDecommissioned,
    DeviceExists,
    DeviceNotFound,
    InvalidProvisioningToken,
    RegistryError,
)
from protocol.messages import ReportedState
from protocol.topics import DEVICE_ID_PATTERN
from protocol.versioning import HARDWARE_ID_PATTERN

TAG_PATTERN = DEVICE_ID_PATTERN


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def _check_attributes(device_id: str, hardware_id: str, tags: Sequence[str]) -> None:
    if not DEVICE_ID_PATTERN.match(device_id):
        raise RegistryError(f"device id {device_id!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    if not HARDWARE_ID_PATTERN.match(hardware_id):
        raise RegistryError(f"hardware id {hardware_id!r} must be 1-64 of A-Z a-z 0-9 . _ : -")
    for tag in tags:
        if not TAG_PATTERN.match(tag):
            raise RegistryError(f"tag {tag!r} must be 1-128 of A-Z a-z 0-9 . _ -")


async def create_device(
    session: AsyncSession,
    *,
    device_id: str,
    hardware_id: str,
    region: str | None = None,
    timezone: str | None = None,
    tags: Sequence[str] = (),
    actor: str,
    reuse_decommissioned: bool = False,
) -> tuple[Device, str]:
    """Register a device; returns it and its password (shown only now).

    The id of a decommissioned device is taken again only with
    ``reuse_decommissioned`` (see :func:`_register_again`).
    """
    _check_attributes(device_id, hardware_id, tags)
    existing = await session.get(Device, device_id, with_for_update=True)
    if existing is not None and existing.decommissioned_at is not None:
        if not reuse_decommissioned:
            raise DeviceExists(
                f"device {device_id} was decommissioned on "
                f"{existing.decommissioned_at:%Y-%m-%d %H:%M} UTC; registering a new "
                "device under its id needs reuse_decommissioned (fleetctl devices register "
                "--reuse-decommissioned)"
            )
        return await _register_again(
            session,
            existing,
            hardware_id=hardware_id,
            region=region,
            timezone=timezone,
            tags=tags,
            actor=actor,
        )
    if existing is not None:
        raise DeviceExists(f"device {device_id} is already registered")
    password = new_secret()
    device = Device(
        id=device_id,
        hardware_id=hardware_id,
        region=region,
        timezone=timezone,
        tags=sorted(set(tags)),
        credential_hash=secret_hash(password),
        enrolled_at=datetime.now(UTC),
        online=False,
        installed_counter=0,
        director_version=0,
    )
    session.add(device)
    await session.flush()
    await record(
        session,
        actor,
        "device.register",
        device_id,
        {
            "hardware_id": hardware_id,
            "region": region,
            "timezone": timezone,
            "tags": device.tags,
        },
    )
    return device, password


async def create_provisioning_token(
    session: AsyncSession,
    *,
    actor: str,
    hardware_id: str | None = None,
    tags: Sequence[str] = (),
    uses: int = 1,
    ttl: timedelta = timedelta(days=7),
) -> str:
    """A token devices present to enrol themselves (``uses`` times, until it expires)."""
    secret = new_secret()
    token_id = secrets.token_hex(8)
    session.add(
        ProvisioningToken(
            id=token_id,
            secret_hash=secret_hash(secret),
            hardware_id=hardware_id,
            tags=sorted(set(tags)),
            uses_left=uses,
            expires_at=datetime.now(UTC) + ttl,
        )
    )
    await record(
        session,
        actor,
        "provisioning-token.create",
        token_id,
        {"hardware_id": hardware_id, "tags": list(tags), "uses": uses},
    )
    return f"{token_id}.{secret}"


async def enrol(
    session: AsyncSession,
    *,
    token: str,
    device_id: str,
    hardware_id: str,
    region: str | None = None,
    timezone: str | None = None,
    tags: Sequence[str] = (),
) -> tuple[Device, str]:
    """A device enrols itself with a provisioning token; returns its credentials."""
    token_id, _, secret = token.partition(".")
    row = await session.get(ProvisioningToken, token_id, with_for_update=True)
    now = datetime.now(UTC)
    if (
        row is None
        or not hmac.compare_digest(row.secret_hash, secret_hash(secret))
        or row.uses_left < 1
        or row.expires_at < now
    ):
        raise InvalidProvisioningToken("the provisioning token is unknown, used up or expired")
    if row.hardware_id is not None and row.hardware_id != hardware_id:
        raise InvalidProvisioningToken(f"this token enrols only {row.hardware_id} devices")
    row.uses_left -= 1
    # Never reuse_decommissioned here: a decommissioned (perhaps stolen) device holding a
    # provisioning token must not come back under its old id on its own.
    return await create_device(
        session,
        device_id=device_id,
        hardware_id=hardware_id,
        region=region,
        timezone=timezone,
        tags=[*row.tags, *tags],
        actor=f"device:{device_id}",
    )


async def get_device(session: AsyncSession, device_id: str) -> Device:
    device = await session.get(Device, device_id)
    if device is None:
        raise DeviceNotFound(f"no device {device_id}")
    return device


async def list_devices(
    session: AsyncSession,
    *,
    tag: str | None = None,
    hardware_id: str | None = None,
    online: bool | None = None,
    include_decommissioned: bool = False,
) -> list[Device]:
    """Devices by id; decommissioned ones only with ``include_decommissioned``."""
    query = select(Device).order_by(Device.id)
    if not include_decommissioned:
        query = query.where(Device.decommissioned_at.is_(None))
    if hardware_id is not None:
        query = query.where(Device.hardware_id == hardware_id)
    if online is not None:
        query = query.where(Device.online == online)
    devices = list((await session.scalars(query)).all())
    # Tags are a JSON list: filtered here so SQLite and PostgreSQL behave alike.
    return [d for d in devices if tag is None or tag in (d.tags or [])]


async def set_tags(
    session: AsyncSession,
    device_id: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    actor: str,
) -> Device:
    device = await get_device(session, device_id)
    refuse_decommissioned(device, "take tags")
    _check_attributes(device.id, device.hardware_id, add)
    device.tags = sorted((set(device.tags or []) | set(add)) - set(remove))
    await record(
        session, actor, "device.tag", device_id, {"add": list(add), "remove": list(remove)}
    )
    return device


async def authenticate_device(session: AsyncSession, device_id: str, password: str) -> bool:
    device = await session.get(Device, device_id)
    return (
        device is not None
        and device.decommissioned_at is None
        and device.credential_hash is not None
        and hmac.compare_digest(device.credential_hash, secret_hash(password))
    )


# -- lifecycle: decommissioning, re-registering, rotating credentials -------------------


def refuse_decommissioned(device: Device, what: str) -> None:
    """Raise :class:`DeviceDecommissioned` if ``device`` is decommissioned."""
    if device.decommissioned_at is not None:
        raise DeviceDecommissioned(
            f"device {device.id} is decommissioned (since "
            f"{device.decommissioned_at:%Y-%m-%d %H:%M} UTC) and cannot {what}"
        )


async def decommission_device(
    session: AsyncSession, device_id: str, *, reason: str | None, actor: str
) -> Device:
    """Take a device out of the fleet for good: no credential, hidden from the default list.

    Its row stays, so its events, windows, assignments and audit entries keep
    naming it; its id is not given to another device unless an admin asks
    (:func:`create_device` with ``reuse_decommissioned``). The caller withdraws
    its assignment from the director in the same transaction.
    """
    device = await session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise DeviceNotFound(f"no device {device_id}")
    refuse_decommissioned(device, "be decommissioned again")
    device.decommissioned_at = datetime.now(UTC)
    device.decommission_reason = reason
    device.credential_hash = None
    device.online = False
    await record(
        session,
        actor,
        "device.decommission",
        device_id,
        {
            "reason": reason,
            "hardware_id": device.hardware_id,
            "assigned_target": device.assigned_target,
            "active_bundle": device.active_bundle,
        },
    )
    return device


async def rotate_credentials(
    session: AsyncSession, device_id: str, *, actor: str
) -> tuple[Device, str]:
    """Give a device a new password (shown only now); the old one stops working at once."""
    device = await session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise DeviceNotFound(f"no device {device_id}")
    refuse_decommissioned(device, "get new credentials")
    password = new_secret()
    device.credential_hash = secret_hash(password)
    await record(session, actor, "device.rotate-credentials", device_id, {})
    return device, password


async def _register_again(
    session: AsyncSession,
    device: Device,
    *,
    hardware_id: str,
    region: str | None,
    timezone: str | None,
    tags: Sequence[str],
    actor: str,
) -> tuple[Device, str]:
    """A new device under a decommissioned one's id: a fresh identity, the history kept.

    Everything the old device reported or was assigned is cleared; the
    director version goes on from where it was, so the new device's metadata
    versions only ever grow. Events and windows stored before stay listed
    under the id (older than the new ``enrolled_at``).
    """
    password = new_secret()
    decommissioned_at = device.decommissioned_at or datetime.now(UTC)
    device.hardware_id = hardware_id
    device.region = region
    device.timezone = timezone
    device.tags = sorted(set(tags))
    device.credential_hash = secret_hash(password)
    device.enrolled_at = datetime.now(UTC)
    device.last_seen_at = None
    device.online = False
    device.agent_version = None
    device.active_bundle = None
    device.installed_counter = 0
    device.phase = None
    device.reported = None
    device.reported_at = None
    device.assigned_target = None
    device.shadow_target = device.shadow_rollout = None
    device.decommissioned_at = None
    device.decommission_reason = None
    await session.flush()
    await record(
        session,
        actor,
        "device.register",
        device.id,
        {
            "hardware_id": hardware_id,
            "region": region,
            "timezone": timezone,
            "tags": device.tags,
            "reuses_decommissioned": decommissioned_at.isoformat(),
        },
    )
    return device, password


async def recent_events(session: AsyncSession, device_id: str, limit: int) -> list[Any]:
    """The device's events, newest first, each ``(message_id, kind, event, at, received_at,
    details)`` with the details as the text stored: whatever an older version let in is
    shown as a note instead of failing the whole list (see :mod:`fleet_server.stored_json`)."""
    rows = await session.execute(
        select(
            DeviceEventRow.message_id,
            DeviceEventRow.kind,
            DeviceEventRow.event,
            DeviceEventRow.at,
            DeviceEventRow.received_at,
            cast(DeviceEventRow.details, Text),
        )
        .where(DeviceEventRow.device_id == device_id)
        .order_by(DeviceEventRow.id.desc())
        .limit(limit)
    )
    return list(rows.all())


async def director_version(session: AsyncSession, device_id: str) -> int | None:
    """The director version the database records for the device."""
    return await session.scalar(select(Device.director_version).where(Device.id == device_id))


# -- reported state ----------------------------------------------------------------
# What a device reports is written here; ingest (fleet_server.mqtt.ingest) calls these.


def reported_state_columns(msg: ReportedState, stamp: datetime) -> dict[str, object]:
    """The ``devices`` columns a reported state sets, stamped ``stamp``."""
    return {
        "agent_version": msg.agent_version,
        "active_bundle": f"{msg.active.name} {msg.active.version}" if msg.active else None,
        "installed_counter": msg.installed_counter,
        "phase": msg.phase,
        "reported": msg.model_dump(mode="json"),
        "reported_at": stamp,
    }


async def write_reported_state(
    session: AsyncSession, device_id: str, values: dict[str, object], now: datetime
) -> None:
    """Write a device's ``values`` (a reported state among them); the state only if newer."""
    await session.execute(
        update(Device).where(Device.id == device_id).values(**_newer_state(values, now))
    )


_STATE_COLUMNS = (
    "agent_version",
    "active_bundle",
    "installed_counter",
    "phase",
    "reported",
    "reported_at",
)


def _newer_state(values: dict[str, object], now: datetime) -> dict[str, object]:
    """``values`` for an UPDATE that replaces the stored state only with a newer one.

    A delivery can come late (a replica restarted, another replica slower);
    its presence (``last_seen_at``, ``online``) still counts, its state only if
    it is at least as new as the row's (every SET sees the row as it was). A
    stored time ahead of ``now`` (a device clock that was ahead, stored before
    times were capped at arrival) never outranks a report.
    """
    stamp = values["reported_at"]
    newer = or_(Device.reported_at.is_(None), Device.reported_at <= stamp, Device.reported_at > now)
    out: dict[str, object] = {}
    for name, value in values.items():
        if name in _STATE_COLUMNS:
            column: ColumnElement[object] = getattr(Device, name)
            out[name] = case((newer, bindparam(None, value, type_=column.type)), else_=column)
        else:
            out[name] = value
    return out
