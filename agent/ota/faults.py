"""Fault injection for crash tests: hold the agent at a named step until it is killed.

A test sets ``hold_at`` in the agent's configuration, waits for the agent to
report that it is holding, then kills it with SIGKILL — a power cut at exactly
that step. Nothing holds unless configured.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection

STEPS = ("download", "verified", "staging", "staged", "trial", "shadow-staging")


class Faults:
    """The steps this process should hold at."""

    def __init__(self, hold_at: Collection[str] = ()) -> None:
        unknown = set(hold_at) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown fault steps {sorted(unknown)}; known: {', '.join(STEPS)}")
        self.hold_at = frozenset(hold_at)

    def hold(self, step: str) -> None:
        """Block forever at ``step`` if configured (the test kills the process)."""
        if step in self.hold_at:
            print(f"edgefleet-fault: holding at {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
