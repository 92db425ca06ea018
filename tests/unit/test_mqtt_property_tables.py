"""paho's MQTT 5 properties with shared tables set, check, pack and read as with paho's own."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from fleet_server.mqtt.property_tables import PAHO_INIT, share_property_tables

SETS: list[tuple[int, dict[str, Any]]] = [
    (PacketTypes.CONNECT, {"SessionExpiryInterval": 3600, "ReceiveMaximum": 1000}),
    (PacketTypes.PUBLISH, {}),
    (PacketTypes.PUBLISH, {"MessageExpiryInterval": 60, "ContentType": "application/json"}),
    (PacketTypes.PUBLISH, {"UserProperty": [("a", "1"), ("b", "2")], "TopicAlias": 3}),
    (PacketTypes.PUBACK, {"ReasonString": "fine"}),
    (PacketTypes.CONNACK, {"ReceiveMaximum": 20, "SharedSubscriptionAvailable": 1}),
]


def made_properties(packet_type: int, values: dict[str, Any], *, shared: bool) -> Any:
    if shared:
        share_property_tables()
        made = Properties(packet_type)  # type: ignore[no-untyped-call]
    else:
        made = object.__new__(Properties)
        PAHO_INIT(made, packet_type)
    for name, value in values.items():
        setattr(made, name, value)
    return made


@pytest.mark.parametrize(("packet_type", "values"), SETS)
def test_shared_tables_pack_and_read_as_pahos_own(packet_type: int, values: dict[str, Any]) -> None:
    own = made_properties(packet_type, values, shared=False)
    shared = made_properties(packet_type, values, shared=True)
    assert (shared.types, shared.names, shared.properties) == (own.types, own.names, own.properties)
    packed = own.pack()
    assert shared.pack() == packed
    read_own = made_properties(packet_type, {}, shared=False)
    read_shared = made_properties(packet_type, {}, shared=True)
    assert read_shared.unpack(packed)[1] == read_own.unpack(packed)[1] == len(packed)
    assert read_shared.json() == read_own.json() == own.json()


def test_refusals_are_pahos_own() -> None:
    share_property_tables()
    publish = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    with pytest.raises(MQTTException, match="does not apply to packet type"):
        publish.SessionExpiryInterval = 10
    with pytest.raises(MQTTException, match="must be one of"):
        publish.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="1-65535"):
        Properties(PacketTypes.CONNECT).ReceiveMaximum = 0  # type: ignore[no-untyped-call]


def test_instances_share_one_copy_of_the_tables() -> None:
    share_property_tables()
    share_property_tables()  # idempotent
    a = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    b = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    assert a.names is b.names and a.properties is b.properties
    assert (a.packetType, b.packetType) == (PacketTypes.PUBLISH, PacketTypes.PUBACK)
