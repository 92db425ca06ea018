"""A request body's JSON structure, read before the body is parsed.

Parsing JSON costs memory per array and object far more than per byte (an
array ``[0]`` is 3 bytes of body and, parsed, a list of about 200 bytes across
the parser's tree and Python's objects), so what a body will cost cannot be
told from its length alone. :func:`scan_structure` reads the body's bytes with
numpy, in fixed-size pieces, and tells how deep its arrays and objects nest and
how many there are, without building anything per element: brackets inside
strings (after an unescaped ``"``, up to the next) are not structure.

It does not check that the body is valid JSON — the parser does that — but
what it counts is what the parser would build: for any valid body, the counts
are exact; for an invalid one, the parser stops at the first error anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

_PIECE: Final = 32 * 1024  # bytes scanned at a time: about 0.4 MB of numpy temporaries
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN_ARRAY, _OPEN_OBJECT = ord("["), ord("{")
_OPENERS: Final = frozenset((_OPEN_ARRAY, _OPEN_OBJECT))
# +1 for what opens an array or object, -1 for what closes one, 0 for any other byte.
_STEP: Final = np.zeros(256, dtype=np.int8)
_STEP[[_OPEN_ARRAY, _OPEN_OBJECT]] = 1
_STEP[[ord("]"), ord("}")]] = -1
# Bodies up to this size are scanned token by token in Python instead: for a
# request of one small tensor that is a tenth of the numpy passes' fixed cost.
_SMALL: Final = 2048
# What the small-body scan looks at, as the numpy scan reads it: a pair of
# backslashes escapes nothing after it, a backslash before a quote makes it no
# quote, a lone backslash escapes nothing that counts (a bracket after it is
# still a bracket, as in the numpy scan), and quotes and brackets.
# Every byte but the brackets, for bytes.translate to delete.
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_TOKENS: Final = re.compile(rb'\\\\|\\"|\\|["\[\]{}]')


@dataclass(frozen=True)
class JsonStructure:
    """What a body's JSON is made of: arrays, objects, and how deep they nest.

    ``depth`` is the deepest nesting of arrays and objects seen (``{"a": [1]}``
    is 2); when the scan stopped early at ``max_depth``, it is ``max_depth + 1``
    and the counts are of the part scanned.
    """

    depth: int
    arrays: int
    objects: int


def scan_structure(
    body: bytes | bytearray, max_depth: int, *, piece_bytes: int = _PIECE
) -> JsonStructure:
    """How deep ``body``'s arrays and objects nest, and how many there are.

    Stops as soon as the nesting is deeper than ``max_depth``. Costs a few
    numpy passes over the body and a fixed amount of memory, whatever its
    shape: it reads ``piece_bytes`` at a time. A body within one piece and
    :data:`_SMALL` bytes is read token by token instead, with the same result.
    """
    if len(body) <= min(_SMALL, piece_bytes):
        return _scan_small(body, max_depth)
    return _scan_pieces(body, max_depth, piece_bytes)


def _scan_pieces(body: bytes | bytearray, max_depth: int, piece_bytes: int) -> JsonStructure:
    """:func:`scan_structure` with numpy, ``piece_bytes`` at a time."""
    view = memoryview(body)
    depth = deepest = arrays = objects = 0
    in_string = False
    backslashes = 0  # backslashes ending the previous piece (an odd run escapes what follows)
    try:
        for start in range(0, len(view), piece_bytes):
            piece = np.frombuffer(view[start : start + piece_bytes], dtype=np.uint8)
            outside: npt.NDArray[np.bool_] | None = None
            quotes = piece == _QUOTE
            if in_string or quotes.any():
                real = quotes
                if backslashes or (piece == _BACKSLASH).any():
                    real = quotes & ~_escaped(piece, backslashes)
                backslashes = _trailing_backslashes(piece, backslashes)
                opened = np.cumsum(real, dtype=np.int32)
                opened += in_string
                outside = (opened & 1) == 0  # a closing quote counts as outside: it is no bracket
                in_string = bool(opened[-1] & 1)
                del opened, real
            else:
                backslashes = _trailing_backslashes(piece, backslashes)
            steps = _STEP[piece]
            if outside is not None:
                steps[~outside] = 0
            arrays += int(np.count_nonzero((piece == _OPEN_ARRAY) & (steps == 1)))
            objects += int(np.count_nonzero((piece == _OPEN_OBJECT) & (steps == 1)))
            depths = np.cumsum(steps, dtype=np.int32)
            depths += depth
            deepest = max(deepest, int(depths.max()))
            depth = int(depths[-1])
            del piece, steps, depths, outside, quotes
            if deepest > max_depth:
                return JsonStructure(max_depth + 1, arrays, objects)
    finally:
        view.release()
    return JsonStructure(deepest, arrays, objects)


def _scan_small(body: bytes | bytearray, max_depth: int) -> JsonStructure:
    """:func:`scan_structure` of a body within one piece, the same counts without numpy."""
    if _BACKSLASH not in body:
        return _scan_plain(body, max_depth)
    depth = deepest = arrays = objects = 0
    in_string = False
    for token in _TOKENS.findall(body):
        if token == b'"':
            in_string = not in_string
        elif in_string or token[0] == _BACKSLASH:
            continue
        elif token == b"[":
            arrays += 1
            depth += 1
        elif token == b"{":
            objects += 1
            depth += 1
        else:
            depth -= 1
        if depth > deepest:
            deepest = depth
    if deepest > max_depth:
        return JsonStructure(max_depth + 1, arrays, objects)
    return JsonStructure(deepest, arrays, objects)


def _scan_plain(body: bytes | bytearray, max_depth: int) -> JsonStructure:
    """:func:`_scan_small` of a body without a backslash: every quote opens or closes a string.

    What lies outside strings is every other piece between quotes; of that, only
    the brackets are walked one by one.
    """
    outside = b"".join(body.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    if len(brackets) <= _KNOWN_BRACKETS:
        return _plain_structure(brackets, max_depth)
    return _bracket_structure(brackets, max_depth)


# Requests of one shape have the same brackets outside their strings: a structure
# is worked out once for each sequence of up to this many brackets.
_KNOWN_BRACKETS: Final = 64


@lru_cache(maxsize=256)
def _plain_structure(brackets: bytes, max_depth: int) -> JsonStructure:
    return _bracket_structure(brackets, max_depth)


def _bracket_structure(brackets: bytes, max_depth: int) -> JsonStructure:
    """The structure of a body whose brackets outside strings are ``brackets``, in order."""
    depth = deepest = 0
    for byte in brackets:
        if byte in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    arrays, objects = brackets.count(b"["), brackets.count(b"{")
    if deepest > max_depth:
        return JsonStructure(max_depth + 1, arrays, objects)
    return JsonStructure(deepest, arrays, objects)


def _escaped(piece: npt.NDArray[np.uint8], carried: int) -> npt.NDArray[np.bool_]:
    """Which bytes of ``piece`` follow an odd run of backslashes (``carried`` ran into it)."""
    runs = _backslash_runs(piece, carried)
    escaped = np.empty(len(piece), dtype=np.bool_)
    escaped[0] = bool(carried & 1)
    escaped[1:] = (runs[:-1] & 1).astype(np.bool_)
    return escaped


def _backslash_runs(piece: npt.NDArray[np.uint8], carried: int) -> npt.NDArray[np.int32]:
    """For each byte, the run of backslashes ending at it (0 for any other byte)."""
    index = np.arange(len(piece), dtype=np.int32)
    is_backslash = piece == _BACKSLASH
    last_other = np.where(is_backslash, np.int32(-1), index)
    np.maximum.accumulate(last_other, out=last_other)
    runs: npt.NDArray[np.int32] = index - last_other
    if carried:
        runs[last_other == -1] += carried
    return runs


def _trailing_backslashes(piece: npt.NDArray[np.uint8], carried: int) -> int:
    """The run of backslashes the piece ends with, counting one ``carried`` into it."""
    if len(piece) == 0 or piece[-1] != _BACKSLASH:
        return 0
    others = np.flatnonzero(piece != _BACKSLASH)
    if len(others) == 0:
        return carried + len(piece)
    return len(piece) - 1 - int(others[-1])
