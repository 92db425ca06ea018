"""Devices: registration, enrolment, tags, events, provisioning tokens, decommissioning."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

from protocol.api.base import (
    DeviceId,
    HardwareId,
    LifecycleReason,
    Region,
    RequestBody,
    ResponseBody,
    Tag,
    Tags,
    TimeZoneName,
)


class DeviceRefusal(ResponseBody):
    """An update the device refused, from its events (``check-refused``, ``refused``, …)."""

    at: datetime = Field(description="when the device refused (its clock)")
    received_at: datetime
    event: str
    reason: str | None = None
    bundle: str | None = Field(default=None, description="NAME VERSION, where the event names it")
    message: str | None = None


class DeviceView(ResponseBody):
    """A device as the registry knows it: attributes, what it runs, what it should run."""

    id: str
    hardware_id: str
    region: str | None = None
    timezone: str | None = Field(
        default=None,
        description="the device's IANA time zone, which its rollout maintenance windows are "
        "read in; null: each window's own zone",
    )
    tags: list[str] = Field(default_factory=list)
    enrolled_at: datetime
    online: bool
    last_seen_at: datetime | None = None
    agent_version: str | None = None
    active_bundle: str | None = None
    installed_counter: int = 0
    phase: str | None = None
    assigned_target: str | None = None
    shadow_target: str | None = Field(
        default=None,
        description="a release the device runs beside its model without serving its answers",
    )
    shadow_rollout: str | None = Field(
        default=None, description="the rollout whose shadow stage put shadow_target there"
    )
    director_version: int = 0
    reported: dict[str, Any] | None = None
    reported_omitted: str | None = Field(
        default=None, description="why the stored report is not shown; null if shown"
    )
    reported_at: datetime | None = None
    decommissioned_at: datetime | None = Field(
        default=None, description="when the device was decommissioned; null while it is active"
    )
    decommission_reason: str | None = None
    refusals: list[DeviceRefusal] = Field(
        default_factory=list,
        description="the device's latest refused updates, newest first (one device's view only)",
    )
    assignment_warning: str | None = Field(
        default=None,
        description="set when the device refused the bundle assigned to it now, saying so",
    )


class DeviceList(ResponseBody):
    devices: list[DeviceView]


class DeviceQuery(RequestBody):
    """Filters of the device list (query string; unknown parameters are refused too)."""

    tag: Tag | None = None
    hardware_id: HardwareId | None = None
    online: bool | None = None
    include_decommissioned: bool = Field(
        default=False, description="list decommissioned devices too (hidden by default)"
    )


class RegisterDevice(RequestBody):
    """An admin pre-registers a device (its password is shown once, in the answer)."""

    device_id: DeviceId
    hardware_id: HardwareId
    region: Region | None = None
    timezone: TimeZoneName | None = Field(
        default=None,
        description="the device's IANA time zone (Europe/Berlin): rollouts hold its installs "
        "to their maintenance window on its own clock; none: each window's own zone",
    )
    tags: Tags = Field(default_factory=list)
    reuse_decommissioned: bool = Field(
        default=False,
        description="register a new device under the id of a decommissioned one (refused "
        "otherwise); its history stays, the new device starts with nothing assigned",
    )


class EnrolDevice(RequestBody):
    """A device enrols itself with a provisioning token."""

    token: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]{1,128}$")]
    device_id: DeviceId
    hardware_id: HardwareId
    region: Region | None = None
    timezone: TimeZoneName | None = Field(
        default=None,
        description="the device's IANA time zone (Europe/Berlin): rollouts hold its installs "
        "to their maintenance window on its own clock; none: each window's own zone",
    )
    tags: Tags = Field(default_factory=list)


class DeviceCredentials(ResponseBody):
    """A device's credentials: HTTP Basic and MQTT user ``device_id``, this password."""

    device_id: str
    password: str
    device: DeviceView
    mqtt_namespace: str | None = Field(
        default=None,
        description="the topic namespace the device's agent.toml names in [mqtt] namespace "
        "(none: the server has no broker)",
    )


class TagChange(RequestBody):
    add: Tags = Field(default_factory=list)
    remove: Tags = Field(default_factory=list)


class DeviceEventView(ResponseBody):
    message_id: str
    kind: str
    event: str
    at: datetime
    received_at: datetime
    details: dict[str, Any] = Field(default_factory=dict)
    details_omitted: str | None = Field(
        default=None,
        description="why the stored details are not shown (then details is empty); null if shown",
    )


class DeviceEventList(ResponseBody):
    events: list[DeviceEventView]


class EventQuery(RequestBody):
    limit: int = Field(default=100, ge=1, le=1000)


class ProvisioningTokenRequest(RequestBody):
    """A token devices present to enrol themselves, ``uses`` times until it expires."""

    hardware_id: HardwareId | None = None
    tags: Tags = Field(default_factory=list)
    uses: int = Field(default=1, ge=1, le=100_000)
    ttl_s: float = Field(default=7 * 86400, gt=0, le=366 * 86400)


class ProvisioningTokenCreated(ResponseBody):
    id: str
    token: str
    hardware_id: str | None
    tags: list[str]
    uses: int
    expires_at: datetime


class DecommissionRequest(RequestBody):
    """Decommission a device: its credentials stop working, its history stays."""

    reason: LifecycleReason | None = None
