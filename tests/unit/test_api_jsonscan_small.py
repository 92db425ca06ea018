"""The small-body scan of a request's JSON structure against the numpy scan, byte for byte."""

from __future__ import annotations

import json
import random

import pytest

from agent.api import jsonscan
from agent.api.admission import MAX_JSON_DEPTH
from agent.api.jsonscan import JsonStructure, scan_structure

# Every byte the scans treat specially, and some they do not.
ALPHABET = b'[]{}"\\ a,1\n'


def both(body: bytes, max_depth: int) -> tuple[JsonStructure, JsonStructure]:
    """The small-body scan's result and the numpy scan's, the body in one piece."""
    return (
        jsonscan._scan_small(body, max_depth),
        jsonscan._scan_pieces(body, max_depth, piece_bytes=max(1, len(body))),
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_small_scan_agrees_with_the_numpy_scan_on_any_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3000):
        body = bytes(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 80)))
        max_depth = rng.choice([0, 1, 2, 3, MAX_JSON_DEPTH])
        small, pieces = both(body, max_depth)
        assert small == pieces, body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", JsonStructure(0, 0, 0)),
        (b"]]}", JsonStructure(0, 0, 0)),
        (b'{"a": [1, 2]}', JsonStructure(2, 1, 1)),
        (b'["[{", "\\"[", "\\\\", []]', JsonStructure(2, 2, 0)),  # brackets in strings
        (b'["\\\\\\"[", 1]', JsonStructure(1, 1, 0)),  # an odd run escapes the quote
        (b'["\\\\"[]', JsonStructure(2, 2, 0)),  # an even run does not
        (b"\\[", JsonStructure(1, 1, 0)),  # a backslash escapes no bracket
        (b'["unterminated [{', JsonStructure(1, 1, 0)),
        (b"[" * 40 + b"]" * 40, JsonStructure(MAX_JSON_DEPTH + 1, 40, 0)),
    ],
)
def test_the_small_scan_reads_strings_escapes_and_depth_like_the_numpy_scan(
    body: bytes, expected: JsonStructure
) -> None:
    assert both(body, MAX_JSON_DEPTH) == (expected, expected)
    assert scan_structure(body, MAX_JSON_DEPTH) == expected


def test_request_bodies_either_side_of_the_small_limit_are_counted_exactly() -> None:
    row = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    small = json.dumps({"inputs": [row]}).encode()
    large = json.dumps({"inputs": [row] * 200}).encode()
    assert len(small) <= jsonscan._SMALL < len(large)
    assert scan_structure(small, MAX_JSON_DEPTH) == JsonStructure(4, 3, 2)
    assert scan_structure(large, MAX_JSON_DEPTH) == JsonStructure(4, 401, 201)


@pytest.mark.parametrize("seed", range(2))
def test_a_body_without_a_backslash_is_scanned_alike(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3000):
        body = bytes(rng.choice(ALPHABET.replace(b"\\", b"")) for _ in range(rng.randrange(0, 200)))
        max_depth = rng.choice([0, 1, 2, 3, MAX_JSON_DEPTH])
        small, pieces = both(body, max_depth)
        assert small == pieces, body
