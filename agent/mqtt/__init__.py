"""The agent's MQTT link: presence, reported state, events and heartbeats up; desired state down."""

from agent.mqtt.backoff import Backoff
from agent.mqtt.link import MqttLink

__all__ = ["Backoff", "MqttLink"]
