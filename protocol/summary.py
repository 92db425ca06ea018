"""Additive feature summaries: the statistics devices upload instead of raw inputs.

Every summary here is mergeable — two summaries of disjoint data merge into the
summary of their union — so a window, a device, a cohort or the whole fleet is
a sum. Moments merge with Chan et al.'s parallel formula; histograms add.

Bins are the baseline's: about 20 bins at the training set's quantiles, open at
both ends. ``edges`` holds the inner edges ``e_0 < ... < e_{k-1}``; bin 0 is
``(-inf, e_0)``, bin ``i`` is ``[e_{i-1}, e_i)`` and bin ``k`` is ``[e_{k-1}, +inf)``,
so there are ``len(edges) + 1`` counts. NaN goes to ``nan``, never to a bin.

A summary counted against a baseline also says how many finite values lay below
the baseline's ``min`` and above its ``max`` (``below_baseline``,
``above_baseline``): the open end bins hold them among the baseline's own
extremes, so only these counts tell how many are new. ``None`` means not
counted (a baseline's own summary, a window from a device that did not count).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

# numpy is imported by the functions that compute: the manifest reads this module's
# models, and `edge-agent verify` reads the manifest without loading numpy.
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

DEFAULT_BIN_COUNT = 20
SCORE_BIN_COUNT = 20


def _is_none(value: object) -> bool:
    return value is None


class FeatureSummary(BaseModel):
    """Moments, range and binned counts of one feature over some rows."""

    model_config = ConfigDict(frozen=True)

    n: int = Field(ge=0, description="finite values seen")
    nan: int = Field(ge=0, description="NaN or infinite values seen")
    out_of_range: int = Field(ge=0, description="finite values outside the valid range")
    mean: float = 0.0
    m2: float = Field(default=0.0, ge=0.0, description="sum of squared deviations")
    min: float | None = None
    max: float | None = None
    counts: list[int] = Field(description="counts per baseline bin, len(edges) + 1")
    # Left out when not counted, so manifests (whose baselines never count) keep their bytes.
    below_baseline: int | None = Field(
        default=None,
        ge=0,
        exclude_if=_is_none,
        description="finite values below the baseline's min; None: not counted",
    )
    above_baseline: int | None = Field(
        default=None,
        ge=0,
        exclude_if=_is_none,
        description="finite values above the baseline's max; None: not counted",
    )

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator), 0 below two values."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


def quantile_edges(values: npt.ArrayLike, bins: int = DEFAULT_BIN_COUNT) -> list[float]:
    """Inner bin edges at the quantiles of ``values``, duplicates removed.

    A feature with few distinct values gets fewer bins rather than empty ones.
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return []
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.quantile(data, qs))
    return [float(e) for e in edges]


def bin_counts(values: npt.NDArray[np.float64], edges: Sequence[float]) -> npt.NDArray[np.int64]:
    """Counts of the finite ``values`` per bin of ``edges`` (see module docstring)."""
    import numpy as np

    finite = values[np.isfinite(values)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), finite, side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def summarize(
    values: npt.ArrayLike,
    edges: Sequence[Sequence[float]],
    valid_ranges: Sequence[tuple[float | None, float | None]] | None = None,
    baseline_ranges: Sequence[tuple[float | None, float | None]] | None = None,
) -> list[FeatureSummary]:
    """Summarise a ``[rows, features]`` array, one summary per feature column.

    With ``baseline_ranges`` (each feature's baseline ``(min, max)``) the
    summaries count the values below and above them; a bound of ``None``
    counts nothing on its side.
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"expected a [rows, features] array, got shape {data.shape}")
    if len(edges) != data.shape[1]:
        raise ValueError(f"{len(edges)} edge lists for {data.shape[1]} features")
    ranges = valid_ranges or [(None, None)] * data.shape[1]
    out = []
    for j in range(data.shape[1]):
        column = data[:, j]
        finite_mask = np.isfinite(column)
        finite = column[finite_mask]
        lo, hi = ranges[j]
        outside = np.zeros(finite.shape, dtype=bool)
        if lo is not None:
            outside |= finite < lo
        if hi is not None:
            outside |= finite > hi
        n = int(finite.size)
        mean = float(finite.mean()) if n else 0.0
        below = above = None
        if baseline_ranges is not None:
            b_lo, b_hi = baseline_ranges[j]
            below = int((finite < b_lo).sum()) if b_lo is not None else 0
            above = int((finite > b_hi).sum()) if b_hi is not None else 0
        out.append(
            FeatureSummary(
                n=n,
                nan=int(column.size - n),
                out_of_range=int(outside.sum()),
                mean=mean,
                m2=float(((finite - mean) ** 2).sum()) if n else 0.0,
                min=float(finite.min()) if n else None,
                max=float(finite.max()) if n else None,
                counts=bin_counts(column, edges[j]).tolist(),
                below_baseline=below,
                above_baseline=above,
            )
        )
    return out


def _add_counted(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def merge(a: FeatureSummary, b: FeatureSummary) -> FeatureSummary:
    """The summary of the union of the rows behind ``a`` and ``b`` (Chan's formula).

    A count beyond the baseline that one side did not count is not counted in
    the union either (see :func:`protocol.drift.windows.count_beyond_baseline`, which
    fills in what the range alone proves before merging).
    """
    if len(a.counts) != len(b.counts):
        raise ValueError("cannot merge summaries over different bins")
    n = a.n + b.n
    if n == 0:
        mean, m2 = 0.0, 0.0
    else:
        delta = b.mean - a.mean
        mean = a.mean + delta * b.n / n
        m2 = a.m2 + b.m2 + delta * delta * a.n * b.n / n
    mins = [v for v in (a.min, b.min) if v is not None]
    maxs = [v for v in (a.max, b.max) if v is not None]
    return FeatureSummary(
        n=n,
        nan=a.nan + b.nan,
        out_of_range=a.out_of_range + b.out_of_range,
        mean=mean,
        m2=max(m2, 0.0),
        min=min(mins) if mins else None,
        max=max(maxs) if maxs else None,
        counts=[x + y for x, y in zip(a.counts, b.counts, strict=True)],
        below_baseline=_add_counted(a.below_baseline, b.below_baseline),
        above_baseline=_add_counted(a.above_baseline, b.above_baseline),
    )


class ScoreHistogram(BaseModel):
    """Histogram of the top-class score per predicted class (CBPE's input).

    ``counts[c][k]`` counts rows predicted as class ``c`` whose top score fell
    in the ``k``-th of ``SCORE_BIN_COUNT`` equal bins over ``[0, 1]``.
    """

    model_config = ConfigDict(frozen=True)

    classes: list[str]
    counts: list[list[int]]


def score_histogram(scores: npt.ArrayLike, classes: Sequence[str]) -> ScoreHistogram:
    """Build the top-score histogram of ``[rows, classes]`` probabilities."""
    import numpy as np

    probs = np.asarray(scores, dtype=np.float64)
    rows = probs[np.all(np.isfinite(probs), axis=1)]
    predicted = rows.argmax(axis=1)
    top = rows.max(axis=1)
    k = np.clip((top * SCORE_BIN_COUNT).astype(np.int64), 0, SCORE_BIN_COUNT - 1)
    flat = np.bincount(predicted * SCORE_BIN_COUNT + k, minlength=len(classes) * SCORE_BIN_COUNT)
    return ScoreHistogram(
        classes=list(classes),
        counts=flat.reshape(len(classes), SCORE_BIN_COUNT).tolist(),
    )


def edges_id(edges: Sequence[Sequence[float]]) -> str:
    """A stable identifier of a set of bin edges: ``sha256:`` of their canonical JSON.

    Devices and the server compare this id to know they bin the same way.
    """
    canonical = json.dumps([[float(e) for e in row] for row in edges], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
