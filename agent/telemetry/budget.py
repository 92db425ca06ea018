"""The sampling budget: the share of requests the recorder may summarise.

What summarising may cost is bounded by the policy's ``max_overhead``, a share
of the inference time (the ``latency_s`` the caller reports). The recorder
measures itself with its ``timer`` (once, at start, the fast path that only
counts a request; then every summarised request, buffer folds included), and
:class:`SamplingBudget` turns that into the probability of summarising a
request: 1 while summarising is cheap next to the model (a model of
milliseconds: the window is exact), a few per cent for a model of
microseconds. Which requests are summarised is drawn at random
(:func:`geometric_gap`), independently of their values.
"""

from __future__ import annotations

import math
import random
from typing import Final

# The least share of requests summarised when even counting them exceeds the
# budget: a window of 1,000 requests still holds about one.
MIN_SAMPLE_RATE: Final = 1e-3
# Weight of the newest measurement in the moving averages of the costs.
COST_WEIGHT: Final = 0.25
# The latencies of the last this many requests give the typical inference time.
LATENCY_SAMPLE: Final = 64


class SamplingBudget:
    """The share of requests to summarise so that the recorder adds at most ``limit`` to inference.

    Every request costs the recorder ``fixed`` seconds (counting it, keeping its
    latency); a summarised one costs ``summary`` seconds more (checks, the copy
    into the buffer, its share of the folds). With inference taking
    ``inference`` seconds a request, summarising a share ``p`` of the requests
    adds ``fixed + p * summary``: the rate is the largest ``p`` within
    ``limit * inference``, at most 1 and at least :data:`MIN_SAMPLE_RATE`.
    ``summary`` is a moving average (weight :data:`COST_WEIGHT`) of the time
    per summarised request between updates; ``inference`` one of the median
    latency of the last :data:`LATENCY_SAMPLE` requests at each update (the
    typical inference, not the one preempted now and then).
    """

    def __init__(self, limit: float, fixed: float) -> None:
        self.limit = limit
        self.fixed = fixed
        self.latency = 0.0  # seconds a request's share of recording the latency histogram costs
        self.summary: float | None = None
        self.inference: float | None = None
        self._spent = 0.0
        self._summarised = 0

    def summarised(self, spent: float) -> None:
        """Account a summarised request that took ``spent`` seconds to summarise."""
        self._spent += spent
        self._summarised += 1

    def folded(self, spent: float) -> None:
        """Account a fold outside ``record`` (a window closing)."""
        self._spent += spent

    def rate(self, inference: float | None) -> float:
        """Update the estimates with what was accounted since the last call; the rate they allow.

        ``inference`` is the typical inference time now (``None``: no new latency).
        """
        if inference is not None:
            self.inference = _moving_average(self.inference, inference)
        if n := self._summarised:
            self.summary = _moving_average(self.summary, self._spent / n)
            self._spent = 0.0
            self._summarised = 0
        if self.summary is None or self.inference is None:
            return 1.0
        room = self.limit * self.inference - self.fixed - self.latency
        if self.summary <= room:
            return 1.0
        return max(room / self.summary, MIN_SAMPLE_RATE)


def _moving_average(average: float | None, value: float) -> float:
    return value if average is None else average + COST_WEIGHT * (value - average)


def geometric_gap(rate: float, rng: random.Random) -> int:
    """Requests to leave out before the next summarised one.

    Geometric, so that every request is summarised with probability ``rate``
    independently of the others and of its values, without a random draw per
    request.
    """
    if rate >= 1.0:
        return 0
    return int(math.log(1.0 - rng.random()) / math.log1p(-rate))
