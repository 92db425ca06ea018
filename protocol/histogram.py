"""Base-2 exponential histograms (OpenTelemetry's ``ExponentialHistogram``) for latency.

A histogram at scale ``s`` has buckets whose bounds grow by ``base = 2**(2**-s)``:
bucket ``i`` holds the values in ``(base**i, base**(i + 1)]`` (upper bound
inclusive, as in OpenTelemetry), so a value's relative error within its bucket
is below ``base - 1`` — about 19 % at scale 2, 9 % at scale 3. Zero goes to
``zero_count``. ``counts[j]`` is bucket ``offset + j``.

The bucket count is bounded (``max_buckets``): when a value or a merge would
need more, the scale goes down until the range fits, and every bucket index is
halved per step (``i >> 1``), which is exact because bucket ``i`` at scale ``s``
lies inside bucket ``i >> 1`` at scale ``s - 1``. Indices are always computed at
:data:`MAX_SCALE` and shifted down, so recording the concatenation of two data
sets and merging their two histograms give identical buckets.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SCALE: Final = 20
MIN_SCALE: Final = -10
# OpenTelemetry's default is 160. A window uploads every minute, so it keeps 32:
# scale 3 (buckets 9 % wide) over a 16x latency range, scale 2 (19 %) over 256x.
DEFAULT_MAX_BUCKETS: Final = 32


class ExponentialHistogram(BaseModel):
    """Counts of non-negative values in base-2 exponential buckets, with sum, min and max."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: int = Field(default=MAX_SCALE, ge=MIN_SCALE, le=MAX_SCALE)
    zero_count: int = Field(default=0, ge=0)
    offset: int = Field(default=0, description="bucket index of counts[0]")
    counts: list[int] = Field(default_factory=list)
    sum: float = Field(default=0.0, ge=0.0)
    min: float | None = Field(default=None, ge=0.0)
    max: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _is_consistent(self) -> ExponentialHistogram:
        if any(c < 0 for c in self.counts):
            raise ValueError("bucket counts must be >= 0")
        if not all(math.isfinite(v) for v in (self.sum, self.min or 0.0, self.max or 0.0)):
            raise ValueError("sum, min and max must be finite")
        if (self.min is None) != (self.count == 0) or (self.max is None) != (self.count == 0):
            raise ValueError("min and max are given exactly when the histogram holds values")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is above max")
        return self

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return self.zero_count + sum(self.counts)

    @property
    def base(self) -> float:
        """The ratio between consecutive bucket bounds, ``2**(2**-scale)``."""
        return float(2.0 ** (2.0**-self.scale))

    def bucket_bounds(self, index: int) -> tuple[float, float]:
        """The ``(lower, upper]`` bounds of bucket ``index``."""
        return _bound(index, self.scale), _bound(index + 1, self.scale)


def _bound(index: int, scale: int) -> float:
    # 2**(index / 2**scale); bounds beyond the float range only occur at the edges.
    try:
        return float(2.0 ** math.ldexp(index, -scale))
    except OverflowError:
        return math.inf


def _indices_at_max_scale(values: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    # Bucket i holds (base**i, base**(i+1)]: i = ceil(log2(v) * 2**scale) - 1.
    # Multiplying by a power of two is exact, so shifting these indices down gives
    # exactly what computing at the lower scale from the same log2 would give.
    scaled = np.ldexp(np.log2(values), MAX_SCALE)
    index: npt.NDArray[np.int64] = np.ceil(scaled).astype(np.int64) - 1
    return index


def _shift_for(lo: int, hi: int, max_buckets: int) -> int:
    """The smallest number of halvings after which ``[lo, hi]`` spans ``max_buckets``."""
    shift = 0
    while (hi >> shift) - (lo >> shift) + 1 > max_buckets:
        shift += 1
    return shift


def _downscaled(h: ExponentialHistogram, shift: int) -> tuple[int, npt.NDArray[np.int64]]:
    """``(offset, counts)`` of ``h``'s buckets after ``shift`` halvings."""
    counts = np.asarray(h.counts, dtype=np.int64)
    if shift == 0 or counts.size == 0:
        return h.offset, counts
    index = (h.offset + np.arange(counts.size, dtype=np.int64)) >> shift
    start = int(index[0])
    return start, np.bincount(index - start, weights=counts).astype(np.int64)


def _trimmed(offset: int, counts: npt.NDArray[np.int64]) -> tuple[int, list[int]]:
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0, []
    first, last = int(nonzero[0]), int(nonzero[-1])
    return offset + first, [int(c) for c in counts[first : last + 1]]


def _combine(
    parts: list[tuple[int, int, npt.NDArray[np.int64]]], max_buckets: int
) -> tuple[int, int, list[int]]:
    """Add ``(scale, offset, counts)`` parts at one common scale within ``max_buckets``."""
    live = [(s, o, c) for s, o, c in parts if c.size and c.any()]
    if not live:
        return min(s for s, _, _ in parts), 0, []
    scale = min(s for s, _, _ in live)
    lo = min((o >> (s - scale)) for s, o, _ in live)
    hi = max(((o + c.size - 1) >> (s - scale)) for s, o, c in live)
    extra = _shift_for(lo, hi, max_buckets)
    scale -= extra
    if scale < MIN_SCALE:
        raise ValueError(f"the values span more than the histogram can hold at scale {MIN_SCALE}")
    start = lo >> extra
    total = np.zeros(((hi >> extra) - start) + 1, dtype=np.int64)
    for s, o, c in live:
        index = ((o + np.arange(c.size, dtype=np.int64)) >> (s - scale)) - start
        np.add.at(total, index, c)
    offset, counts = _trimmed(start, total)
    return scale, offset, counts


def record(
    h: ExponentialHistogram,
    values: npt.ArrayLike,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> ExponentialHistogram:
    """``h`` with ``values`` (non-negative, finite) added; raises ``ValueError`` on others."""
    if max_buckets < 2:
        raise ValueError("max_buckets must be at least 2")
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        return h
    if not np.all(np.isfinite(data)) or np.any(data < 0):
        raise ValueError("latencies must be finite and >= 0")
    positive = data[data > 0]
    zeros = int(data.size - positive.size)
    new_counts = np.zeros(0, dtype=np.int64)
    new_offset = 0
    if positive.size:
        index = _indices_at_max_scale(positive)
        lo, hi = int(index.min()), int(index.max())
        shift = _shift_for(lo, hi, max_buckets)
        index >>= shift
        new_offset = lo >> shift
        new_counts = np.bincount(index - new_offset).astype(np.int64)
        new_scale = MAX_SCALE - shift
    else:
        new_scale = h.scale
    scale, offset, counts = _combine(
        [
            (h.scale, h.offset, np.asarray(h.counts, dtype=np.int64)),
            (new_scale, new_offset, new_counts),
        ],
        max_buckets,
    )
    lows = [v for v in (h.min, float(data.min())) if v is not None]
    highs = [v for v in (h.max, float(data.max())) if v is not None]
    return ExponentialHistogram(
        scale=scale,
        zero_count=h.zero_count + zeros,
        offset=offset,
        counts=counts,
        sum=h.sum + float(data.sum()),
        min=min(lows),
        max=max(highs),
    )


def merge_histograms(
    a: ExponentialHistogram, b: ExponentialHistogram, max_buckets: int = DEFAULT_MAX_BUCKETS
) -> ExponentialHistogram:
    """The histogram of the union of the values behind ``a`` and ``b``."""
    scale, offset, counts = _combine(
        [
            (a.scale, a.offset, np.asarray(a.counts, dtype=np.int64)),
            (b.scale, b.offset, np.asarray(b.counts, dtype=np.int64)),
        ],
        max(max_buckets, 2),
    )
    lows = [v for v in (a.min, b.min) if v is not None]
    highs = [v for v in (a.max, b.max) if v is not None]
    return ExponentialHistogram(
        scale=scale,
        zero_count=a.zero_count + b.zero_count,
        offset=offset,
        counts=counts,
        sum=a.sum + b.sum,
        min=min(lows) if lows else None,
        max=max(highs) if highs else None,
    )


def downscale(h: ExponentialHistogram, scale: int) -> ExponentialHistogram:
    """``h`` at a coarser ``scale`` (at most its own)."""
    if scale > h.scale:
        raise ValueError(f"cannot refine scale {h.scale} to {scale}")
    if scale < MIN_SCALE:
        raise ValueError(f"scale must be >= {MIN_SCALE}")
    offset, counts = _trimmed(*_downscaled(h, h.scale - scale))
    return h.model_copy(update={"scale": scale, "offset": offset, "counts": counts})


def quantile(h: ExponentialHistogram, q: float) -> float | None:
    """An estimate of the ``q``-quantile, ``None`` for an empty histogram.

    Within a bucket the value is interpolated on the log scale, and the answer
    is clamped to ``[min, max]``; its relative error is below ``h.base - 1``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    total = h.count
    if total == 0 or h.min is None or h.max is None:
        return None
    if q == 0.0:
        return h.min
    if q == 1.0:
        return h.max
    rank = q * total
    if rank <= h.zero_count:
        return 0.0
    seen = float(h.zero_count)
    for j, c in enumerate(h.counts):
        if c and seen + c >= rank:
            fraction = (rank - seen) / c
            value = _bound(h.offset + j, h.scale) * float(h.base**fraction)
            return float(min(max(value, h.min), h.max))
        seen += c
    return h.max
