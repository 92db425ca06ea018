"""Telemetry: window summaries of the requests served, and the outbox that keeps them till acked.

The exports load on first use: :mod:`agent.metrics` reads the outbox's
errors, and a serving process that imports it must not build the window
summaries' models (:mod:`agent.telemetry.fold`, :mod:`protocol.window`)
before its API listens.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "Outbox": "agent.telemetry.outbox",
    "OutboxError": "agent.telemetry.outbox",
    "OutboxStats": "agent.telemetry.outbox",
    "WindowPolicy": "agent.telemetry.window",
    "WindowRecordError": "agent.telemetry.fold",
    "WindowRecorder": "agent.telemetry.window",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(home), name)
