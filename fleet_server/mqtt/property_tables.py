"""paho's MQTT 5 property tables, built once instead of for every packet it reads.

paho (2.x) makes a :class:`~paho.mqtt.properties.Properties` for every MQTT 5
packet it reads: each PUBLISH the server ingests, each PUBACK of a window ack
it sends. Its constructor builds the same three tables anew each time (the
value types, the 27 property names, each property's type and packets), about
7 µs a packet, which is the biggest single cost of reading a window off the
connection. paho only reads those tables, so every instance can share one
copy: :func:`share_property_tables` makes the constructor hand out the tables
of one instance built by paho's own constructor. Nothing else changes:
properties are set, checked, packed and read by paho's own code.
"""

from __future__ import annotations

from typing import Any, Final

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# paho's own constructor, which builds the tables (kept for the tests and for its tables).
PAHO_INIT: Final = Properties.__init__


def share_property_tables() -> None:
    """Make every new ``Properties`` share one copy of paho's tables (idempotent)."""
    if Properties.__init__ is not PAHO_INIT:
        return
    built = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types, names, properties = built.types, built.names, built.properties

    def __init__(self: Any, packetType: int) -> None:
        # What paho's constructor sets, through its own __setattr__'s path for them.
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "properties", properties)

    Properties.__init__ = __init__  # type: ignore[method-assign]
