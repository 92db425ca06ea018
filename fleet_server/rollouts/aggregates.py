"""Per-device window aggregates by hour: what a rollout's gates read, kept as windows arrive.

A rollout tick needs, per device and model version over a time range: requests,
fallbacks (requests the active model did not answer: every stage of the
window's ``served`` counts but ``active``), errors, the latency histogram (for
p95), the top-score histogram (for CBPE accuracy and the predicted class mix)
and labelled counts. Decoding every window at every tick would not scale, so
each window stored for the first time is folded (:func:`fold`) into the row of
its device, model version and UTC hour (the hour its ``end`` falls in), and a
tick sums a few rows per device (:func:`sum_rows`).

The histograms are kept in fixed layouts so rows add without a merge step:

- latency at scale :data:`LATENCY_SCALE` of the base-2 exponential histogram
  (:mod:`protocol.histogram`: buckets about 19 % wide) over the bucket indices
  ``[LATENCY_FIRST, LATENCY_FIRST + LATENCY_BUCKETS)`` (about 0.06 ms to 65 s);
  values outside fall in the end buckets, and ``latency_min``/``latency_max``
  keep the true extremes. A window at a finer scale is downscaled exactly; one
  at a coarser scale (only a window spanning a very wide range) puts each
  bucket's count into its geometric middle sub-bucket.
- scores as ``score_classes`` x :data:`~protocol.summary.SCORE_BIN_COUNT` cells.

Both are stored sparse, as packed little-endian ``(uint16 index, int64 count)``
pairs (:func:`encode_counts`): at most one pair per cell, and two rows' arrays
concatenated are the arrays of their sum, which lets a database concatenate
them in its aggregation. Everything here is pure: no database, no clock.

A window's ``shadow`` section (a rollout's shadow stage: the new release run
beside the active model on a share of requests) is folded
(:func:`fold_shadow`) into the ``shadow_*`` columns of the row of the
*shadow's* version, so the shadow's numbers belong to it and never mix with
the active model's; :func:`sum_shadow_rows` sums them per device.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from protocol.histogram import ExponentialHistogram
from protocol.summary import SCORE_BIN_COUNT, ScoreHistogram
from protocol.window import WindowSummary

LATENCY_SCALE: Final = 2
LATENCY_FIRST: Final = -16  # 2**(-16/4) ms = 62.5 µs
LATENCY_BUCKETS: Final = 80  # up to 2**(64/4) ms = 65.5 s
MAX_SCORE_CLASSES: Final = 1024  # keeps every score cell index within uint16

PAIR: Final = np.dtype([("index", "<u2"), ("count", "<i8")])
_PAIRS: Final = struct.Struct("<Hq")  # PAIR, for struct

Key = tuple[str, str, str, datetime]  # device_id, model_name, model_version, hour


def hour_of(seconds: float) -> datetime:
    """The UTC hour (truncated) that a time in seconds since the epoch falls in."""
    return datetime.fromtimestamp(math.floor(seconds / 3600.0) * 3600.0, UTC)


@dataclass(frozen=True)
class AggregateDelta:
    """What one window, or several of one device, version and hour, add to that hour's row.

    ``latency`` and ``scores`` map a cell index of the fixed layouts to its count.
    """

    device_id: str
    model_name: str
    model_version: str
    hour: datetime
    windows: int = 0
    requests: int = 0
    fallbacks: int = 0
    errors: int = 0
    unsummarised_requests: int = 0
    latency_zero: int = 0
    latency_sum: float = 0.0
    latency_min: float | None = None
    latency_max: float | None = None
    latency: Mapping[int, int] = field(default_factory=dict)
    score_classes: tuple[str, ...] | None = None
    scores: Mapping[int, int] = field(default_factory=dict)
    labelled_rows: int = 0
    labelled_correct: int = 0
    shadow_requests: int = 0
    shadow_agreements: int = 0
    shadow_errors: int = 0
    shadow_latency: Mapping[int, int] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return (self.device_id, self.model_name, self.model_version, self.hour)


def fold(window: WindowSummary) -> AggregateDelta:
    """What ``window`` adds to the hourly row of its device, model version and end hour."""
    active = window.served.get("active", 0)
    fallbacks = sum(window.served.values()) - active
    classes: tuple[str, ...] | None = None
    scores: dict[int, int] = {}
    if window.scores is not None and len(window.scores.classes) <= MAX_SCORE_CLASSES:
        classes = tuple(window.scores.classes)
        for c, row in enumerate(window.scores.counts):
            for k, count in enumerate(row[:SCORE_BIN_COUNT]):
                if count:
                    scores[c * SCORE_BIN_COUNT + k] = count
    lat = window.latency_ms
    return AggregateDelta(
        device_id=window.device_id,
        model_name=window.model_name,
        model_version=window.model_version,
        hour=hour_of(window.end),
        windows=1,
        requests=window.requests,
        fallbacks=min(max(fallbacks, 0), window.requests),
        errors=window.errors,
        unsummarised_requests=window.unsummarised_requests,
        latency_zero=lat.zero_count,
        latency_sum=lat.sum,
        latency_min=lat.min,
        latency_max=lat.max,
        latency=latency_cells(lat),
        score_classes=classes,
        scores=scores,
    )


def fold_shadow(window: WindowSummary) -> AggregateDelta | None:
    """What ``window``'s shadow section adds to the hourly row of the shadow's version
    (``None``: the window has no shadow section)."""
    shadow = window.shadow
    if shadow is None:
        return None
    return AggregateDelta(
        device_id=window.device_id,
        model_name=window.model_name,
        model_version=shadow.model_version,
        hour=hour_of(window.end),
        shadow_requests=shadow.requests,
        shadow_agreements=shadow.agreements,
        shadow_errors=shadow.errors,
        shadow_latency=latency_cells(shadow.latency_ms),
    )


def latency_cells(h: ExponentialHistogram) -> dict[int, int]:
    """The non-empty buckets of ``h`` in the fixed latency layout (cell index -> count)."""
    # Downscaling halves a bucket index per step (protocol.histogram.downscale), so
    # each bucket's cell is its index shifted; equal cells add up.
    cells: dict[int, int] = {}
    if h.scale >= LATENCY_SCALE:
        shift = h.scale - LATENCY_SCALE
        half = 0
    else:
        # Each coarse bucket spans 2**-shift fine ones: its count goes to the middle one.
        shift = h.scale - LATENCY_SCALE
        half = (1 << -shift) // 2
    last = LATENCY_BUCKETS - 1
    for index, count in enumerate(h.counts, h.offset):
        if count:
            fine = index >> shift if shift >= 0 else (index << -shift) + half
            cell = fine - LATENCY_FIRST
            cell = 0 if cell < 0 else last if cell > last else cell
            cells[cell] = cells.get(cell, 0) + count
    return cells


def _add_cells(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _greatest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def combine(a: AggregateDelta, b: AggregateDelta) -> AggregateDelta:
    """The sum of two deltas of the same row.

    Scores over other classes than ``a``'s (a version whose classes changed, which a
    release does not do) are left out rather than mixed into the wrong cells.
    """
    if a.key != b.key:
        raise ValueError(f"deltas of different rows: {a.key} and {b.key}")
    classes, scores = a.score_classes, dict(a.scores)
    if classes is None:
        classes, scores = b.score_classes, dict(b.scores)
    elif b.score_classes == classes:
        scores = _add_cells(scores, b.scores)
    return AggregateDelta(
        device_id=a.device_id,
        model_name=a.model_name,
        model_version=a.model_version,
        hour=a.hour,
        windows=a.windows + b.windows,
        requests=a.requests + b.requests,
        fallbacks=a.fallbacks + b.fallbacks,
        errors=a.errors + b.errors,
        unsummarised_requests=a.unsummarised_requests + b.unsummarised_requests,
        latency_zero=a.latency_zero + b.latency_zero,
        latency_sum=a.latency_sum + b.latency_sum,
        latency_min=_least(a.latency_min, b.latency_min),
        latency_max=_greatest(a.latency_max, b.latency_max),
        latency=_add_cells(a.latency, b.latency),
        score_classes=classes,
        scores=scores,
        labelled_rows=a.labelled_rows + b.labelled_rows,
        labelled_correct=a.labelled_correct + b.labelled_correct,
        shadow_requests=a.shadow_requests + b.shadow_requests,
        shadow_agreements=a.shadow_agreements + b.shadow_agreements,
        shadow_errors=a.shadow_errors + b.shadow_errors,
        shadow_latency=_add_cells(a.shadow_latency, b.shadow_latency),
    )


def combine_all(deltas: Iterable[AggregateDelta]) -> dict[Key, AggregateDelta]:
    """Deltas summed per row key."""
    out: dict[Key, AggregateDelta] = {}
    for d in deltas:
        previous = out.get(d.key)
        out[d.key] = d if previous is None else combine(previous, d)
    return out


def encode_counts(cells: Mapping[int, int]) -> bytes:
    """Cells as packed ``(uint16 index, int64 count)`` pairs, in index order."""
    if not cells:
        return b""
    pairs = sorted(cells.items())
    try:
        # struct packs the few pairs of a row faster than numpy makes an array of them.
        return b"".join([_PAIRS.pack(index, count) for index, count in pairs])
    except struct.error:
        # A cell or count beyond the layout: numpy refuses it with its own error, as before.
        return np.array(pairs, dtype=PAIR).tobytes()


def add_counts(data: bytes | None, cells: Mapping[int, int]) -> bytes:
    """Stored :func:`encode_counts` bytes (``None``: none) with ``cells`` added, encoded."""
    summed = decode_counts(data or b"")
    for index, count in cells.items():
        summed[index] = summed.get(index, 0) + count
    return encode_counts(summed)


def decode_counts(data: bytes) -> dict[int, int]:
    """The cells of :func:`encode_counts` bytes (of one row, or several concatenated: summed)."""
    cells: dict[int, int] = {}
    # struct reads the few pairs of a row faster than numpy; numpy refuses a torn pair.
    pairs = _PAIRS.iter_unpack(data) if len(data) % _PAIRS.size == 0 else np.frombuffer(data, PAIR)
    for index, count in pairs:
        cells[int(index)] = cells.get(int(index), 0) + int(count)
    return cells


def encode_classes(classes: Sequence[str] | None) -> str | None:
    if classes is None:
        return None
    if isinstance(classes, tuple):
        # A fleet has a few class lists: each is encoded once, not once per window.
        return _encoded_classes(classes)
    return _CLASSES_JSON(list(classes))


# What json.dumps(..., separators=(",", ":")) writes, without a new encoder per call.
_CLASSES_JSON = json.JSONEncoder(separators=(",", ":")).encode


@functools.lru_cache(maxsize=256)
def _encoded_classes(classes: tuple[str, ...]) -> str:
    return _CLASSES_JSON(list(classes))


def decode_classes(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


class HourRow(NamedTuple):
    """One stored row, or the database's sum of several rows of one device (concatenated
    histogram bytes): the input of :func:`sum_rows`. A database row with these columns in
    this order will do."""

    device_id: str
    windows: int
    requests: int
    fallbacks: int
    errors: int
    unsummarised_requests: int
    latency_zero: int
    latency_sum: float
    latency_min: float | None
    latency_max: float | None
    latency: bytes
    score_classes: str | None
    scores: bytes
    labelled_rows: int
    labelled_correct: int


@dataclass(frozen=True)
class DeviceAggregates:
    """Per device (``device_ids[i]``), the sums over its hour rows of one model version.

    Columns are numpy arrays indexed like ``device_ids``. ``latency[i]`` holds the
    fixed-layout latency buckets; ``scores[i, c, k]`` the top-score histogram over
    ``classes`` (``None`` when no row carried scores), so ``predicted`` (its sum over
    bins) counts the summarised requests predicted as each class.
    """

    device_ids: list[str]
    windows: npt.NDArray[np.int64]
    requests: npt.NDArray[np.int64]
    fallbacks: npt.NDArray[np.int64]
    errors: npt.NDArray[np.int64]
    unsummarised_requests: npt.NDArray[np.int64]
    latency_zero: npt.NDArray[np.int64]
    latency_sum: npt.NDArray[np.float64]
    latency_min: npt.NDArray[np.float64]  # NaN: no latency recorded
    latency_max: npt.NDArray[np.float64]
    latency: npt.NDArray[np.int64]  # [devices, LATENCY_BUCKETS]
    classes: tuple[str, ...] | None
    scores: npt.NDArray[np.int64]  # [devices, classes, SCORE_BIN_COUNT]
    labelled_rows: npt.NDArray[np.int64]
    labelled_correct: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.device_ids)

    def index(self) -> dict[str, int]:
        """Device id -> row (made once: a tick asks it for every device)."""
        return self._index

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.device_ids)}

    @functools.cached_property
    def predicted(self) -> npt.NDArray[np.int64]:
        """Summarised requests per device and predicted class, ``[devices, classes]``
        (summed once: the sums are never changed after they are made)."""
        total: npt.NDArray[np.int64] = self.scores.sum(axis=2)
        return total

    def latency_histogram(self, i: int) -> ExponentialHistogram:
        """Device ``i``'s latency as a :class:`~protocol.histogram.ExponentialHistogram`
        (for :func:`protocol.histogram.quantile`)."""
        counts = self.latency[i]
        nonzero = np.flatnonzero(counts)
        empty = int(counts.sum()) + int(self.latency_zero[i]) == 0
        if len(nonzero) == 0:
            return ExponentialHistogram(
                scale=LATENCY_SCALE,
                zero_count=int(self.latency_zero[i]),
                sum=float(self.latency_sum[i]),
                min=None if empty else 0.0,
                max=None if empty else 0.0,
            )
        lo, hi = int(nonzero[0]), int(nonzero[-1])
        return ExponentialHistogram(
            scale=LATENCY_SCALE,
            zero_count=int(self.latency_zero[i]),
            offset=LATENCY_FIRST + lo,
            counts=[int(c) for c in counts[lo : hi + 1]],
            sum=float(self.latency_sum[i]),
            min=float(self.latency_min[i]),
            max=float(self.latency_max[i]),
        )

    def score_histogram(self, i: int) -> ScoreHistogram | None:
        """Device ``i``'s top-score histogram (CBPE's input), ``None`` without scores."""
        if self.classes is None:
            return None
        return ScoreHistogram(classes=list(self.classes), counts=self.scores[i].tolist())


def _cell_sums(
    blobs: Sequence[bytes], rows: npt.NDArray[np.int64], n: int, width: int
) -> npt.NDArray[np.int64]:
    """``[n, width]`` sums of the pairs of every blob into the row given for it (cells past
    ``width`` are left out), without a Python loop over pairs."""
    pairs = np.frombuffer(b"".join(blobs), dtype=PAIR)
    lengths = np.fromiter(map(len, blobs), np.int64, len(blobs)) // PAIR.itemsize
    cell = pairs["index"].astype(np.int64)
    inside = cell < width
    flat = (np.repeat(rows, lengths) * width + cell)[inside]
    counts = pairs["count"][inside]
    if counts.size and int(counts.max()) >= 2**52:
        # Beyond what float64 weights count exactly: the slow, exact path.
        out = np.zeros(n * width, dtype=np.int64)
        np.add.at(out, flat, counts.astype(np.int64))
        return out.reshape(n, width)
    summed = np.bincount(flat, weights=counts, minlength=n * width)
    return summed.astype(np.int64).reshape(n, width)


def sum_rows(rows: Sequence[HourRow] | Sequence[Sequence[Any]]) -> DeviceAggregates:
    """Per-device sums of ``rows`` (any number per device, in any order), vectorised.

    Scores of rows whose classes differ from the first row's with scores are left out
    (see :func:`combine`).
    """
    if not rows:
        columns: list[Sequence[Any]] = [()] * len(HourRow._fields)
    else:
        columns = list(zip(*rows, strict=True))
    col = dict(zip(HourRow._fields, columns, strict=True))
    ids: Sequence[str] = col["device_id"]
    device_ids = sorted(set(ids))
    position = {d: i for i, d in enumerate(device_ids)}
    n, m = len(device_ids), len(ids)
    at = np.fromiter(map(position.__getitem__, ids), np.int64, m)

    def total(name: str) -> npt.NDArray[np.int64]:
        values = np.asarray(col[name], dtype=np.int64)
        if values.size and int(np.abs(values).max()) >= 2**52:
            # Beyond what float64 weights count exactly: the slow, exact path.
            out = np.zeros(n, dtype=np.int64)
            np.add.at(out, at, values)
            return out
        return np.bincount(at, weights=values, minlength=n).astype(np.int64)

    latency_sum: npt.NDArray[np.float64] = np.bincount(
        at, weights=np.asarray(col["latency_sum"], dtype=np.float64), minlength=n
    ).astype(np.float64)

    def extreme(name: str, how: Any) -> npt.NDArray[np.float64]:
        values = np.array([np.nan if v is None else v for v in col[name]], dtype=np.float64)
        out = np.full(n, np.nan)
        how.at(out, at, values)
        return out

    latency = _cell_sums(col["latency"], at, n, LATENCY_BUCKETS)
    classes = next((c for c in col["score_classes"] if c is not None), None)
    decoded = decode_classes(classes)
    width = len(decoded) if decoded is not None else 0
    if decoded is not None:
        keep = [i for i, c in enumerate(col["score_classes"]) if c == classes]
        blobs = [col["scores"][i] for i in keep]
        scores = _cell_sums(blobs, at[keep], n, width * SCORE_BIN_COUNT)
    else:
        scores = np.zeros((n, 0), dtype=np.int64)
    return DeviceAggregates(
        device_ids=device_ids,
        windows=total("windows"),
        requests=total("requests"),
        fallbacks=total("fallbacks"),
        errors=total("errors"),
        unsummarised_requests=total("unsummarised_requests"),
        latency_zero=total("latency_zero"),
        latency_sum=latency_sum,
        latency_min=extreme("latency_min", np.fmin),
        latency_max=extreme("latency_max", np.fmax),
        latency=latency,
        classes=decoded,
        scores=scores.reshape(n, width, SCORE_BIN_COUNT),
        labelled_rows=total("labelled_rows"),
        labelled_correct=total("labelled_correct"),
    )


def add(a: DeviceAggregates, b: DeviceAggregates) -> DeviceAggregates:
    """The per-device sum of two aggregates of one model version (say the hours already
    read, kept, and the hours read at this tick); devices in either are in the result.

    Scores over other classes than ``a``'s are left out (see :func:`combine`).
    """
    ids_a, ids_b = np.asarray(a.device_ids, dtype=str), np.asarray(b.device_ids, dtype=str)
    if len(b) and not np.isin(ids_b, ids_a).all():
        merged = np.union1d(ids_a, ids_b)  # both lists are sorted: so is their union
        device_ids = merged.tolist()
    else:  # b's devices are among a's (a tick's open hour against the hours kept)
        merged, device_ids = ids_a, list(a.device_ids)
    n = len(device_ids)
    at_a = np.searchsorted(merged, ids_a) if len(a) else np.zeros(0, np.int64)
    at_b = np.searchsorted(merged, ids_b) if len(b) else np.zeros(0, np.int64)
    classes = a.classes if a.classes is not None else b.classes

    def both(name: str, fill: float | int = 0) -> npt.NDArray[Any]:
        x, y = getattr(a, name), getattr(b, name)
        out = np.full((n, *x.shape[1:]), fill, dtype=x.dtype)
        out[at_a] = x
        if name == "latency_min":
            out[at_b] = np.fmin(out[at_b], y)
        elif name == "latency_max":
            out[at_b] = np.fmax(out[at_b], y)
        else:
            out[at_b] += y
        return out

    scores = np.zeros((n, len(classes or ()), SCORE_BIN_COUNT), dtype=np.int64)
    if a.classes is not None:
        scores[at_a] = a.scores
    if b.classes is not None and b.classes == classes:
        scores[at_b] += b.scores
    return DeviceAggregates(
        device_ids=device_ids,
        windows=both("windows"),
        requests=both("requests"),
        fallbacks=both("fallbacks"),
        errors=both("errors"),
        unsummarised_requests=both("unsummarised_requests"),
        latency_zero=both("latency_zero"),
        latency_sum=both("latency_sum", 0.0),
        latency_min=both("latency_min", np.nan),
        latency_max=both("latency_max", np.nan),
        latency=both("latency"),
        classes=classes,
        scores=scores,
        labelled_rows=both("labelled_rows"),
        labelled_correct=both("labelled_correct"),
    )


class ShadowRow(NamedTuple):
    """One stored row's shadow columns (or several rows' of one device, the latency bytes
    concatenated): the input of :func:`sum_shadow_rows`."""

    device_id: str
    shadow_requests: int
    shadow_agreements: int
    shadow_errors: int
    shadow_latency: bytes | None


@dataclass(frozen=True)
class ShadowAggregates:
    """Per device (``device_ids[i]``), the sums of the shadow sections of one version's rows:
    requests the shadow ran on, agreements with the answer served, errors, and its latency
    in the fixed layout (``latency[i]``, ``[devices, LATENCY_BUCKETS]``)."""

    device_ids: list[str]
    requests: npt.NDArray[np.int64]
    agreements: npt.NDArray[np.int64]
    errors: npt.NDArray[np.int64]
    latency: npt.NDArray[np.int64]

    def index(self) -> dict[str, int]:
        """Device id -> row."""
        return {d: i for i, d in enumerate(self.device_ids)}

    def latency_histogram(self, i: int) -> ExponentialHistogram:
        """Device ``i``'s shadow latency at :data:`LATENCY_SCALE`; the buckets are kept, not
        the sum, and the extremes are the outer edges of the end buckets."""
        counts = self.latency[i]
        nonzero = np.flatnonzero(counts)
        if len(nonzero) == 0:
            return ExponentialHistogram(scale=LATENCY_SCALE)
        lo, hi = int(nonzero[0]), int(nonzero[-1])
        width = 2.0**LATENCY_SCALE
        return ExponentialHistogram(
            scale=LATENCY_SCALE,
            offset=LATENCY_FIRST + lo,
            counts=[int(c) for c in counts[lo : hi + 1]],
            min=2.0 ** ((LATENCY_FIRST + lo) / width),
            max=2.0 ** ((LATENCY_FIRST + hi + 1) / width),
        )


def sum_shadow_rows(rows: Sequence[ShadowRow] | Sequence[Sequence[Any]]) -> ShadowAggregates:
    """Per-device sums of ``rows``' shadow columns; devices whose rows hold no shadow
    requests are left out."""
    kept = [ShadowRow(*r) for r in rows if int(r[1]) > 0]
    device_ids = sorted({r.device_id for r in kept})
    position = {d: i for i, d in enumerate(device_ids)}
    n = len(device_ids)
    at = np.fromiter((position[r.device_id] for r in kept), np.int64, len(kept))

    def total(values: Iterable[int]) -> npt.NDArray[np.int64]:
        out = np.zeros(n, dtype=np.int64)
        np.add.at(out, at, np.fromiter(values, np.int64, len(kept)))
        return out

    latency = _cell_sums([r.shadow_latency or b"" for r in kept], at, n, LATENCY_BUCKETS)
    return ShadowAggregates(
        device_ids=device_ids,
        requests=total(r.shadow_requests for r in kept),
        agreements=total(r.shadow_agreements for r in kept),
        errors=total(r.shadow_errors for r in kept),
        latency=latency,
    )
