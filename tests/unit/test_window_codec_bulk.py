"""The window decoder's bulk reader against the reference reader, over generated windows.

:func:`protocol.window.decode_window` reads a body with its bin counts a run
of bytes at a time and falls back to the reference reader (value by value)
for anything it cannot vouch for. These tests hold it to the reference: on
many generated windows, valid ones of every codec version and shape and
mutated ones (bytes changed, cut, added, in a correctly framed body so the
mutation reaches the parser), the decoder accepts exactly what the reference
accepts, with an equal window (fields, and which fields were set), and refuses
exactly what it refuses, with the same message. They also check that the bulk
reader itself takes the valid windows, so the speed is not a fallback away.
:func:`protocol.window.decode_window_head` (the window without its features,
which ingest reads) is held to the same: it accepts and refuses what
:func:`~protocol.window.decode_window` does, with the same message, and
returns its window with ``features=[]``.
"""

from __future__ import annotations

import lzma

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from protocol.summary import FeatureSummary
from protocol.window import (
    WindowCodecError,
    WindowSummary,
    codec,
    decode_window,
    decode_window_head,
    encode_window,
)
from tests.support.generated_windows import frame, random_feature, random_window


def _body(data: bytes) -> bytes:
    return lzma.decompress(data[8:], format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)


def _reference(data: bytes) -> WindowSummary | str:
    """What the reference reader makes of ``data``: a window, or the message of its refusal."""
    try:
        version, body = codec._open(data)
        try:
            return codec._read_body(body, version, codec._read_features)
        except ValidationError as exc:
            raise codec._invalid(exc) from None
    except WindowCodecError as exc:
        return f"refused: {exc}"


def _decoded(data: bytes) -> WindowSummary | str:
    try:
        return decode_window(data)
    except WindowCodecError as exc:
        return f"refused: {exc}"


def _fields_set(model: BaseModel) -> object:
    """Which fields were set, all the way down: a decoded window must not differ here either."""
    nested = {
        name: _fields_set(value)
        if isinstance(value, BaseModel)
        else [_fields_set(v) for v in value]
        if isinstance(value, list) and value and isinstance(value[0], BaseModel)
        else None
        for name, value in model
    }
    return (sorted(model.model_fields_set), nested)


def _head(data: bytes) -> WindowSummary | str:
    try:
        return decode_window_head(data)
    except WindowCodecError as exc:
        return f"refused: {exc}"


def _assert_same(data: bytes) -> WindowSummary | str:
    expected, got, head = _reference(data), _decoded(data), _head(data)
    if isinstance(expected, str) or isinstance(got, str) or isinstance(head, str):
        assert got == expected
        assert head == expected
    else:
        assert got == expected
        assert got.model_dump() == expected.model_dump()
        assert _fields_set(got) == _fields_set(expected)
        headless = expected.model_copy(update={"features": []})
        assert head == headless
        assert _fields_set(head) == _fields_set(headless)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_valid_windows_decode_as_the_reference_reads_them_and_through_the_bulk_reader(
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    versions: set[int] = set()
    for _ in range(150):
        window = random_window(rng)
        data = encode_window(window)
        versions.add(data[3])
        got = _assert_same(data)
        assert isinstance(got, WindowSummary)
        # The codec keeps counts exactly: the window read back is the window written,
        # but for the float32 moments (mean, m2) of narrow features.
        assert got.model_dump(exclude={"features"}) == window.model_dump(exclude={"features"})
        assert [f.counts for f in got.features] == [f.counts for f in window.features]
        # And the bulk reader and check, not the fallback, read it.
        version, body = codec._open(data)
        assert codec._read_body(body, version, codec._read_features_in_bulk) == got
        head = codec._read_body(body, version, codec._check_features_in_bulk)
        assert head == got.model_copy(update={"features": []})
    assert versions == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("seed", range(4))
def test_mutated_windows_are_refused_or_read_exactly_as_the_reference_does(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(60):
        data = encode_window(random_window(rng))
        body, version = _body(data), data[3]
        for _ in range(12):
            mutated = bytearray(body)
            kind = rng.integers(0, 5)
            if kind == 0:  # a few bytes changed anywhere
                for i in rng.integers(0, len(body), int(rng.integers(1, 4))):
                    mutated[int(i)] = int(rng.integers(0, 256))
            elif kind == 1:  # one bit flipped
                i = int(rng.integers(0, len(body)))
                mutated[i] ^= 1 << int(rng.integers(0, 8))
            elif kind == 2:  # cut short
                del mutated[int(rng.integers(0, len(body))) :]
            elif kind == 3:  # bytes added
                at = int(rng.integers(0, len(body) + 1))
                mutated[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 4))).tolist())
            else:  # a byte given its continuation bit, or its version changed
                i = int(rng.integers(0, len(body)))
                mutated[i] |= 0x80
                version = int(rng.integers(1, 6)) if rng.random() < 0.3 else version
            got = _assert_same(frame(bytes(mutated), version))
            outcomes["refused" if isinstance(got, str) else "read"] += 1
    # Both outcomes happen often: the mutations test the acceptance and the refusals.
    assert min(outcomes.values()) > 50, outcomes


def test_a_feature_with_long_varints_in_its_run_is_read_value_by_value() -> None:
    rng = np.random.default_rng(7)
    counts = [0] * 10
    counts[3] = 5000
    skewed = FeatureSummary(
        n=5000, nan=0, out_of_range=0, mean=2.0, m2=1.0, min=1.0, max=3.0, counts=counts
    )
    even = random_feature(rng, 10, 5000, counted=False).model_copy(update={"counts": [500] * 10})
    window = random_window(np.random.default_rng(3)).model_copy(
        update={"features": [even, skewed, even], "shadow": None, "hybrid": None}
    )
    data = encode_window(window)
    got = _assert_same(data)
    assert isinstance(got, WindowSummary)
    assert [f.counts for f in got.features] == [[500] * 10, counts, [500] * 10]


def test_a_feature_the_window_cannot_hold_is_refused_by_the_head_reader_too() -> None:
    window = random_window(np.random.default_rng(11))
    fine = FeatureSummary(
        n=10,
        nan=0,
        out_of_range=0,
        mean=2.0,
        m2=1.0,
        min=1.0,
        max=3.0,
        counts=[5, 5],
        below_baseline=0,
        above_baseline=0,
    )
    # Made unchecked: what a faulty device could send.
    negative_m2 = FeatureSummary.model_construct(**{**fine.model_dump(), "m2": -1.0})
    too_many_beyond = FeatureSummary.model_construct(
        **{**fine.model_dump(), "below_baseline": 6, "above_baseline": 5}
    )
    for broken, message in (
        (negative_m2, r"invalid at features\.1\.m2: .*greater than"),
        (too_many_beyond, "feature 1: 6 values below and 5 above .* of only n = 10"),
    ):
        data = encode_window(window.model_construct(**{**dict(window), "features": [fine, broken]}))
        for read in (decode_window, decode_window_head):
            with pytest.raises(WindowCodecError, match=message):
                read(data)
        assert _head(data) == _reference(data)
