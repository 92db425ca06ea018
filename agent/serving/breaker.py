"""A circuit breaker: stop calling a stage that keeps failing, and probe it again later.

States and their rules:

- **closed** — every call goes through; ``failure_threshold`` failures in a row
  open the breaker (a success resets the count).
- **open** — no call goes through, until ``reset_after_s`` have passed since it
  opened; then the next call is let through as a probe (**half-open**).
- **half-open** — only the probe is in flight; other calls are refused. The
  probe's success closes the breaker, its failure opens it again for another
  ``reset_after_s``. A probe that never reports (its caller was cancelled) is
  replaced by a new one after ``reset_after_s``.

The clock is injected (monotonic seconds), so the rules are tested without waiting.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    """Where a circuit breaker is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Decides whether a call may go through, from the outcomes of the calls before it."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after_s < 0:
            raise ValueError("reset_after_s must not be negative")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0  # when the breaker opened, or when the probe went out

    @property
    def state(self) -> BreakerState:
        """The state as of now (an open breaker whose wait is over reports half-open)."""
        if self._state is BreakerState.OPEN and self._waited():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go through now; a ``True`` in half-open makes it the probe.

        A caller that gets ``True`` must report the outcome with
        :meth:`record_success` or :meth:`record_failure`.
        """
        if self._state is BreakerState.CLOSED:
            return True
        if not self._waited():
            return False
        self._state = BreakerState.HALF_OPEN
        self._since = self._clock()
        return True

    def record_success(self) -> None:
        """A call succeeded: close the breaker."""
        self._state = BreakerState.CLOSED
        self._failures = 0

    def record_failure(self) -> None:
        """A call failed: open the breaker at the threshold, or after a failed probe."""
        self._failures += 1
        if self._state is BreakerState.OPEN:
            return  # a call that started before the breaker opened: keep the wait as it is
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._since = self._clock()

    def _waited(self) -> bool:
        return self._clock() - self._since >= self.reset_after_s
