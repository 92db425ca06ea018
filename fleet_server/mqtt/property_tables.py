"""paho's MQTT 5 property tables, built once instead of for every packet it reads.

paho (2.x) makes a :class:`~paho.mqtt.properties.Properties` for every MQTT 5
packet it reads: each PUBLISH the server ingests, each PUBACK of a window ack
it sends. Its constructor builds the same three tables anew each time (the
value types, the 27 property names, each property's type and packets), about
7 µs a packet, which is the biggest single cost of reading a window off the
connection. paho only reads those tables, so every instance can share one
copy: :func:`share_property_tables` makes the constructor hand out the tables
of one instance built by paho's own constructor. ``unpack`` first clears the
instance by trying all 27 names (about 9 µs a packet); the same result comes
from removing the attributes that are set. Nothing else changes:
properties are set, checked, packed and read by paho's own code.
"""

from __future__ import annotations

from typing import Any, Final

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# paho's own constructor, which builds the tables (kept for the tests and for its tables).
PAHO_INIT: Final = Properties.__init__
# paho's own clear, which looks up every one of the 27 property names (kept for the tests).
PAHO_CLEAR: Final = Properties.clear
# What an instance holds besides the properties set on it.
_TABLES: Final = frozenset(("packetType", "types", "names", "properties"))


def _clear(self: Any) -> None:
    """paho's ``clear``: every property set is removed. paho tries each of the names
    (``hasattr`` and ``delattr``, about 9 µs, done before every packet's properties are
    read); a property set is an attribute of the instance, so only those are removed."""
    for name in [n for n in vars(self) if n not in _TABLES]:
        delattr(self, name)


def share_property_tables() -> None:
    """Make every new ``Properties`` share one copy of paho's tables, and clear only
    what is set (idempotent)."""
    if Properties.__init__ is not PAHO_INIT:
        return
    Properties.clear = _clear  # type: ignore[method-assign]
    built = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types, names, properties = built.types, built.names, built.properties

    def __init__(self: Any, packetType: int) -> None:
        # What paho's constructor sets, through its own __setattr__'s path for them.
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "properties", properties)

    Properties.__init__ = __init__  # type: ignore[method-assign]
