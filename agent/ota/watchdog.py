"""The watchdog over a newly switched-in model's first requests.

If the new model's outputs are NaN, or it errors, too often in its first
requests, the agent rolls back on its own. Pure logic over observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Watchdog:
    """Judges the first ``window`` requests the new model handled.

    Trips when failures (NaN outputs, errors, timeouts) reach ``max_failures``
    — a healthy model gives none, so a few in a long window are evidence enough
    even when the bad inputs are rare — or when, after ``min_requests``, the
    failure rate is above ``max_failure_rate``.
    """

    window: int = 200
    max_failures: int = 3
    max_failure_rate: float = 0.2
    min_requests: int = 10
    seen: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.seen >= self.window

    def observe(self, ok: bool, reason: str | None = None) -> str | None:
        """Count one request; returns why to roll back, or ``None``."""
        if self.done:
            return None
        self.seen += 1
        if not ok:
            self.failed += 1
            key = reason or "error"
            self.reasons[key] = self.reasons.get(key, 0) + 1
        rate = self.failed / self.seen
        if self.failed >= self.max_failures or (
            self.seen >= self.min_requests and rate > self.max_failure_rate
        ):
            detail = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            return f"{self.failed} of the new model's first {self.seen} requests failed ({detail})"
        return None
