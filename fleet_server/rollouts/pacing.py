"""How many installs a rollout may start by now: an exponential ramp, as AWS IoT Jobs paces jobs.

The rate starts at ``rate`` installs a minute and is multiplied by ``factor``
each minute after the start, up to :data:`MAX_RATE_PER_MINUTE`; each minute's
quota may start at the beginning of that minute, so the first installs go at
once. AWS IoT Jobs can also raise the rate after each N successes; this ramp
follows the clock instead, so the allowance is a function of time alone and a
restarted controller computes the same one. A release that fails is stopped by
the gates, not by the ramp.
"""

from __future__ import annotations

import math
from datetime import datetime

from protocol.api.rollouts import MAX_RATE_PER_MINUTE

# Quotas are sums of floats; a total a hair above an integer must not round up.
_SLACK = 1e-9


def installs_allowed_by(minutes: float, rate: float, factor: float | None = None) -> int:
    """Installs that may have started ``minutes`` after the start (0 before it)."""
    if not rate > 0 or (factor is not None and not factor >= 1):
        raise ValueError(f"a rate must be above 0 and a factor at least 1, not {rate}, {factor}")
    if minutes < 0:
        return 0
    rate = min(rate, MAX_RATE_PER_MINUTE)
    started = math.floor(minutes) + 1  # the minutes begun, the current one included
    if factor is None or factor == 1 or rate >= MAX_RATE_PER_MINUTE:
        return math.ceil(rate * started - _SLACK)
    ramping = _minutes_below_ceiling(rate, factor)
    if started <= ramping:
        total = rate * (factor**started - 1) / (factor - 1)
    else:
        total = rate * (factor**ramping - 1) / (factor - 1)
        total += MAX_RATE_PER_MINUTE * (started - ramping)
    return math.ceil(total - _SLACK)


def _minutes_below_ceiling(rate: float, factor: float) -> int:
    """How many minutes the ramp runs below the ceiling: the first i with rate × factor^i ≥ it."""
    i = max(0, math.ceil(math.log(MAX_RATE_PER_MINUTE / rate) / math.log(factor)))
    while i > 0 and rate * factor ** (i - 1) >= MAX_RATE_PER_MINUTE:
        i -= 1
    while rate * factor**i < MAX_RATE_PER_MINUTE:
        i += 1
    return i


def allowed_installs(
    now: datetime, started_at: datetime, rate: float, factor: float | None, done: int
) -> int:
    """How many more installs may start at ``now``, ``done`` having started since ``started_at``.

    Never negative; never less at a later ``now`` for the same ``done``.
    """
    minutes = (now - started_at).total_seconds() / 60
    return max(0, installs_allowed_by(minutes, rate, factor) - done)
