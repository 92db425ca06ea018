"""The MQTT topic layout, version 1, inside one deployment's namespace.

Every deployment (one fleet server, or its replicas on one database) owns a
namespace, a single topic segment, and every topic it uses lies below
``edgefleet/v1/{namespace}/``; its replicas' shared subscription group is
derived from it. Two deployments on one broker therefore never see each
other's messages, and a device learns its namespace from its configuration.

Every device has its own prefix, ``edgefleet/v1/{namespace}/devices/{device_id}/``;
the broker's ACL lets a device publish and subscribe only below its own prefix.

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

The servers of a deployment also use ``edgefleet/v1/{namespace}/server/...``
(:func:`server_topic`), which no device may read or write.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

PREFIX = "edgefleet/v1"
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
# One topic segment, also valid inside a shared-subscription group name and a
# client id: no '/', '+', '#', '$' or spaces.
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
NAMESPACE_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"

_TOPIC = re.compile(r"^edgefleet/v1/([^/+#]+)/devices/([^/+#]+)/([a-z]+)$")


class NamespaceError(ValueError):
    """A namespace that is not one safe topic segment."""


def check_namespace(namespace: str) -> str:
    """``namespace`` itself if it is a valid namespace; :class:`NamespaceError` naming the rule."""
    if not isinstance(namespace, str) or not NAMESPACE_PATTERN.match(namespace):
        raise NamespaceError(f"{namespace!r} is not a valid MQTT namespace: use {NAMESPACE_RULE}")
    return namespace


def namespace_for(identity: str) -> str:
    """The default namespace of a deployment whose identity is ``identity``: short and stable."""
    return "fleet-" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def share_group(namespace: str) -> str:
    """The shared-subscription group of a deployment's replicas."""
    return f"edgefleet-{check_namespace(namespace)}"


def devices_root(namespace: str) -> str:
    """The topic under which every device of the namespace has its prefix."""
    return f"{PREFIX}/{check_namespace(namespace)}/devices"


def device_prefix(namespace: str, device_id: str) -> str:
    """The topic prefix that belongs to one device."""
    return f"{devices_root(namespace)}/{device_id}"


def desired_topic(namespace: str, device_id: str) -> str:
    return f"{device_prefix(namespace, device_id)}/desired"


def acks_topic(namespace: str, device_id: str) -> str:
    return f"{device_prefix(namespace, device_id)}/acks"


def windows_topic(namespace: str, device_id: str) -> str:
    return f"{device_prefix(namespace, device_id)}/windows"


def device_topic(namespace: str, device_id: str, channel: DeviceChannel) -> str:
    return f"{device_prefix(namespace, device_id)}/{channel}"


def server_topic(namespace: str, name: str) -> str:
    """A topic only the deployment's servers use (the namespace claim, replica records)."""
    return f"{PREFIX}/{check_namespace(namespace)}/server/{name}"


def ingest_subscriptions(namespace: str, shared: bool = True) -> list[str]:
    """What the server subscribes to; with ``shared``, replicas split the messages."""
    topics = [f"{devices_root(namespace)}/+/{channel}" for channel in DEVICE_CHANNELS]
    return [f"$share/{share_group(namespace)}/{t}" for t in topics] if shared else topics


def parse_device_topic(namespace: str, topic: str) -> tuple[str, DeviceChannel] | None:
    """``(device_id, channel)`` of a device-to-server topic of ``namespace``, else ``None``."""
    match = _TOPIC.match(topic)
    if match is None:
        return None
    topic_namespace, device_id, channel = match.groups()
    if topic_namespace != namespace:
        return None
    if channel not in DEVICE_CHANNELS or not DEVICE_ID_PATTERN.match(device_id):
        return None
    return device_id, channel
