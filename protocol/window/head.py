"""A window's head read in one pass: what ingest reads of a window, without pydantic on its way.

Ingest stores a window as received and folds its counts, latency, scores and
sections into aggregates; none of that reads a feature (see
:func:`decode_window_head`). The head of the usual window is read here by one
function over the body with local variables (a one-byte varint is one index
and one comparison), checked in plain Python against everything
:class:`~protocol.window.model.WindowSummary` and its parts would check, and
made without validating it again. What this reader is not sure of, it does
not decide: any bytes it cannot vouch for go to the reference path of
:mod:`protocol.window.codec`, which reads them again and either accepts them
(then with the same values) or refuses them in its own words.
"""

from __future__ import annotations

import math
import operator
import re
import struct
from typing import Any, Final, TypeVar

from pydantic import BaseModel

from protocol.histogram import MAX_SCALE, MIN_SCALE, ExponentialHistogram
from protocol.inference import STAGE_NAMES
from protocol.summary import ScoreHistogram
from protocol.window.codec import (
    _ABSENT,
    _BEYOND_CODEC_VERSION,
    _CONSTANT,
    _HAS_LATENCY,
    _HAS_VALUES,
    _HEXBYTES,
    _NEGATIVE,
    _SECTION_BEYOND,
    _SECTION_HYBRID,
    _SECTION_SHADOW,
    _SECTIONS,
    _SECTIONS_V5,
    _SHA256,
    _SHADOW_CODEC_VERSION,
    _UTF8,
    _WIDE,
    _ZIGZAG,
    _ZIGZAG_PLUS_64,
    MAX_BINS,
    MAX_FEATURES,
    _check_features_in_bulk,
    _open,
    _read_body,
    _read_hybrid,
    _read_shadow,
    _Reader,
    _Unsure,
    decode_window,
)
from protocol.window.model import WindowSummary

# What WindowSummary's ids allow (pydantic's pattern is anchored at both ends, its
# length 1 to 128): an id is ASCII, so its characters are its bytes.
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}").fullmatch
_NAME_CHARS: Final = 128
# Varints this reader takes; a larger one (never seen) is left to the reference path.
_INT_LIMIT: Final = 1 << 63
_TWO_F64: Final = struct.Struct("<2d")
_THREE_F64: Final = struct.Struct("<3d")
# The served stages kept: those that served a request (the window's validator drops the rest).
_COUNT: Final = operator.itemgetter(1)
# The flags of a feature with none of its own counts, by whether the window's rows are
# more than 0 (a feature then has values): bytes.translate deletes them, leaving the others.
_PLAIN_FLAGS: Final = {
    True: bytes(_HAS_VALUES | c | w for c in (0, _CONSTANT) for w in (0, _WIDE)),
    False: bytes(c | w for c in (0, _CONSTANT) for w in (0, _WIDE)),
}
# A float32's high byte (sign and the exponent's high bits) translated to 0x80, which
# bytes.isascii finds, when those bits are all ones: the value is huge or not finite.
_HUGE: Final = bytes(0x80 if b & 0x7F == 0x7F else 0 for b in range(256))
_WINDOW_FIELDS: Final = frozenset(WindowSummary.model_fields) - {"schema_version"}
_HISTOGRAM_FIELDS: Final = frozenset(ExponentialHistogram.model_fields)
_SCORE_FIELDS: Final = frozenset(ScoreHistogram.model_fields)

_Model = TypeVar("_Model", bound=BaseModel)


def decode_window_head(data: bytes) -> WindowSummary:
    """The window in ``data`` without its features (``features`` empty), once everything
    :func:`~protocol.window.decode_window` checks has passed, the features included.

    For a reader that keeps the bytes and needs only the rest of the window:
    ingest stores a window as received and folds its counts, latency, scores
    and sections into aggregates, none of which reads a feature, so making a
    pydantic summary per feature there would be work thrown away. The usual
    window is read in one pass (:func:`_read_head`); bytes it cannot vouch for
    are read with the features checked in bulk and the rest validated by
    pydantic, and what that cannot vouch for goes to
    :func:`~protocol.window.decode_window`: it raises the same
    :class:`~protocol.window.WindowCodecError` for what it refuses, and what it
    accepts is returned without its features. So this accepts and refuses
    exactly what :func:`~protocol.window.decode_window` does, and returns its
    window with ``features=[]``.
    """
    version, body = _open(data)
    try:
        return _read_head(body, version)
    except (_Unsure, ValueError, IndexError, OverflowError, struct.error):
        pass  # ValueError covers a string that is not UTF-8
    try:
        return _read_body(body, version, _check_features_in_bulk)
    except (_Unsure, ValueError, IndexError, OverflowError):
        pass
    return decode_window(data).model_copy(update={"features": []})


def _read_head(body: bytes, version: int) -> WindowSummary:
    """The head of the window in ``body``; :class:`_Unsure` (or an ``IndexError`` or
    ``ValueError`` of the bytes) for anything the reference path must read.

    It makes the window the reference path makes, field for field and with
    the same fields set, and checks what pydantic would check of it: the ids'
    pattern and length, the names' length, finite times in order, no more
    unsummarised requests than requests, the latency histogram's scale, sum,
    min and max and that it holds values, and the features as
    :func:`_check_uniform_features` or the bulk check does. The shadow and
    hybrid sections are read and validated as the reference path reads them.
    """
    data = body
    window_id, pos = _id_at(data, 0)
    device_id, pos = _id_at(data, pos)
    model_name, pos = _text_at(data, pos)
    model_version, pos = _text_at(data, pos)
    baseline_id, pos = _id_at(data, pos)
    cohort_id, pos = _id_at(data, pos)
    plan_id, pos = _id_at(data, pos)
    if not (
        window_id is not None
        and device_id is not None
        and baseline_id is not None
        and model_name
        and model_version
        and len(model_name) <= _NAME_CHARS
        and len(model_version) <= _NAME_CHARS
    ):
        raise _Unsure
    start, end = _TWO_F64.unpack_from(data, pos)
    if not 0.0 <= start <= end < math.inf:
        raise _Unsure
    counts, pos = _uints_at(data, pos + 16, 3 if version >= 2 else 2)
    requests, errors, unsummarised = counts if version >= 2 else (*counts, 0)
    if unsummarised > requests:
        raise _Unsure
    sections = 0
    if version >= 4:
        sections = data[pos]
        pos += 1
        if (
            sections & ~(_SECTIONS_V5 if version >= 5 else _SECTIONS)
            or (version == _SHADOW_CODEC_VERSION and not sections & _SECTION_SHADOW)
            or (version >= 5 and not sections & _SECTION_HYBRID)
        ):
            raise _Unsure
    beyond = version == _BEYOND_CODEC_VERSION or bool(sections & _SECTION_BEYOND)
    served_counts, pos = _uints_at(data, pos, len(STAGE_NAMES))
    served = dict(filter(_COUNT, zip(STAGE_NAMES, served_counts, strict=True)))
    latency, pos = _latency_at(data, pos)
    scores, pos = _scores_at(data, pos)
    r = _Reader(data)
    r.pos = pos
    if not _check_uniform_features(r, beyond):
        r.pos = pos
        _check_features_in_bulk(r, beyond)
    shadow = _read_shadow(r) if sections & _SECTION_SHADOW else None
    hybrid = _read_hybrid(r) if sections & _SECTION_HYBRID else None
    if r.pos != len(data):
        raise _Unsure
    return _made(
        WindowSummary,
        {
            "schema_version": 1,
            "window_id": window_id,
            "device_id": device_id,
            "model_name": model_name,
            "model_version": model_version,
            "baseline_id": baseline_id,
            "start": start,
            "end": end,
            "requests": requests,
            "errors": errors,
            "unsummarised_requests": unsummarised,
            "served": served,
            "features": [],
            "scores": scores,
            "latency_ms": latency,
            "cohort_id": cohort_id,
            "plan_id": plan_id,
            "shadow": shadow,
            "hybrid": hybrid,
        },
        _WINDOW_FIELDS,
    )


def _made(cls: type[_Model], values: dict[str, Any], fields_set: frozenset[str]) -> _Model:
    """An instance of ``cls`` holding ``values``, which were checked as its validation checks.

    This is what pydantic's ``model_construct`` makes (the same ``__dict__``
    in the order of the fields, the fields set, no extra or private values),
    without its loop over the fields; it holds for models without a
    ``model_post_init``, extra values or private attributes, as the window's are.
    """
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    object.__setattr__(model, "__pydantic_fields_set__", set(fields_set))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


def _uints_at(data: bytes, pos: int, count: int) -> tuple[list[int], int]:
    """``count`` varints from ``pos`` as :meth:`_Reader.uints` reads them, and where they end."""
    out: list[int] = []
    append = out.append
    for _ in range(count):
        value = data[pos]
        pos += 1
        if value >= 0x80:  # a longer varint: up to 64 bits, as the reference reads it
            value &= 0x7F
            shift = 7
            while True:
                b = data[pos]
                pos += 1
                value |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise _Unsure
            if value >= _INT_LIMIT:
                raise _Unsure
        append(value)
    return out, pos


def _id_at(data: bytes, pos: int) -> tuple[str | None, int]:
    """The id at ``pos`` (``None`` if absent), checked as the window checks its ids, and
    where it ends."""
    kind = data[pos]
    if kind == _HEXBYTES:  # hex digits: an id when there are 1 to 128 of them
        size = data[pos + 1]
        end = pos + 2 + size
        if not 0 < size <= _NAME_CHARS // 2 or end > len(data):
            raise _Unsure
        return data[pos + 2 : end].hex(), end
    value, end = _text_at(data, pos)
    if kind != _SHA256 and value is not None and not _ID(value):  # sha256: is an id
        raise _Unsure
    return value, end


def _text_at(data: bytes, pos: int) -> tuple[str | None, int]:
    """The string at ``pos`` as :meth:`_Reader.text` reads it, and where it ends.

    A string of 128 bytes or more is left to the reference path: no id is
    that long, and a name rarely.
    """
    kind = data[pos]
    if kind == _SHA256:
        end = pos + 33
        if end > len(data):
            raise _Unsure
        return "sha256:" + data[pos + 1 : end].hex(), end
    if kind == _ABSENT:
        return None, pos + 1
    size = data[pos + 1]
    start = pos + 2
    end = start + size
    if size >= 0x80 or end > len(data):
        raise _Unsure
    if kind == _UTF8:
        return data[start:end].decode(), end
    if kind == _HEXBYTES:
        return data[start:end].hex(), end
    raise _Unsure


def _latency_at(data: bytes, pos: int) -> tuple[ExponentialHistogram, int]:
    """The latency histogram at ``pos``, checked as its model checks it, and where it ends."""
    flags = data[pos]
    if flags == 0:
        empty = {
            "scale": MAX_SCALE,
            "zero_count": 0,
            "offset": 0,
            "counts": [],
            "sum": 0.0,
            "min": None,
            "max": None,
        }
        return _made(ExponentialHistogram, empty, frozenset()), pos + 1
    if flags != _HAS_LATENCY:
        raise _Unsure
    (z_scale, zero_count, z_offset, size), pos = _uints_at(data, pos + 1, 4)
    if size > MAX_BINS or z_scale >= 0x80:
        raise _Unsure
    scale = _ZIGZAG[z_scale]
    offset = (z_offset >> 1) if not z_offset & 1 else -((z_offset + 1) >> 1)
    run = data[pos : pos + size]
    if len(run) == size and run.isascii():  # the usual: every count one byte
        counts = list(run)
        pos += size
    else:
        counts, pos = _uints_at(data, pos, size)
    total, low, high = _THREE_F64.unpack_from(data, pos)
    if not (
        MIN_SCALE <= scale <= MAX_SCALE
        and 0.0 <= total < math.inf
        and 0.0 <= low <= high < math.inf
        and (zero_count or any(counts))
    ):
        raise _Unsure
    values = {
        "scale": scale,
        "zero_count": zero_count,
        "offset": offset,
        "counts": counts,
        "sum": total,
        "min": low,
        "max": high,
    }
    return _made(ExponentialHistogram, values, _HISTOGRAM_FIELDS), pos + 24


def _scores_at(data: bytes, pos: int) -> tuple[ScoreHistogram | None, int]:
    """The score histogram at ``pos`` (rows of one length, no count negative), and where it ends.

    Fewer than 127 classes of fewer than 128 bins are read here, each row's
    run of one-byte counts as one slice; others go to the reference path.
    """
    size = data[pos]
    if size == 0:
        return None, pos + 1
    bins = data[pos + 1]
    if size >= 0x80 or bins >= 0x80:
        raise _Unsure
    pos += 2
    classes: list[str] = []
    for _ in range(size - 1):
        name, pos = _text_at(data, pos)
        if name is None:
            raise _Unsure
        classes.append(name)
    counts: list[list[int]] = []
    for _ in classes:
        first = data[pos]
        length = data[pos + 1]
        pos += 2
        if first + length > bins:  # neither is 128 or more: bins is not
            raise _Unsure
        run = data[pos : pos + length]
        row = [0] * bins
        if len(run) == length and run.isascii():  # the usual: every count one byte
            row[first : first + length] = run
            pos += length
        else:
            row[first : first + length], pos = _uints_at(data, pos, length)
        counts.append(row)
    return _made(ScoreHistogram, {"classes": classes, "counts": counts}, _SCORE_FIELDS), pos


def _check_uniform_features(r: _Reader, beyond: bool) -> bool:
    """Check the usual features in a few calls for all of them, and move ``r`` past them;
    ``False`` for features this cannot vouch for (the bulk check then reads them).

    The usual features have no counts of their own (no NaN, none out of
    range or beyond the baseline, the window's rows and bins), every bin
    count a one-byte varint, and float32 values: each is then its flags byte
    and ``bins - 1`` bytes of counts, and the features are ``features * bins``
    bytes followed by the float planes. What
    :func:`~protocol.window.codec._check_features_in_bulk` checks is checked
    over that slice at once: the flags (bytes.translate deletes the allowed
    ones), one-byte varints (its ``max``), no negative count (its ``min``,
    translated to zigzag values plus 64; a flags byte translates to 64 or
    more, which never lowers it below what a count may be), the last count,
    implied by ``n``, not negative (a sum per feature), finite floats (no
    float32 whose high byte has its exponent bits all ones) and ``m2 >= 0``
    (its sign bit clear). A negative zero, a huge or non-finite value or a
    float64 feature is left to the bulk check. ``beyond`` needs nothing more:
    a feature without counts of its own has none beyond the baseline.
    """
    data = r.data
    (count, rows, bins), pos = _uints_at(data, r.pos, 3)
    if not (0 < count <= MAX_FEATURES and 0 < bins <= MAX_BINS):
        return False
    end = pos + count * bins
    section = data[pos:end]
    flags = section[::bins]
    if len(section) != count * bins or flags.translate(None, _PLAIN_FLAGS[rows > 0]):
        return False
    if not section.isascii():
        return False
    if bins > 1:
        expected = rows // bins
        if expected < 64 and not section.translate(_NEGATIVE[expected]).isascii():
            return False
        # A feature's counts but the last (their zigzag values plus 64 in a row of
        # ``shifted`` after its flags) sum to at most ``rows``: the last is the rest.
        shifted = section.translate(_ZIGZAG_PLUS_64)
        limit = rows - (expected - 64) * (bins - 1)
        runs = map(slice, range(1, count * bins, bins), range(bins, count * bins + 1, bins))
        if max(map(sum, map(shifted.__getitem__, runs))) > limit:
            return False
    narrow = 0
    m2_at: list[int] | None = None  # where each m2 lies; None: every fourth float
    if rows and flags.count(_HAS_VALUES) != count:
        m2_at = []
        for f in flags:
            if f & _WIDE:
                return False
            if f & _CONSTANT:
                narrow += 1
            else:
                m2_at.append(narrow + 3)
                narrow += 4
    elif rows:  # every feature sends min, max, mean and m2 as float32
        narrow = 4 * count
    planes = data[end : end + 4 * narrow]
    if len(planes) != 4 * narrow:
        return False
    if narrow:
        high = planes[3 * narrow :]  # each float's sign and the high bits of its exponent
        m2_high = high[3::4] if m2_at is None else bytes(map(high.__getitem__, m2_at))
        if not (high.translate(_HUGE).isascii() and m2_high.isascii()):  # m2 has no sign bit
            return False
    r.pos = end + 4 * narrow
    return True
