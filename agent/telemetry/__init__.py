"""Telemetry: window summaries of every request, and the outbox that keeps them until acked."""

from agent.telemetry.outbox import Outbox, OutboxError, OutboxStats
from agent.telemetry.window import WindowPolicy, WindowRecorder, WindowRecordError

__all__ = [
    "Outbox",
    "OutboxError",
    "OutboxStats",
    "WindowPolicy",
    "WindowRecordError",
    "WindowRecorder",
]
