"""Every MQTT payload, versioned: what devices report and what the server wants.

Payloads are JSON objects with ``v`` (the schema version), the ``device_id``
(which must equal the one in the topic), a ``message_id`` unique per message
(so a resent message is processed once) and ``sent_at`` (device clock, seconds
since the epoch). Unknown fields are refused rather than ignored, so a typo in
a device's firmware shows up as a dropped, counted message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MESSAGE_SCHEMA_VERSION = 1

_DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
_Short = Annotated[str, Field(max_length=256)]
# Times are seconds since the epoch before 2100; counters fit a signed 64-bit column.
_Time = Annotated[float, Field(ge=0, le=4_102_444_800)]
_Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    message_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    sent_at: _Time


class BundleRef(BaseModel):
    """A bundle as messages name it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Short
    version: _Short
    release_counter: _Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class InstallOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    result: Literal["committed", "refused", "rolled_back"]
    bundle: BundleRef
    reason: _Short | None = None
    message: Annotated[str, Field(max_length=2000)] | None = None
    at: _Time


class ReportedState(_Message):
    """What the device runs and how its install is going (retained: the latest wins)."""

    kind: Literal["state"] = "state"
    agent_version: _Short
    hardware_id: _Short
    active: BundleRef | None = None
    previous: BundleRef | None = None
    installed_counter: _Count
    phase: Literal["idle", "downloading", "verified", "staging", "staged", "trial"]
    installing: BundleRef | None = None
    last_outcome: InstallOutcome | None = None


class DeviceEvent(_Message):
    """Something that happened on the device (an install step, a refusal, a rollback)."""

    kind: Literal["event"] = "event"
    event: Annotated[str, Field(min_length=1, max_length=64)]
    at: _Time
    details: dict[str, Any] = Field(default_factory=dict, max_length=32)


class Heartbeat(_Message):
    """I am alive, and this is how serving goes."""

    kind: Literal["heartbeat"] = "heartbeat"
    uptime_s: float = Field(ge=0, le=1e10)
    served: dict[str, _Count] = Field(default_factory=dict, max_length=8)


class Presence(_Message):
    """Online when the device connects; offline as its MQTT last will."""

    kind: Literal["presence"] = "presence"
    online: bool


class DesiredState(BaseModel):
    """What the server wants a device to run (retained, server to device).

    The assignment itself is the director's signed metadata; this message only
    says that it changed (``director_version``), so the device refreshes now
    instead of at its next poll. A forged message can therefore not install
    anything: it can at most make a device look.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    director_version: _Count
    bundle: BundleRef | None = None
    issued_at: _Time


class WindowAck(BaseModel):
    """The server stored these windows; the device may drop them from its outbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    window_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(max_length=1000)


DeviceMessage = Annotated[
    ReportedState | DeviceEvent | Heartbeat | Presence, Field(discriminator="kind")
]
DEVICE_MESSAGE: TypeAdapter[ReportedState | DeviceEvent | Heartbeat | Presence] = TypeAdapter(
    DeviceMessage
)
