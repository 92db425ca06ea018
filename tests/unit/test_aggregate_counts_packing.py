"""Histogram cells packed with struct are the bytes numpy packs (``encode_counts``)."""

from __future__ import annotations

import numpy as np
import pytest

from fleet_server.rollouts.aggregates import PAIR, add_counts, decode_counts, encode_counts


def numpy_packed(cells: dict[int, int]) -> bytes:
    return np.array(sorted(cells.items()), dtype=PAIR).tobytes() if cells else b""


def test_cells_pack_as_numpy_packs_them() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        size = int(rng.integers(0, 60))
        top = int(rng.choice([80, 1024 * 20, 65_536]))
        cells = {
            int(i): int(c)
            for i, c in zip(
                rng.integers(0, top, size),
                rng.integers(-(2**63), 2**63 - 1, size, dtype=np.int64),
                strict=True,
            )
        }
        assert encode_counts(cells) == numpy_packed(cells)
        assert decode_counts(encode_counts(cells)) == cells


def test_what_struct_cannot_pack_is_left_to_numpy_as_before() -> None:
    # A count beyond int64 is refused by numpy's own words, as before.
    with pytest.raises(OverflowError):
        encode_counts({1: 2**64})
    with pytest.raises(OverflowError):
        numpy_packed({1: 2**64})


def test_cells_added_to_stored_bytes_are_the_sum_encoded() -> None:
    stored = encode_counts({3: 5, 10: 1})
    assert add_counts(stored, {10: 2, 4: 7}) == encode_counts({3: 5, 4: 7, 10: 3})
    assert add_counts(None, {1: 1}) == encode_counts({1: 1})
    assert add_counts(b"", {}) == b""
