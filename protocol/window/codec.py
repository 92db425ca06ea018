"""The binary form of a window summary: what a device publishes, what the server stores.

On the wire a window is a compact binary record (:func:`encode_window`,
:func:`decode_window`), not JSON: at one window a minute with 32 features a
day of windows must stay under 2 MB (about 1.1 kB a window at 600 requests,
against 7 kB as JSON). Layout, codec versions 2 and 3::

    "EFW" | version (1 byte) | CRC-32 of the body (4 bytes, little-endian)
    | body, compressed as raw LZMA2 (4 KiB dictionary, lc=1 lp=0 pb=0)

    body: window_id device_id model_name model_version baseline_id cohort_id plan_id
          start end (float64) | requests errors unsummarised_requests
          | served, in STAGE_NAMES order | latency histogram | score histogram | features

Version 1 is the same without ``unsummarised_requests`` (0: every request
summarised). A window that summarised every request is written as version 1,
so readers that know only version 1 still read it; a sampled window needs
version 2. Version 3 is version 2 whose features also say how many values lay
below the baseline's minimum and above its maximum (a feature flag, then the
two counts, only where one is not zero). It is written only for a window that
has such a value: every other window keeps its version 1 or 2 bytes, so a
reader not yet upgraded still reads every window it read before, and loses
only those that show a new range. Nothing is lost by leaving the counts out:
a window without values beyond the baseline's range has its ``min`` and
``max`` inside it, which proves both counts are 0
(:func:`protocol.drift.windows.count_beyond_baseline`). Such a window, and any window
of version 1 or 2, reads back with the counts ``None`` (not counted).

Version 4 carries what a shadow model did beside the active one
(:class:`~protocol.window.model.ShadowSummary`): it is version 2 with a
sections byte after ``unsummarised_requests`` (``0x01``: features carry the
counts beyond the baseline as in version 3; ``0x02``: a shadow section
follows the features) and, at the end of the body, the shadow section::

    bundle_id model_version | requests agreements errors | latency histogram

It is written only for a window with a shadow section, so every other window
keeps its version 1, 2 or 3 bytes.

Version 5 carries what the device did under a hybrid plan
(:class:`~protocol.hybrid.HybridSummary`): version 4's layout, whose sections
byte may also say ``0x04`` (a hybrid section follows the features, and the
shadow section when there is one) and need not say ``0x02``::

    plan_id | mode (index in PLAN_MODES) | local escalated kept_local_quota
    cloud_answered audits | error kinds (a bit per CLOUD_ERROR_KINDS entry)
    and the count of each kind set | escalated_compared escalated_agreements
    audit_compared audit_agreements | audit_confidence_sum (float64)
    | local latency histogram | cloud latency histogram
    | confidence: first bin, number of bins, their counts (a trimmed row)

It is written only for a window with a hybrid section (a window without one
keeps its version 1 to 4 bytes); a version 5 window always has one. A reader
that knows only versions 1 to 4 refuses it, saying to upgrade. The reader
reads all five.

The body is unsigned LEB128 varints (signed ones zigzag-coded), little-endian
IEEE floats and short strings (a kind byte — absent, UTF-8, hex digits packed
two per byte, or ``sha256:`` with its 64 hex digits packed into 32 bytes —
then a varint length and the bytes). A new fallback stage needs a new codec
version. Features share the window's row and bin counts unless their flags
say otherwise (a feature's ``n`` is the rows minus its NaN); bin counts go as
differences from ``n / bins`` — small numbers, since baseline bins hold about
equal shares — with the last one implied by ``n``; and every feature's floats
follow all the counts, float32 ones byte-plane by byte-plane so that similar
exponents sit together.

What the codec keeps exactly: every count, ``min`` and ``max`` (sent as float32
when that is exact, which it is for float32 sensor data, otherwise float64),
the times and the latency histogram. ``mean`` and ``m2`` are sent as float32 —
``mean`` as its offset from ``min`` — so their error is at most about 6e-8 of
the feature's range and of ``m2`` respectively: far below any sensor's
resolution, and merging windows does not compound it. (A feature whose values
do not fit float32 exactly is sent in float64 throughout, exactly.)
"""

from __future__ import annotations

import lzma
import math
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import numpy as np
from pydantic import TypeAdapter, ValidationError

from protocol.histogram import ExponentialHistogram
from protocol.hybrid import CLOUD_ERROR_KINDS, CONFIDENCE_BINS, PLAN_MODES, HybridSummary
from protocol.inference import STAGE_NAMES
from protocol.summary import FeatureSummary, ScoreHistogram
from protocol.window.model import ShadowSummary, WindowSummary

WINDOW_CODEC_VERSION: Final = 5
# Windows that summarised every request are written in version 1, which old readers know,
# sampled ones in version 2; version 3 only for a window with values beyond the baseline.
_EXACT_CODEC_VERSION: Final = 1
_SAMPLED_CODEC_VERSION: Final = 2
_BEYOND_CODEC_VERSION: Final = 3
_SHADOW_CODEC_VERSION: Final = 4
# Version 4's and 5's sections byte.
_SECTION_BEYOND: Final = 0x01
_SECTION_SHADOW: Final = 0x02
_SECTION_HYBRID: Final = 0x04
_SECTIONS: Final = _SECTION_BEYOND | _SECTION_SHADOW
_SECTIONS_V5: Final = _SECTIONS | _SECTION_HYBRID
WINDOW_MAGIC: Final = b"EFW"
# A decoded body larger than this is refused (a window of 1,024 features is ~100 kB).
MAX_BODY_BYTES: Final = 1 << 20
MAX_FEATURES: Final = 4096
MAX_BINS: Final = 1024
MAX_CLASSES: Final = 1024
MAX_TEXT_BYTES: Final = 4096


class WindowCodecError(ValueError):
    """Bytes that are not a window this codec version can read, or a window it cannot write."""


_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_CRC = struct.Struct("<I")
# Raw LZMA2 with the smallest dictionary: a window is about a kilobyte, and on
# such small, mostly numeric bodies LZMA's adaptive coder saves about 12 % over
# deflate, whose Huffman tables alone cost tens of bytes per message.
_LZMA_FILTERS: Final = ({"id": lzma.FILTER_LZMA2, "dict_size": 4096, "lc": 1, "lp": 0, "pb": 0},)
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_SHA256_ID = re.compile(r"^sha256:[0-9a-f]{64}$")

# String kinds.
_ABSENT, _UTF8, _HEXBYTES, _SHA256 = 0, 1, 2, 3

# Feature flags.
_HAS_NAN = 0x01
_HAS_OUT_OF_RANGE = 0x02
_HAS_VALUES = 0x04  # n > 0: min (and unless constant, max, mean, m2) follow
_CONSTANT = 0x08  # min == max: only min is sent
_WIDE = 0x10  # floats in float64
_OWN_ROWS = 0x20  # n + nan differs from the window's row count: n is sent
_OWN_BINS = 0x40  # the bin count differs from the window's: it is sent
_BEYOND = 0x80  # version 3: values below and above the baseline's range follow
_FEATURE_FLAGS = 0x7F
_FEATURE_FLAGS_V3 = 0xFF

_HAS_LATENCY = 0x01
# Float32 holds values below this without overflow.
_F32_LIMIT = 3.0e38


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def uint(self, value: int) -> None:
        if value < 0:
            raise WindowCodecError(f"cannot encode negative count {value}")
        while value >= 0x80:
            self.buf.append((value & 0x7F) | 0x80)
            value >>= 7
        self.buf.append(value)

    def sint(self, value: int) -> None:
        self.uint((value << 1) if value >= 0 else ((-value) << 1) - 1)

    def f64(self, value: float) -> None:
        self.buf += _F64.pack(value)

    def text(self, value: str | None) -> None:
        if value is None:
            self.buf.append(_ABSENT)
            return
        if _SHA256_ID.match(value):
            self.buf.append(_SHA256)
            self.buf += bytes.fromhex(value[7:])
            return
        kind, raw = (
            (_HEXBYTES, bytes.fromhex(value)) if _HEX.match(value) else (_UTF8, value.encode())
        )
        if len(raw) > MAX_TEXT_BYTES:
            raise WindowCodecError(f"a string of {len(raw)} bytes is longer than {MAX_TEXT_BYTES}")
        self.buf.append(kind)
        self.uint(len(raw))
        self.buf += raw


_FEATURE_LIST: Final = TypeAdapter(list[FeatureSummary])


# Zigzag-decoded values of the one-byte varints.
def _unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


_ZIGZAG: Final = tuple(_unzigzag(z) for z in range(0x80))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise WindowCodecError(f"window is truncated at byte {self.pos} of the body")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def uint(self, limit: int | None = None) -> int:
        pos = self.pos
        if pos < len(self.data) and self.data[pos] < 0x80:  # most values: one byte
            value = self.data[pos]
            self.pos = pos + 1
        else:
            value = self._long_uint()
        if limit is not None and value > limit:
            raise WindowCodecError(f"value {value} at byte {self.pos} exceeds the limit {limit}")
        return value

    def _long_uint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise WindowCodecError(f"varint longer than 64 bits at byte {self.pos}")

    def uints(self, count: int) -> list[int]:
        """``count`` varints in a row (the hot loop of decoding, kept to local variables)."""
        data, pos, size = self.data, self.pos, len(self.data)
        out: list[int] = []
        append = out.append
        for _ in range(count):
            if pos < size and data[pos] < 0x80:
                append(data[pos])
                pos += 1
            else:
                self.pos = pos
                append(self._long_uint())
                pos = self.pos
        self.pos = pos
        return out

    def sint(self) -> int:
        return _unzigzag(self.uint())

    def sints(self, count: int, offset: int = 0) -> list[int]:
        """``count`` zigzag varints in a row, each plus ``offset``."""
        data, pos, size = self.data, self.pos, len(self.data)
        zigzag = _ZIGZAG
        out: list[int] = []
        append = out.append
        for _ in range(count):
            if pos < size and data[pos] < 0x80:
                append(zigzag[data[pos]] + offset)
                pos += 1
            else:
                self.pos = pos
                z = self._long_uint()
                pos = self.pos
                append(_unzigzag(z) + offset)
        self.pos = pos
        return out

    def f64(self) -> float:
        return float(_F64.unpack(self.take(8))[0])

    def required_text(self) -> str:
        value = self.text()
        if value is None:
            raise WindowCodecError(f"a required string is absent before byte {self.pos}")
        return value

    def text(self) -> str | None:
        kind = self.byte()
        if kind == _ABSENT:
            return None
        if kind == _SHA256:
            return "sha256:" + self.take(32).hex()
        size = self.uint(limit=MAX_TEXT_BYTES)
        raw = self.take(size)
        if kind == _HEXBYTES:
            return raw.hex()
        if kind == _UTF8:
            try:
                return raw.decode()
            except UnicodeDecodeError:
                raise WindowCodecError(f"a string before byte {self.pos} is not UTF-8") from None
        raise WindowCodecError(f"unknown string kind {kind} at byte {self.pos - size - 1}")


def _fits_f32(value: float) -> bool:
    return bool(_F32.unpack(_F32.pack(value))[0] == value) if abs(value) < _F32_LIMIT else False


def _beyond(features: Sequence[FeatureSummary]) -> bool:
    """Whether any feature counted a value beyond the baseline's range (version 3 needed)."""
    return any(f.below_baseline or f.above_baseline for f in features)


def _feature_flags(f: FeatureSummary, rows: int, bins: int, beyond: bool) -> int:
    flags = (_HAS_NAN if f.nan else 0) | (_HAS_OUT_OF_RANGE if f.out_of_range else 0)
    if beyond and (f.below_baseline or f.above_baseline):
        flags |= _BEYOND
    flags |= (_OWN_ROWS if f.n + f.nan != rows else 0) | (_OWN_BINS if len(f.counts) != bins else 0)
    if not f.counts:
        raise WindowCodecError("a feature has no bins")
    if f.n == 0:
        return flags
    if f.min is None or f.max is None:
        raise WindowCodecError("a feature with values has no min or max")
    flags |= _HAS_VALUES | (_CONSTANT if f.min == f.max else 0)
    narrow = _fits_f32(f.min) and _fits_f32(f.max) and f.max - f.min < _F32_LIMIT
    if not (narrow and f.m2 < _F32_LIMIT):
        flags |= _WIDE
    return flags


def _feature_floats(f: FeatureSummary, flags: int) -> list[float]:
    """The floats a feature sends: none, ``[min]`` or ``[min, max, mean, m2]``."""
    if not flags & _HAS_VALUES or f.min is None or f.max is None:
        return []
    if flags & _CONSTANT:
        return [f.min]
    # A narrow feature sends its mean as the offset from min: float32 then
    # keeps it to a fraction of the range, whatever the magnitude of the values.
    mean = f.mean if flags & _WIDE else f.mean - f.min
    return [f.min, f.max, mean, f.m2]


def _write_features(w: _Writer, features: Sequence[FeatureSummary], beyond: bool) -> None:
    """Write ``features``; ``beyond``: in version 3, with the counts beyond the baseline."""
    # Most features see every row and use the usual number of bins: those two
    # numbers are sent once, and a feature that differs says so in its flags.
    rows = _most_common([f.n + f.nan for f in features])
    bins = _most_common([len(f.counts) for f in features])
    w.uint(len(features))
    w.uint(rows)
    w.uint(bins)
    narrow: list[float] = []
    wide: list[float] = []
    for j, f in enumerate(features):
        if beyond and (f.below_baseline is None or f.above_baseline is None):
            raise WindowCodecError(
                f"feature {j} did not count values beyond the baseline's range, "
                "but other features of the window did"
            )
        flags = _feature_flags(f, rows, bins, beyond)
        w.buf.append(flags)
        for flag, value in (
            (_HAS_NAN, f.nan),
            (_HAS_OUT_OF_RANGE, f.out_of_range),
            (_OWN_ROWS, f.n),
            (_OWN_BINS, len(f.counts)),
            (_BEYOND, f.below_baseline or 0),
            (_BEYOND, f.above_baseline or 0),
        ):
            if flags & flag:
                w.uint(value)
        # Baseline bins hold about equal shares, so counts go as their difference
        # from n / bins (small numbers that deflate codes in few bits); the last
        # count is implied by n.
        expected = f.n // len(f.counts)
        zigzags = [(d << 1) if d >= 0 else ((-d) << 1) - 1
                   for d in [c - expected for c in f.counts[:-1]]]  # fmt: skip
        if zigzags and max(zigzags) < 0x80:
            w.buf += bytes(zigzags)  # the usual run: every varint one byte
        else:
            for z in zigzags:
                w.uint(z)
        (wide if flags & _WIDE else narrow).extend(_feature_floats(f, flags))
    # Floats go after all counts, float32 ones byte-plane by byte-plane: the
    # sign and exponent bytes of similar values then sit together and compress.
    packed = struct.pack(f"<{len(narrow)}f", *narrow)
    for i in range(4):
        w.buf += packed[i::4]
    for v in wide:
        w.f64(v)


# What the counts of a feature read: flags, NaN, out of range, n, bin counts, below, above.
_Head = tuple[int, int, int, int, list[int], int | None, int | None]


def _read_features(r: _Reader, beyond: bool) -> list[FeatureSummary]:
    """Read features; ``beyond``: version 3, with the counts beyond the baseline."""
    count, rows, bins = r.uint(limit=MAX_FEATURES), r.uint(), r.uint(limit=MAX_BINS)
    heads: list[_Head] = []
    narrow_count = wide_count = 0
    known = _FEATURE_FLAGS_V3 if beyond else _FEATURE_FLAGS
    counted = 0 if beyond else None
    for _ in range(count):
        flags = r.byte()
        if flags & ~known:
            raise WindowCodecError(f"unknown feature flags {flags:#x} at byte {r.pos - 1}")
        nan = r.uint() if flags & _HAS_NAN else 0
        out_of_range = r.uint() if flags & _HAS_OUT_OF_RANGE else 0
        n = r.uint() if flags & _OWN_ROWS else rows - nan
        k = r.uint(limit=MAX_BINS) if flags & _OWN_BINS else bins
        below, above = (r.uint(), r.uint()) if flags & _BEYOND else (counted, counted)
        if n < 0 or k < 1:
            raise WindowCodecError(f"a feature has {n} values in {k} bins")
        expected = n // k
        counts = r.sints(k - 1, expected)
        counts.append(n - sum(counts))
        if min(counts) < 0:
            raise WindowCodecError(f"a feature's bin counts are negative before byte {r.pos}")
        if bool(flags & _HAS_VALUES) != (n > 0):
            raise WindowCodecError(f"a feature with {n} values has the wrong flags {flags:#x}")
        floats = (1 if flags & _CONSTANT else 4) if flags & _HAS_VALUES else 0
        if flags & _WIDE:
            wide_count += floats
        else:
            narrow_count += floats
        heads.append((flags, nan, out_of_range, n, counts, below, above))
    # Byte planes back into little-endian float32s: plane i holds byte i of each.
    planes = np.frombuffer(r.take(4 * narrow_count), dtype=np.uint8).reshape(4, narrow_count)
    with np.errstate(invalid="ignore"):  # a signalling NaN is refused just below, not warned of
        narrow_values: list[float] = planes.T.copy().view("<f4").ravel().astype(np.float64).tolist()
    wide_values: list[float] = (
        np.frombuffer(r.take(8 * wide_count), dtype="<f8").astype(np.float64).tolist()
    )
    if not all(math.isfinite(v) for v in [*narrow_values, *wide_values]):
        raise WindowCodecError("a feature's moments are not finite numbers")
    return _features(heads, iter(narrow_values), iter(wide_values))


def _features(
    heads: Sequence[_Head], narrow: Iterator[float], wide: Iterator[float]
) -> list[FeatureSummary]:
    """The summaries of ``heads`` with their floats taken in order from ``narrow`` and ``wide``.

    ``heads`` holds each feature's flags, NaN, out-of-range, ``n``, bin counts
    and counts beyond the baseline, as read; both readers end here, so a window
    they both take gives the same summaries.
    """
    out: list[dict[str, object]] = []
    for flags, nan, out_of_range, n, counts, below, above in heads:
        if not flags & _HAS_VALUES:
            out.append(
                {
                    "n": 0,
                    "nan": nan,
                    "out_of_range": out_of_range,
                    "counts": counts,
                    "below_baseline": below,
                    "above_baseline": above,
                }
            )
            continue
        source = wide if flags & _WIDE else narrow
        low = next(source)
        if flags & _CONSTANT:
            high, mean, m2 = low, low, 0.0
        else:
            high, mean, m2 = (next(source) for _ in range(3))
            if not flags & _WIDE:
                # Back from the offset, kept inside [min, max] despite rounding.
                mean = min(max(low + mean, low), high)
        out.append(
            {
                "n": n,
                "nan": nan,
                "out_of_range": out_of_range,
                "mean": mean,
                "m2": m2,
                "min": low,
                "max": high,
                "counts": counts,
                "below_baseline": below,
                "above_baseline": above,
            }
        )
    # One validation call for every feature: cheaper than a model per feature.
    try:
        return _FEATURE_LIST.validate_python(out)
    except ValidationError as exc:
        raise _invalid(exc, "features") from None


class _Unsure(Exception):
    """The bulk reader cannot vouch for these bytes: the reference reader reads them."""


# One-byte varints as their zigzag value plus 64 (0 to 127), for bytes.translate.
_ZIGZAG_PLUS_64: Final = bytes(z + 64 for z in _ZIGZAG) + bytes(0x80)
# For ``n // bins`` below 64, the one-byte varints whose bin count (their zigzag value plus
# ``n // bins``) is negative, translated to 0x80 (the others to 0); for 64 and more none is.
_NEGATIVE: Final = tuple(
    bytes(0x80 if b < 0x80 and _ZIGZAG[b] + expected < 0 else 0 for b in range(256))
    for expected in range(64)
)
# The feature flags that announce counts of the feature's own after its flags byte.
_OWN_COUNTS: Final = _HAS_NAN | _HAS_OUT_OF_RANGE | _OWN_ROWS | _OWN_BINS | _BEYOND


def _read_features_in_bulk(r: _Reader, beyond: bool) -> list[FeatureSummary]:
    """:func:`_read_features` for the usual window, a run of bytes at a time.

    A feature's bin counts are a run of varints that are almost always one
    byte each (small differences from ``n / bins``): such a run is checked with
    one ``max`` over its slice and decoded in one comprehension, instead of a
    call per value; the float32 byte planes are interleaved back by slice
    assignment and unpacked in one call, and their finiteness is checked with
    one sum. A feature with a longer varint in its run is read value by value
    (:meth:`_Reader.sints`). Anything the reference reader would refuse raises
    :class:`_Unsure` or the reference's own error; :func:`decode_window` then
    reads the window the reference way, which names what is wrong. What both
    take they read alike, and both end in :func:`_features`.
    """
    heads, narrow, wide = _read_heads_in_bulk(r, beyond)
    return _features(heads, iter(narrow), iter(wide))


def _check_features_in_bulk(r: _Reader, beyond: bool) -> list[FeatureSummary]:
    """Read and check the features as :func:`_read_features_in_bulk` would make them, but
    make no summaries: an empty list, for :func:`~protocol.window.head.decode_window_head`.

    Besides the reader's own checks (flags, a count per bin, none negative,
    the last implied by ``n``, finite floats), what
    :class:`~protocol.summary.FeatureSummary` and the window's own check
    require of a feature is ``m2 >= 0`` and no more values beyond the
    baseline's range than ``n``; a feature that breaks any of them raises
    :class:`_Unsure`, and the reference reader then names it. A run of bin
    counts is checked without a Python int per bin: ``isascii`` says whether
    every varint is one byte; translated through a table that marks the bytes
    whose count would be negative, ``isascii`` again whether none is; and
    translated to its zigzag values plus 64, its ``sum`` what is left for the
    last one.
    """
    count, rows, bins = r.uint(limit=MAX_FEATURES), r.uint(), r.uint(limit=MAX_BINS)
    data, pos = r.data, r.pos
    known = _FEATURE_FLAGS_V3 if beyond else _FEATURE_FLAGS
    narrow_m2: list[int] = []  # where each feature's m2 lies among the narrow floats
    wide_m2: list[int] = []
    narrow_count = wide_count = 0
    for _ in range(count):
        flags = data[pos]
        pos += 1
        if flags & ~known:
            raise _Unsure
        n, k = rows, bins
        if flags & _OWN_COUNTS:
            r.pos = pos
            nan = r.uint() if flags & _HAS_NAN else 0
            if flags & _HAS_OUT_OF_RANGE:
                r.uint()
            n = r.uint() if flags & _OWN_ROWS else rows - nan
            if flags & _OWN_BINS:
                k = r.uint(limit=MAX_BINS)
            if flags & _BEYOND and r.uint() + r.uint() > n:
                raise _Unsure
            pos = r.pos
        if n < 0 or k < 1 or bool(flags & _HAS_VALUES) != (n > 0):
            raise _Unsure
        expected = n // k
        end = pos + k - 1
        run = data[pos:end]
        if len(run) == k - 1 and run.isascii():
            if expected < 64 and not run.translate(_NEGATIVE[expected]).isascii():
                raise _Unsure
            total = sum(run.translate(_ZIGZAG_PLUS_64)) - 64 * len(run) + expected * len(run)
            pos = end
        else:
            r.pos = pos
            counts = r.sints(k - 1, expected)
            pos = r.pos
            if counts and min(counts) < 0:
                raise _Unsure
            total = sum(counts)
        if n - total < 0:
            raise _Unsure
        if flags & _HAS_VALUES:
            if flags & _WIDE:
                if not flags & _CONSTANT:
                    wide_m2.append(wide_count + 3)  # min, max, mean, m2
                wide_count += 1 if flags & _CONSTANT else 4
            else:
                if not flags & _CONSTANT:
                    narrow_m2.append(narrow_count + 3)
                narrow_count += 1 if flags & _CONSTANT else 4
    r.pos = pos
    narrow_values, wide_values = _floats_in_bulk(r, narrow_count, wide_count)
    if any(narrow_values[i] < 0 for i in narrow_m2) or any(wide_values[i] < 0 for i in wide_m2):
        raise _Unsure
    return []


def _read_heads_in_bulk(
    r: _Reader, beyond: bool
) -> tuple[list[_Head], tuple[float, ...], tuple[float, ...]]:
    """The features' heads and their narrow and wide floats, read in bulk (see above)."""
    count, rows, bins = r.uint(limit=MAX_FEATURES), r.uint(), r.uint(limit=MAX_BINS)
    data, pos = r.data, r.pos
    known = _FEATURE_FLAGS_V3 if beyond else _FEATURE_FLAGS
    counted = 0 if beyond else None
    zigzag = _ZIGZAG
    heads: list[_Head] = []
    narrow_count = wide_count = 0
    for _ in range(count):
        flags = data[pos]
        pos += 1
        if flags & ~known:
            raise _Unsure
        if flags & _OWN_COUNTS:
            r.pos = pos
            nan = r.uint() if flags & _HAS_NAN else 0
            out_of_range = r.uint() if flags & _HAS_OUT_OF_RANGE else 0
            n = r.uint() if flags & _OWN_ROWS else rows - nan
            k = r.uint(limit=MAX_BINS) if flags & _OWN_BINS else bins
            below, above = (r.uint(), r.uint()) if flags & _BEYOND else (counted, counted)
            pos = r.pos
        else:
            nan = out_of_range = 0
            n, k, below, above = rows, bins, counted, counted
        if n < 0 or k < 1 or bool(flags & _HAS_VALUES) != (n > 0):
            raise _Unsure
        expected = n // k
        end = pos + k - 1
        run = data[pos:end]
        if len(run) == k - 1 and (not run or max(run) < 0x80):
            counts = [zigzag[b] + expected for b in run]
            pos = end
        else:
            r.pos = pos
            counts = r.sints(k - 1, expected)
            pos = r.pos
        counts.append(n - sum(counts))
        if min(counts) < 0:
            raise _Unsure
        if flags & _HAS_VALUES:
            floats = 1 if flags & _CONSTANT else 4
            if flags & _WIDE:
                wide_count += floats
            else:
                narrow_count += floats
        heads.append((flags, nan, out_of_range, n, counts, below, above))
    r.pos = pos
    narrow_values, wide_values = _floats_in_bulk(r, narrow_count, wide_count)
    return heads, narrow_values, wide_values


def _floats_in_bulk(
    r: _Reader, narrow_count: int, wide_count: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The features' float32 and float64 values, checked finite."""
    narrow = r.take(4 * narrow_count)
    # Byte planes back into little-endian float32s: plane i holds byte i of each.
    interleaved = bytearray(4 * narrow_count)
    for i in range(4):
        interleaved[i::4] = narrow[i * narrow_count : (i + 1) * narrow_count]
    narrow_values = struct.unpack(f"<{narrow_count}f", interleaved)
    wide_values = struct.unpack(f"<{wide_count}d", r.take(8 * wide_count))
    # A sum is finite only if every term is (or it overflowed: then look at each).
    if not math.isfinite(sum(narrow_values) + sum(wide_values)) and not all(
        math.isfinite(v) for v in (*narrow_values, *wide_values)
    ):
        raise _Unsure
    return narrow_values, wide_values


def _invalid(exc: ValidationError, *where: str) -> WindowCodecError:
    err = exc.errors()[0]
    at = ".".join(str(p) for p in (*where, *err["loc"])) or "window"
    return WindowCodecError(f"decoded window is invalid at {at}: {err['msg']}")


def _write_latency(w: _Writer, h: ExponentialHistogram) -> None:
    if h.count == 0:
        w.buf.append(0)
        return
    w.buf.append(_HAS_LATENCY)
    w.sint(h.scale)
    w.uint(h.zero_count)
    w.sint(h.offset)
    w.uint(len(h.counts))
    for c in h.counts:
        w.uint(c)
    w.f64(h.sum)
    w.f64(h.min if h.min is not None else 0.0)
    w.f64(h.max if h.max is not None else 0.0)


def _read_latency(r: _Reader) -> ExponentialHistogram:
    flags = r.byte()
    if flags == 0:
        return ExponentialHistogram()
    if flags != _HAS_LATENCY:
        raise WindowCodecError(f"unknown latency flags {flags:#x}")
    scale, zero_count, offset = r.sint(), r.uint(), r.sint()
    counts = r.uints(r.uint(limit=MAX_BINS))
    return ExponentialHistogram(
        scale=scale,
        zero_count=zero_count,
        offset=offset,
        counts=counts,
        sum=r.f64(),
        min=r.f64(),
        max=r.f64(),
    )


def _write_scores(w: _Writer, s: ScoreHistogram | None) -> None:
    if s is None:
        w.uint(0)
        return
    w.uint(len(s.classes) + 1)
    bins = len(s.counts[0]) if s.counts else 0
    w.uint(bins)
    for name in s.classes:
        w.text(name)
    # Each row is sent trimmed: most top scores sit in a few high bins.
    for row in s.counts:
        nonzero = [i for i, c in enumerate(row) if c]
        first = nonzero[0] if nonzero else 0
        last = nonzero[-1] + 1 if nonzero else 0
        w.uint(first)
        w.uint(last - first)
        for c in row[first:last]:
            w.uint(c)


def _read_scores(r: _Reader) -> ScoreHistogram | None:
    size = r.uint(limit=MAX_CLASSES + 1)
    if size == 0:
        return None
    bins = r.uint(limit=MAX_BINS)
    classes = [r.required_text() for _ in range(size - 1)]
    counts = []
    for _ in classes:
        first, length = r.uint(limit=bins), r.uint(limit=bins)
        if first + length > bins:
            raise WindowCodecError(f"a score row reaches past its {bins} bins")
        counts.append([0] * first + r.uints(length) + [0] * (bins - first - length))
    return ScoreHistogram(classes=classes, counts=counts)


def _write_shadow(w: _Writer, shadow: ShadowSummary) -> None:
    w.text(shadow.bundle_id)
    w.text(shadow.model_version)
    w.uint(shadow.requests)
    w.uint(shadow.agreements)
    w.uint(shadow.errors)
    _write_latency(w, shadow.latency_ms)


def _read_shadow(r: _Reader) -> ShadowSummary:
    try:
        bundle_id, model_version = r.required_text(), r.required_text()
        requests, agreements, errors = r.uint(), r.uint(), r.uint()
        latency = _read_latency(r)
    except WindowCodecError as exc:
        raise WindowCodecError(f"the shadow section is malformed: {exc}") from None
    try:
        return ShadowSummary(
            bundle_id=bundle_id,
            model_version=model_version,
            requests=requests,
            agreements=agreements,
            errors=errors,
            latency_ms=latency,
        )
    except ValidationError as exc:
        raise _invalid(exc, "shadow") from None


def _write_hybrid(w: _Writer, hybrid: HybridSummary) -> None:
    w.text(hybrid.plan_id)
    w.buf.append(PLAN_MODES.index(hybrid.mode))
    for count in (
        hybrid.local,
        hybrid.escalated,
        hybrid.kept_local_quota,
        hybrid.cloud_answered,
        hybrid.audits,
    ):
        w.uint(count)
    kinds = [(i, kind) for i, kind in enumerate(CLOUD_ERROR_KINDS) if hybrid.cloud_errors.get(kind)]
    w.buf.append(sum(1 << i for i, _ in kinds))
    for _, kind in kinds:
        w.uint(hybrid.cloud_errors[kind])
    for count in (
        hybrid.escalated_compared,
        hybrid.escalated_agreements,
        hybrid.audit_compared,
        hybrid.audit_agreements,
    ):
        w.uint(count)
    w.f64(hybrid.audit_confidence_sum)
    _write_latency(w, hybrid.local_latency_ms)
    _write_latency(w, hybrid.cloud_latency_ms)
    nonzero = [i for i, c in enumerate(hybrid.confidence) if c]
    first = nonzero[0] if nonzero else 0
    last = nonzero[-1] + 1 if nonzero else 0
    w.uint(first)
    w.uint(last - first)
    for c in hybrid.confidence[first:last]:
        w.uint(c)


def _read_hybrid(r: _Reader) -> HybridSummary:
    try:
        plan_id = r.required_text()
        mode_index = r.byte()
        if mode_index >= len(PLAN_MODES):
            raise WindowCodecError(f"unknown plan mode {mode_index}")
        local, escalated, kept, answered, audits = r.uints(5)
        mask = r.byte()
        if mask >> len(CLOUD_ERROR_KINDS):
            raise WindowCodecError(f"unknown cloud error kinds {mask:#x}")
        errors = {kind: r.uint() for i, kind in enumerate(CLOUD_ERROR_KINDS) if mask & (1 << i)}
        esc_compared, esc_agreed, audit_compared, audit_agreed = r.uints(4)
        confidence_sum = r.f64()
        if not math.isfinite(confidence_sum):
            raise WindowCodecError("audit_confidence_sum is not a finite number")
        local_latency, cloud_latency = _read_latency(r), _read_latency(r)
        first, length = r.uint(limit=CONFIDENCE_BINS), r.uint(limit=CONFIDENCE_BINS)
        if first + length > CONFIDENCE_BINS:
            raise WindowCodecError(f"the confidence row reaches past its {CONFIDENCE_BINS} bins")
        confidence = [0] * first + r.uints(length) + [0] * (CONFIDENCE_BINS - first - length)
    except WindowCodecError as exc:
        raise WindowCodecError(f"the hybrid section is malformed: {exc}") from None
    try:
        return HybridSummary(
            plan_id=plan_id,
            mode=PLAN_MODES[mode_index],
            local=local,
            escalated=escalated,
            kept_local_quota=kept,
            cloud_answered=answered,
            audits=audits,
            cloud_errors=errors,
            escalated_compared=esc_compared,
            escalated_agreements=esc_agreed,
            audit_compared=audit_compared,
            audit_agreements=audit_agreed,
            audit_confidence_sum=confidence_sum,
            local_latency_ms=local_latency,
            cloud_latency_ms=cloud_latency,
            confidence=confidence,
        )
    except ValidationError as exc:
        raise _invalid(exc, "hybrid") from None


def _most_common(values: list[int]) -> int:
    return Counter(values).most_common(1)[0][0] if values else 0


def _check_limits(window: WindowSummary) -> None:
    """Refuse to write what :func:`decode_window` would refuse to read."""
    if window.shadow is not None and len(window.shadow.latency_ms.counts) > MAX_BINS:
        raise WindowCodecError(f"more than {MAX_BINS} bins in the shadow's latency histogram")
    hybrid = window.hybrid
    if (
        hybrid is not None
        and max(len(hybrid.local_latency_ms.counts), len(hybrid.cloud_latency_ms.counts)) > MAX_BINS
    ):
        raise WindowCodecError(f"more than {MAX_BINS} bins in a hybrid latency histogram")
    if len(window.features) > MAX_FEATURES:
        raise WindowCodecError(f"{len(window.features)} features; the codec carries {MAX_FEATURES}")
    widest = max((len(f.counts) for f in window.features), default=0)
    if widest > MAX_BINS or len(window.latency_ms.counts) > MAX_BINS:
        raise WindowCodecError(f"more than {MAX_BINS} bins in a histogram")
    if window.scores is not None and (
        len(window.scores.classes) > MAX_CLASSES
        or any(len(row) > MAX_BINS for row in window.scores.counts)
    ):
        raise WindowCodecError(f"scores over more than {MAX_CLASSES} classes or {MAX_BINS} bins")


def encode_window(window: WindowSummary) -> bytes:
    """The compact binary form of ``window`` (see the module docstring).

    Raises :class:`WindowCodecError` for a window beyond the codec's limits.
    """
    _check_limits(window)
    w = _Writer()
    for text in (
        window.window_id,
        window.device_id,
        window.model_name,
        window.model_version,
        window.baseline_id,
        window.cohort_id,
        window.plan_id,
    ):
        w.text(text)
    w.f64(window.start)
    w.f64(window.end)
    w.uint(window.requests)
    w.uint(window.errors)
    beyond = _beyond(window.features)
    if window.hybrid is not None:
        version = WINDOW_CODEC_VERSION
    elif window.shadow is not None:
        version = _SHADOW_CODEC_VERSION
    elif beyond:
        version = _BEYOND_CODEC_VERSION
    elif window.unsummarised_requests:
        version = _SAMPLED_CODEC_VERSION
    else:
        version = _EXACT_CODEC_VERSION
    if version >= 2:
        w.uint(window.unsummarised_requests)
    if version >= 4:
        w.buf.append(
            (_SECTION_BEYOND if beyond else 0)
            | (_SECTION_SHADOW if window.shadow is not None else 0)
            | (_SECTION_HYBRID if window.hybrid is not None else 0)
        )
    for stage in STAGE_NAMES:
        w.uint(window.served.get(stage, 0))
    _write_latency(w, window.latency_ms)
    _write_scores(w, window.scores)
    _write_features(w, window.features, beyond)
    if window.shadow is not None:
        _write_shadow(w, window.shadow)
    if window.hybrid is not None:
        _write_hybrid(w, window.hybrid)
    body = bytes(w.buf)
    header = WINDOW_MAGIC + bytes([version]) + _CRC.pack(zlib.crc32(body))
    return header + lzma.compress(body, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def decode_window(data: bytes) -> WindowSummary:
    """Read a window written by :func:`encode_window`.

    Raises :class:`WindowCodecError` saying what is wrong: not a window, an
    unknown codec version, corrupt or truncated bytes, or values that do not
    make a valid window.

    The body is read first with the bin counts in bulk
    (:func:`_read_features_in_bulk`); bytes that reader cannot vouch for, or
    that do not make a valid window, are read again value by value
    (:func:`_read_features`), whose error says exactly what is refused. So
    the two readers accept the same windows with the same result and refuse
    the same bytes with the same words.
    """
    version, body = _open(data)
    try:
        return _read_body(body, version, _read_features_in_bulk)
    except (_Unsure, ValueError, IndexError, OverflowError):
        pass  # ValueError covers WindowCodecError and pydantic's ValidationError
    try:
        return _read_body(body, version, _read_features)
    except ValidationError as exc:
        raise _invalid(exc) from None


_FeatureReader = Callable[[_Reader, bool], list[FeatureSummary]]


def _open(data: bytes) -> tuple[int, bytes]:
    """The codec version and the decompressed, checksummed body of ``data``."""
    header = len(WINDOW_MAGIC) + 1 + _CRC.size
    if len(data) < len(WINDOW_MAGIC) + 1 or data[: len(WINDOW_MAGIC)] != WINDOW_MAGIC:
        raise WindowCodecError("not a window summary (bad magic bytes)")
    version = data[len(WINDOW_MAGIC)]
    if not _EXACT_CODEC_VERSION <= version <= WINDOW_CODEC_VERSION:
        raise WindowCodecError(
            f"window codec version {version} is not supported (this reader knows "
            f"{_EXACT_CODEC_VERSION} to {WINDOW_CODEC_VERSION}); upgrade the reader"
        )
    if len(data) < header:
        raise WindowCodecError("window is truncated in its header")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        body = decompressor.decompress(data[header:], MAX_BODY_BYTES)
    except lzma.LZMAError as exc:
        raise WindowCodecError(f"window body is corrupt: {exc}") from None
    if not decompressor.eof:
        if len(body) >= MAX_BODY_BYTES:
            raise WindowCodecError(f"window body is larger than {MAX_BODY_BYTES} bytes")
        raise WindowCodecError("window body is truncated")
    if decompressor.unused_data:
        raise WindowCodecError("window has trailing bytes after its body")
    (checksum,) = _CRC.unpack(data[len(WINDOW_MAGIC) + 1 : header])
    if zlib.crc32(body) != checksum:
        raise WindowCodecError("window body is corrupt: its CRC-32 does not match")
    return version, body


def _read_body(body: bytes, version: int, read_features: _FeatureReader) -> WindowSummary:
    """The window in ``body``, its features read by ``read_features``.

    Raises :class:`WindowCodecError`, or pydantic's ``ValidationError`` for
    values that do not make a valid window.
    """
    r = _Reader(body)
    window_id, device_id, model_name, model_version, baseline_id = (
        r.required_text() for _ in range(5)
    )
    cohort_id, plan_id = r.text(), r.text()
    start, end = r.f64(), r.f64()
    requests, errors = r.uint(), r.uint()
    unsummarised = r.uint() if version >= 2 else 0
    sections = _read_sections(r, version) if version >= 4 else 0
    beyond = version == _BEYOND_CODEC_VERSION or bool(sections & _SECTION_BEYOND)
    served = {stage: r.uint() for stage in STAGE_NAMES}
    latency = _read_latency(r)
    scores = _read_scores(r)
    features = read_features(r, beyond)
    shadow = _read_shadow(r) if sections & _SECTION_SHADOW else None
    hybrid = _read_hybrid(r) if sections & _SECTION_HYBRID else None
    if r.pos != len(body):
        last = (
            "the hybrid section"
            if hybrid is not None
            else "the shadow section"
            if shadow is not None
            else "the last feature"
        )
        raise WindowCodecError(f"{len(body) - r.pos} unexpected bytes after {last}")
    return WindowSummary(
        window_id=window_id,
        device_id=device_id,
        model_name=model_name,
        model_version=model_version,
        baseline_id=baseline_id,
        cohort_id=cohort_id,
        plan_id=plan_id,
        start=start,
        end=end,
        requests=requests,
        errors=errors,
        unsummarised_requests=unsummarised,
        served=served,
        features=features,
        scores=scores,
        latency_ms=latency,
        shadow=shadow,
        hybrid=hybrid,
    )


def _read_sections(r: _Reader, version: int) -> int:
    """The sections byte: version 4 always has its shadow section, version 5 its hybrid one."""
    sections = r.byte()
    if sections & ~(_SECTIONS_V5 if version >= 5 else _SECTIONS):
        raise WindowCodecError(f"unknown window sections {sections:#x}")
    if version == _SHADOW_CODEC_VERSION and not sections & _SECTION_SHADOW:
        raise WindowCodecError("a version 4 window without its shadow section")
    if version >= 5 and not sections & _SECTION_HYBRID:
        raise WindowCodecError("a version 5 window without its hybrid section")
    return sections
