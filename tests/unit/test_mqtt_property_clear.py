"""paho's MQTT 5 properties cleared (as ``unpack`` does first) as paho's own ``clear`` does."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.mqtt.property_tables import PAHO_CLEAR, share_property_tables

SETS: list[tuple[int, dict[str, Any]]] = [
    (PacketTypes.PUBLISH, {}),
    (PacketTypes.PUBLISH, {"MessageExpiryInterval": 60, "ContentType": "application/json"}),
    (PacketTypes.PUBLISH, {"UserProperty": [("a", "1"), ("b", "2")], "TopicAlias": 3}),
    (PacketTypes.CONNECT, {"SessionExpiryInterval": 3600, "ReceiveMaximum": 1000}),
    (PacketTypes.PUBACK, {"ReasonString": "fine"}),
]


def made(packet_type: int, values: dict[str, Any]) -> Any:
    share_property_tables()
    properties = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


@pytest.mark.parametrize(("packet_type", "values"), SETS)
def test_clear_leaves_what_pahos_own_clear_leaves(packet_type: int, values: dict[str, Any]) -> None:
    ours, pahos = made(packet_type, values), made(packet_type, values)
    ours.clear()
    PAHO_CLEAR(pahos)
    assert vars(ours) == vars(pahos)
    assert ours.json() == pahos.json() == {}
    assert ours.pack() == pahos.pack() == b"\x00"


@pytest.mark.parametrize(("packet_type", "values"), SETS)
def test_properties_read_over_others_are_the_packets_alone(
    packet_type: int, values: dict[str, Any]
) -> None:
    """``unpack`` into an instance that holds other properties keeps only the packet's."""
    packed = made(packet_type, values).pack()
    stale = made(PacketTypes.PUBLISH, {"ResponseTopic": "old/topic", "CorrelationData": b"x"})
    stale.packetType = packet_type
    read, length = stale.unpack(packed)
    assert length == len(packed)
    assert read.json() == made(packet_type, values).json()
