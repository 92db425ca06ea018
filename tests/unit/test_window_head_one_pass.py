"""The one-pass head reader against the reference reader, over generated and mutated windows.

:func:`protocol.window.decode_window_head` reads the usual window in one pass
(:func:`protocol.window.head._read_head`), checks it in plain Python and makes
the window without pydantic validating it; whatever that reader cannot vouch
for goes to the reference path. These tests hold it to the reference reader
(value by value, a pydantic summary per feature): on windows whose features
take the one-pass check (the usual shape: no counts of their own, one-byte
bin counts, float32 values), on windows with an odd feature among them, and
on mutations of both aimed at the feature section (bytes changed, sign bits
set, exponents made all ones, cut, extended), in a correctly framed body so
the mutation reaches the parser, :func:`~protocol.window.decode_window_head`
accepts exactly what the reference accepts, with its window without features
(fields, their order, which fields were set, JSON), and refuses exactly what
it refuses with the same message. Whenever the one-pass reader itself returns
a window, it is that window. And the valid usual windows are read by the
one-pass reader and its uniform check, not by a fallback.
"""

from __future__ import annotations

import lzma
import struct
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from protocol.histogram import ExponentialHistogram
from protocol.summary import FeatureSummary, ScoreHistogram
from protocol.window import (
    WindowCodecError,
    WindowSummary,
    codec,
    decode_window_head,
    encode_window,
    head,
)
from tests.support.generated_windows import frame, random_feature, random_window


def _reference(data: bytes) -> WindowSummary | str:
    """The reference reader's window without its features, or the message of its refusal."""
    try:
        version, body = codec._open(data)
        try:
            window = codec._read_body(body, version, codec._read_features)
        except ValidationError as exc:
            raise codec._invalid(exc) from None
    except WindowCodecError as exc:
        return f"refused: {exc}"
    return window.model_copy(update={"features": []})


def _fields_set(model: BaseModel) -> object:
    nested = {
        name: _fields_set(value) if isinstance(value, BaseModel) else None for name, value in model
    }
    return (sorted(model.model_fields_set), nested)


def _assert_same_window(got: WindowSummary, expected: WindowSummary) -> None:
    assert got == expected
    assert repr(got) == repr(expected)  # the fields in the same order
    assert got.model_dump() == expected.model_dump()
    assert got.model_dump_json() == expected.model_dump_json()
    assert _fields_set(got) == _fields_set(expected)


def _assert_as_reference(data: bytes) -> WindowSummary | str:
    expected = _reference(data)
    try:
        got: WindowSummary | str = decode_window_head(data)
    except WindowCodecError as exc:
        got = f"refused: {exc}"
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
    else:
        _assert_same_window(got, expected)
    # The one-pass reader alone: what it returns, the reference returns too.
    try:
        version, body = codec._open(data)
        fast = head._read_head(body, version)
    except (codec._Unsure, ValueError, IndexError, OverflowError, struct.error):
        return expected
    assert isinstance(expected, WindowSummary), f"read {fast!r}, the reference says {expected}"
    _assert_same_window(fast, expected)
    return expected


def _usual_feature(rng: np.random.Generator, bins: int, rows: int) -> FeatureSummary:
    """A feature of the usual shape: every row a value, float32 range, now and then constant."""
    if rows == 0:
        return FeatureSummary(n=0, nan=0, out_of_range=0, counts=[0] * bins)
    counts = [int(c) for c in rng.multinomial(rows, rng.dirichlet(np.ones(bins) * 100))]
    low = float(np.float32(rng.normal(0, 1000)))
    if rng.random() < 0.1:
        return FeatureSummary(
            n=rows, nan=0, out_of_range=0, mean=low, m2=0.0, min=low, max=low, counts=counts
        )
    high = float(np.float32(low + rng.exponential(500) + 1))
    return FeatureSummary(
        n=rows,
        nan=0,
        out_of_range=0,
        mean=float(rng.uniform(low, high)),
        m2=float(rng.exponential(1e4)) if rng.random() < 0.95 else 0.0,
        min=low,
        max=high,
        counts=counts,
    )


def _usual_window(rng: np.random.Generator, odd: bool = False) -> WindowSummary:
    """A window of any version and sections whose features are of the usual shape
    (``odd``: but one)."""
    rows = 0 if rng.random() < 0.05 else int(rng.integers(1, 1500))
    bins = int(rng.integers(1, 40))
    features = [_usual_feature(rng, bins, rows) for _ in range(int(rng.integers(1, 40)))]
    if odd:
        features[int(rng.integers(0, len(features)))] = random_feature(rng, bins, rows, False)
    return random_window(rng).model_copy(update={"features": features})


@pytest.mark.parametrize("seed", range(3))
def test_usual_windows_are_read_in_one_pass_as_the_reference_reads_them(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(300 + seed)
    windows = [_usual_window(rng) for _ in range(150)]
    encoded = [encode_window(w) for w in windows]
    for data in encoded:
        assert isinstance(_assert_as_reference(data), WindowSummary)

    # And the one-pass reader with its uniform check took them, not a fallback.
    def no_fallback(*_args: object) -> list[FeatureSummary]:
        raise AssertionError("the features were read by the bulk check")

    monkeypatch.setattr(head, "_check_features_in_bulk", no_fallback)
    uniform = 0
    for window, data in zip(windows, encoded, strict=True):
        usual_counts = all(
            abs(c - f.n // len(f.counts)) < 64 for f in window.features for c in f.counts[:-1]
        )
        if not usual_counts:
            continue  # a long varint among the counts: the bulk check reads it
        uniform += 1
        version, body = codec._open(data)
        expected = _reference(data)
        assert isinstance(expected, WindowSummary)
        _assert_same_window(head._read_head(body, version), expected)
    assert uniform > 100


@pytest.mark.parametrize("seed", range(3))
def test_windows_with_an_odd_feature_are_read_as_the_reference_reads_them(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(400 + seed)
    in_bulk = 0
    check_in_bulk = head._check_features_in_bulk

    def counted(*args: Any) -> list[FeatureSummary]:
        nonlocal in_bulk
        in_bulk += 1
        return check_in_bulk(*args)

    monkeypatch.setattr(head, "_check_features_in_bulk", counted)
    for _ in range(100):
        data = encode_window(_usual_window(rng, odd=True))
        assert isinstance(_assert_as_reference(data), WindowSummary)
    # An odd feature with long varints or float64 values (about 40 % of those generated)
    # sends the features to the bulk check; each window is read twice here.
    assert in_bulk < 2 * 50, in_bulk


def test_features_with_counts_of_their_own_are_checked_in_the_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(17)
    window = _usual_window(rng)
    while not window.features[0].n or len(window.features) < 4:
        window = _usual_window(rng)
    first = window.features[0].model_copy(update={"below_baseline": 0, "above_baseline": 0})
    odd = [
        first.model_copy(update={"nan": 2}),  # its own rows: n + nan is not the window's
        first.model_copy(update={"out_of_range": 5}),
        first.model_copy(update={"below_baseline": 1, "above_baseline": 2}),  # version 3
    ]
    usual = [
        f.model_copy(update={"below_baseline": 0, "above_baseline": 0}) for f in window.features
    ]
    features = [usual[1], odd[0], usual[2], odd[1], odd[2], *usual[3:]]
    data = encode_window(window.model_copy(update={"features": features}))
    assert data[3] == 3 or data[3] >= 4

    def no_fallback(*_args: object) -> list[FeatureSummary]:
        raise AssertionError("the features were read by the bulk check")

    monkeypatch.setattr(head, "_check_features_in_bulk", no_fallback)
    expected = _reference(data)
    assert isinstance(expected, WindowSummary)
    version, body = codec._open(data)
    _assert_same_window(head._read_head(body, version), expected)


def _mutated(rng: np.random.Generator, body: bytes) -> bytes:
    """``body`` with a mutation, mostly in its second half where features lie."""
    mutated = bytearray(body)
    at = int(rng.integers(len(body) // 2, len(body))) if rng.random() < 0.8 else None
    i = at if at is not None else int(rng.integers(0, len(body)))
    kind = rng.integers(0, 7)
    if kind == 0:  # a byte changed
        mutated[i] = int(rng.integers(0, 256))
    elif kind == 1:  # a sign bit or continuation bit set
        mutated[i] |= 0x80
    elif kind == 2:  # a float's high byte made all ones or just below
        mutated[i] = int(rng.choice([0x7F, 0xFF, 0x7E, 0xFE]))
    elif kind == 3:  # one bit flipped
        mutated[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 4:  # a small count made larger or smaller
        mutated[i] = (mutated[i] + int(rng.choice([-2, -1, 1, 2]))) % 256
    elif kind == 5:  # cut short
        del mutated[i:]
    else:  # bytes added
        mutated[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 4))).tolist())
    return bytes(mutated)


@pytest.mark.parametrize("seed", range(3))
def test_mutated_usual_windows_are_refused_or_read_exactly_as_the_reference_does(
    seed: int,
) -> None:
    rng = np.random.default_rng(500 + seed)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(60):
        data = encode_window(_usual_window(rng, odd=bool(rng.random() < 0.2)))
        body = lzma.decompress(data[8:], format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)
        for _ in range(15):
            got = _assert_as_reference(frame(_mutated(rng, body), data[3]))
            outcomes["refused" if isinstance(got, str) else "read"] += 1
    assert min(outcomes.values()) > 50, outcomes


@pytest.mark.parametrize("seed", range(2))
def test_mutated_windows_of_every_shape_are_refused_or_read_as_the_reference_does(
    seed: int,
) -> None:
    rng = np.random.default_rng(600 + seed)
    for _ in range(60):
        data = encode_window(random_window(rng))
        body = lzma.decompress(data[8:], format=lzma.FORMAT_RAW, filters=codec._LZMA_FILTERS)
        for _ in range(10):
            version = int(rng.integers(1, 6)) if rng.random() < 0.1 else data[3]
            _assert_as_reference(frame(_mutated(rng, body), version))


def test_a_head_read_in_one_pass_is_a_window_like_any_other() -> None:
    window = _usual_window(np.random.default_rng(9))
    got = decode_window_head(encode_window(window))
    with pytest.raises(ValidationError):
        got.requests = 1  # type: ignore[misc]  # frozen, as a validated window
    copied = got.model_copy(update={"requests": got.requests + 1})
    assert copied.requests == got.requests + 1
    assert "requests" in copied.model_fields_set
    assert WindowSummary.model_validate(got.model_dump()) == got


def test_negative_zero_and_huge_floats_are_left_to_the_reference_and_read_alike() -> None:
    base = _usual_window(np.random.default_rng(13))
    first = base.features[0]
    features = [
        first.model_copy(update={"m2": -0.0}),  # >= 0, as pydantic holds it
        first.model_copy(update={"min": -3.0e38, "max": 3.0e38, "mean": 0.0}),
        *base.features[1:],
    ]
    for changed in (features[:1], features[1:2]):
        window = base.model_copy(update={"features": changed + base.features[1:]})
        data = encode_window(window)
        assert isinstance(_assert_as_reference(data), WindowSummary)


def test_the_models_made_without_validation_have_nothing_model_construct_would_add() -> None:
    # What head._made makes is what model_construct makes only for such models.
    for model in (WindowSummary, ExponentialHistogram, ScoreHistogram):
        assert model.__pydantic_post_init__ is None
        assert not model.__private_attributes__
        assert model.model_config.get("extra") != "allow"
        assert not model.__pydantic_root_model__
