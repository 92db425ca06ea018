"""Who may send a request to the cloud model now: per-device quotas and the endpoint's capacity.

Two token buckets stand in front of every inference request, in this order:

1. the device's own bucket (``quota_rate`` tokens a second up to ``quota_burst``,
   from the device's current row in ``hybrid_plans``, else the endpoint's
   default quota): empty means ``429`` with reason ``quota``;
2. the endpoint's capacity bucket (``capacity`` requests a second, burst a
   tenth of a second's worth, :data:`CAPACITY_BURST_S`): empty means ``429``
   with reason ``capacity``. In any one second the endpoint so admits at most
   ``1.1 * capacity`` requests, within the planner's default headroom, even
   when every device spends a full bucket at once.

A request takes a token from both or from neither, so a request refused for
capacity does not cost its device quota. Both are checked before the request
is queued, so a device beyond its quota is refused at once and never holds a
place in the queue another device could use. A full queue is also ``capacity``.

Everything here is pure arithmetic over an injected clock (seconds, monotonic):
no I/O, no event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

RefusalReason = Literal["quota", "capacity"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = ("quota", "capacity")


@dataclass(frozen=True)
class Quota:
    """A token bucket's shape: ``rate`` tokens a second, at most ``burst`` held."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"a quota's rate must be a finite number >= 0, not {self.rate}")
        if not (self.burst >= 0 and math.isfinite(self.burst)):
            raise ValueError(f"a quota's burst must be a finite number >= 0, not {self.burst}")


class TokenBucket:
    """Tokens that refill at ``quota.rate`` a second up to ``quota.burst``; starts full.

    ``now`` is a monotonic time in seconds from the caller's clock; time that
    goes backwards adds nothing.
    """

    def __init__(self, quota: Quota, now: float) -> None:
        self.quota = quota
        self.tokens = quota.burst
        self.updated = now

    def refill(self, now: float) -> None:
        """Add what the elapsed time earned, up to the burst."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.quota.burst, self.tokens + elapsed * self.quota.rate)
        self.updated = max(self.updated, now)

    def wait(self, now: float) -> float:
        """Seconds until one token is held (0 when one is now; ``inf`` if none ever will be)."""
        self.refill(now)
        missing = 1.0 - self.tokens
        if missing <= 1e-9:
            return 0.0
        if self.quota.rate <= 0 or self.quota.burst < 1:
            return math.inf
        return missing / self.quota.rate

    def take(self) -> None:
        """Spend one token (after :meth:`wait` said 0)."""
        self.tokens -= 1.0

    def reshape(self, quota: Quota, now: float) -> None:
        """Follow a new quota, keeping the tokens held (no more than the new burst)."""
        self.refill(now)
        self.quota = quota
        self.tokens = min(self.tokens, quota.burst)


@dataclass(frozen=True)
class Refusal:
    """A request refused before queueing: why, and when it is worth trying again."""

    reason: RefusalReason
    retry_after_s: float
    message: str

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, at least 1 (RFC 9110 allows no fractions)."""
        return str(max(1, math.ceil(self.retry_after_s)))


# What a client is told to wait when no token will ever come (a quota of 0):
# long enough not to hammer, short enough to notice a new plan.
NEVER_RETRY_S: Final = 60.0
# The capacity bucket holds this many seconds of capacity.
CAPACITY_BURST_S: Final = 0.1


def capacity_quota(capacity: float) -> Quota:
    """The endpoint's bucket: ``capacity`` a second, a burst of :data:`CAPACITY_BURST_S` of it."""
    return Quota(rate=capacity, burst=max(1.0, capacity * CAPACITY_BURST_S))


class QuotaBook:
    """Every device's token bucket, and the endpoint's capacity bucket.

    ``quotas`` maps a device with a current plan to its quota; any other
    device gets ``default``. :meth:`update` follows a new reading of the
    database without resetting what devices have spent.
    """

    def __init__(
        self,
        *,
        default: Quota,
        capacity: float,
        now: float,
        quotas: Mapping[str, Quota] | None = None,
    ) -> None:
        self.default = default
        self.quotas: dict[str, Quota] = dict(quotas or {})
        self.capacity = capacity
        self._capacity = TokenBucket(capacity_quota(capacity), now)
        self._devices: dict[str, TokenBucket] = {}

    def quota_of(self, device_id: str) -> Quota:
        """The quota ``device_id`` is held to now."""
        return self.quotas.get(device_id, self.default)

    def update(
        self, quotas: Mapping[str, Quota], default: Quota, capacity: float, now: float
    ) -> None:
        """Hold devices to ``quotas`` (others to ``default``) and the endpoint to ``capacity``."""
        self.quotas = dict(quotas)
        self.default = default
        if capacity != self.capacity:
            self.capacity = capacity
            self._capacity.reshape(capacity_quota(capacity), now)
        for device_id, bucket in self._devices.items():
            quota = self.quota_of(device_id)
            if quota != bucket.quota:
                bucket.reshape(quota, now)

    def admit(self, device_id: str, now: float) -> Refusal | None:
        """Take a token for ``device_id``'s request from both buckets, or say why not."""
        bucket = self._devices.get(device_id)
        if bucket is None:
            bucket = self._devices[device_id] = TokenBucket(self.quota_of(device_id), now)
        wait = bucket.wait(now)
        if wait > 0:
            quota = bucket.quota
            return Refusal(
                "quota",
                wait if math.isfinite(wait) else NEVER_RETRY_S,
                f"device {device_id} is over its cloud quota of {quota.rate:g} requests a "
                f"second (burst {quota.burst:g})",
            )
        wait = self._capacity.wait(now)
        if wait > 0:
            return Refusal(
                "capacity",
                wait if math.isfinite(wait) else NEVER_RETRY_S,
                f"the cloud endpoint is at its capacity of {self.capacity:g} requests a second",
            )
        bucket.take()
        self._capacity.take()
        return None

    def refund(self, device_id: str) -> None:
        """Give back the tokens of an admitted request that was then not run (queue full)."""
        bucket = self._devices.get(device_id)
        if bucket is not None:
            bucket.tokens = min(bucket.quota.burst, bucket.tokens + 1.0)
        self._capacity.tokens = min(self._capacity.quota.burst, self._capacity.tokens + 1.0)

    def forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled to their burst: they would start full anyway."""
        for device_id in [d for d, b in self._devices.items() if _full(b, now)]:
            del self._devices[device_id]


def _full(bucket: TokenBucket, now: float) -> bool:
    bucket.refill(now)
    return bucket.tokens >= bucket.quota.burst


def queue_full_refusal(model: str, depth: int) -> Refusal:
    """The refusal of a request that found ``model``'s queue holding ``depth`` requests."""
    return Refusal(
        "capacity",
        1.0,
        f"the queue of model {model!r} is full ({depth} requests waiting); try again later",
    )
