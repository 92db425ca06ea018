"""Telemetry: window summaries of the requests served, and the outbox that keeps them till acked."""

from agent.telemetry.fold import WindowRecordError
from agent.telemetry.outbox import Outbox, OutboxError, OutboxStats
from agent.telemetry.window import WindowPolicy, WindowRecorder

__all__ = [
    "Outbox",
    "OutboxError",
    "OutboxStats",
    "WindowPolicy",
    "WindowRecordError",
    "WindowRecorder",
]
