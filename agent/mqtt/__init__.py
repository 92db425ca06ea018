"""The agent's MQTT link: presence, reported state, events and heartbeats up; desired state down.

The exports load on first use: :mod:`agent.mqtt.settings` checks the link's
files without importing the MQTT client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.mqtt.backoff import Backoff
    from agent.mqtt.link import MqttLink

__all__ = ["Backoff", "MqttLink"]


def __getattr__(name: str) -> Any:
    if name == "Backoff":
        from agent.mqtt.backoff import Backoff

        return Backoff
    if name == "MqttLink":
        from agent.mqtt.link import MqttLink

        return MqttLink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
