"""The MQTT topic layout, version 1.

Every device has its own prefix, ``edgefleet/v1/devices/{device_id}/``; the
broker's ACL lets a device publish and subscribe only below its own prefix.

====================  =========  ========  ===================================
topic suffix          direction  retained  payload
====================  =========  ========  ===================================
``desired``           server→dev yes       :class:`protocol.messages.DesiredState`
``state``             dev→server yes       :class:`protocol.messages.ReportedState`
``events``            dev→server no        :class:`protocol.messages.DeviceEvent`
``heartbeat``         dev→server no        :class:`protocol.messages.Heartbeat`
``presence``          dev→server yes       :class:`protocol.messages.Presence` (also the LWT)
``windows``           dev→server no        :func:`protocol.window.encode_window` bytes
``acks``              server→dev no        :class:`protocol.messages.WindowAck`
====================  =========  ========  ===================================

A window leaves the device's outbox only when the server's ``acks`` message
names it, which the server sends after the window is stored.
"""

from __future__ import annotations

import re
from typing import Literal

ROOT = "edgefleet/v1/devices"
SHARE_GROUP = "edgefleet"
MAX_PAYLOAD_BYTES = 64 * 1024

DeviceChannel = Literal["state", "events", "heartbeat", "presence", "windows"]
DEVICE_CHANNELS: tuple[DeviceChannel, ...] = (
    "state",
    "events",
    "heartbeat",
    "presence",
    "windows",
)
MAX_WINDOW_BYTES = 256 * 1024
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_TOPIC = re.compile(rf"^{re.escape(ROOT)}/([^/+#]+)/([a-z]+)$")


def device_prefix(device_id: str) -> str:
    """The topic prefix that belongs to one device."""
    return f"{ROOT}/{device_id}"


def desired_topic(device_id: str) -> str:
    return f"{ROOT}/{device_id}/desired"


def acks_topic(device_id: str) -> str:
    return f"{ROOT}/{device_id}/acks"


def windows_topic(device_id: str) -> str:
    return f"{ROOT}/{device_id}/windows"


def device_topic(device_id: str, channel: DeviceChannel) -> str:
    return f"{ROOT}/{device_id}/{channel}"


def ingest_subscriptions(shared: bool = True) -> list[str]:
    """What the server subscribes to; with ``shared``, replicas split the messages."""
    topics = [f"{ROOT}/+/{channel}" for channel in DEVICE_CHANNELS]
    return [f"$share/{SHARE_GROUP}/{t}" for t in topics] if shared else topics


def parse_device_topic(topic: str) -> tuple[str, DeviceChannel] | None:
    """``(device_id, channel)`` of a device-to-server topic, or ``None`` if it is not one."""
    match = _TOPIC.match(topic)
    if match is None:
        return None
    device_id, channel = match.groups()
    if channel not in DEVICE_CHANNELS or not DEVICE_ID_PATTERN.match(device_id):
        return None
    return device_id, channel
