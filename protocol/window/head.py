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
    _BEYOND,
    _BEYOND_CODEC_VERSION,
    _CONSTANT,
    _FEATURE_FLAGS,
    _FEATURE_FLAGS_V3,
    _HAS_LATENCY,
    _HAS_NAN,
    _HAS_OUT_OF_RANGE,
    _HAS_VALUES,
    _HEXBYTES,
    _NEGATIVE,
    _OWN_BINS,
    _OWN_COUNTS,
    _OWN_ROWS,
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
# The flags of a usual feature (none of its own counts, values exactly when the window's
# rows are more than 0), by whether they are: translated to 0, every other flags byte to 0x80.
_ODD_FLAGS: Final = {
    has_rows: bytes(
        0 if b & ~(_CONSTANT | _WIDE) == (_HAS_VALUES if has_rows else 0) else 0x80
        for b in range(256)
    )
    for has_rows in (True, False)
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
    :func:`_check_features_at_once` or the bulk check does. The shadow and
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
    if not _check_features_at_once(r, beyond):
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


def _check_features_at_once(r: _Reader, beyond: bool) -> bool:
    """Check the features a run of usual ones at a time, and move ``r`` past them; ``False``
    for features this cannot vouch for (the bulk check then reads them).

    A usual feature has no counts of its own (no NaN, none out of range or
    beyond the baseline, the window's rows and bins), and a run of them is
    ``features * bins`` bytes: each feature's flags byte and ``bins - 1``
    bytes of counts. What :func:`~protocol.window.codec._check_features_in_bulk`
    checks is checked over such a run at once: its flags (every ``bins``-th
    byte) are all usual ones, every varint is one byte (``isascii``), no count
    is negative (the bytes translated through a table that marks those whose
    count would be), and the last count, implied by ``n``, is not negative (a
    sum per feature). A feature with counts of its own ends a run and is
    checked by itself the same way. Then the floats: none non-finite (no
    float32 whose high byte has its exponent bits all ones) and ``m2 >= 0``
    (its sign bit clear). A count or a float that is not one byte or float32,
    a negative zero, a huge value, are left to the bulk check.
    """
    data = r.data
    (count, rows, bins), pos = _uints_at(data, r.pos, 3)
    if not (0 < count <= MAX_FEATURES and 0 < bins <= MAX_BINS):
        return False
    known = _FEATURE_FLAGS_V3 if beyond else _FEATURE_FLAGS
    odd = _ODD_FLAGS[rows > 0]
    narrow = 0
    m2_at: list[int] | None = None  # where each m2 lies among the float32s; None: every 4th
    done = 0
    while done < count:
        # A run of usual features from ``pos``: up to the first flags byte that is not usual.
        flags = data[pos : pos + (count - done) * bins : bins]
        usual = flags.translate(odd).find(0x80)
        usual = len(flags) if usual < 0 else usual
        if usual:
            end = pos + usual * bins
            run = data[pos:end]
            if len(run) != usual * bins or not _counts_fit(run, rows, bins, usual):
                return False
            if m2_at is None and flags.count(_HAS_VALUES, 0, usual) == usual:  # 4 floats each
                narrow += 4 * usual
            else:
                m2_at = list(range(3, narrow, 4)) if m2_at is None else m2_at
                narrow = _tally_floats(flags[:usual], narrow, m2_at)
                if narrow < 0:
                    return False
            pos, done = end, done + usual
        if done == count:
            break
        # A feature with counts of its own, checked by itself.
        flag = data[pos]
        if flag & ~known:
            return False
        nan, k = 0, bins
        pos += 1
        if flag & _HAS_NAN:
            (nan,), pos = _uints_at(data, pos, 1)
        if flag & _HAS_OUT_OF_RANGE:
            _, pos = _uints_at(data, pos, 1)
        n = rows - nan
        if flag & _OWN_ROWS:
            (n,), pos = _uints_at(data, pos, 1)
        if flag & _OWN_BINS:
            (k,), pos = _uints_at(data, pos, 1)
        if flag & _BEYOND:
            (below, above), pos = _uints_at(data, pos, 2)
            if below + above > n:
                return False
        if n < 0 or not 0 < k <= MAX_BINS or bool(flag & _HAS_VALUES) != (n > 0):
            return False
        counts = data[pos : pos + k - 1]
        if len(counts) != k - 1 or not _counts_fit(b"\0" + counts, n, k, 1):  # 0: no flags
            return False
        m2_at = list(range(3, narrow, 4)) if m2_at is None else m2_at
        narrow = _tally_floats(bytes([flag & ~_OWN_COUNTS]), narrow, m2_at)
        if narrow < 0:
            return False
        pos, done = pos + k - 1, done + 1
    planes = data[pos : pos + 4 * narrow]
    if len(planes) != 4 * narrow:
        return False
    if narrow:
        high = planes[3 * narrow :]  # each float's sign and the high bits of its exponent
        m2_high = high[3::4] if m2_at is None else bytes(map(high.__getitem__, m2_at))
        if not (high.translate(_HUGE).isascii() and m2_high.isascii()):
            return False  # m2 has a sign bit, or a value is huge or not finite
    r.pos = pos + 4 * narrow
    return True


def _counts_fit(run: bytes, n: int, bins: int, features: int) -> bool:
    """Whether ``run``, ``features`` rows of a flags byte and ``bins - 1`` one-byte
    varints, holds counts none negative whose sum leaves the last one not negative."""
    if not run.isascii():
        return False
    if bins == 1:
        return True
    expected = n // bins
    # A flags byte (an even number below 0x20, or 0 in its stead) never reads as negative.
    if expected < 64 and not run.translate(_NEGATIVE[expected]).isascii():
        return False
    # Each feature's counts but the last, as zigzag values plus 64 after its flags byte.
    shifted = run.translate(_ZIGZAG_PLUS_64)
    limit = n - (expected - 64) * (bins - 1)
    size = features * bins
    rows = map(slice, range(1, size, bins), range(bins, size + 1, bins))
    return max(map(sum, map(shifted.__getitem__, rows))) <= limit


def _tally_floats(flags: bytes, narrow: int, m2_at: list[int]) -> int:
    """The float32 values after ``narrow`` more for features of ``flags``, each m2's place
    added to ``m2_at``; -1 if a feature sends float64 values."""
    for f in flags:
        if not f & _HAS_VALUES:
            continue
        if f & _WIDE:
            return -1
        if f & _CONSTANT:
            narrow += 1
        else:
            m2_at.append(narrow + 3)
            narrow += 4
    return narrow
