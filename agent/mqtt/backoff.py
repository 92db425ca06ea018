"""How long to wait before the next connection attempt."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Jittered exponential backoff: attempt *n* waits a random time in ``[d/2, d]``.

    ``d`` doubles from ``initial_s`` up to ``max_s``. The jitter keeps a fleet
    whose broker restarted from reconnecting in lockstep.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)
        self._random = random_fraction
        self._attempts = 0

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one failed attempt."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(self._attempts, 32))
        self._attempts += 1
        return ceiling * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        """A connection succeeded: the next failure starts from ``initial_s`` again."""
        self._attempts = 0
