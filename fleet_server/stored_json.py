"""Reading the free-form JSON the database holds, whatever let it in.

Columns such as an event's ``details`` or an audit entry's may hold what an
older version stored before the ingest gate bounded them, or what a hand put
there: text that is not JSON, nesting deeper than any parser or serializer
takes, megabytes. Readers take the column as text and pass it through here:
they get the value, or ``None`` and a sentence saying why it cannot be shown,
never an exception. Writers pass numbers through :func:`finite_or_none`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from protocol.messages import FreeformBounds, freeform_problem

# Text beyond this is not even parsed: no bound of ours lets anything near it in.
MAX_STORED_CHARS = 64 << 20


def finite_or_none(value: float | None) -> float | None:
    """``value``, or ``None`` for an infinity or NaN, which JSON cannot hold."""
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Loaded:
    """A stored value (``None`` for SQL NULL), or ``problem``: why it cannot be read."""

    value: Any
    problem: str | None = None


def load_json(raw: str | bytes | None) -> Loaded:
    """Parse stored JSON text; never raises."""
    if raw is None:
        return Loaded(None)
    if len(raw) > MAX_STORED_CHARS:
        return Loaded(None, f"takes {len(raw)} characters, more than the {MAX_STORED_CHARS} read")
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return Loaded(json.loads(text))
    except RecursionError:
        return Loaded(None, "nests deeper than the JSON parser goes")
    except (UnicodeDecodeError, ValueError) as exc:
        return Loaded(None, f"is not JSON ({type(exc).__name__}: {str(exc)[:120]})")


class Unreadable(str):
    """A stored JSON column the database layer could not parse; the text says why.

    The engine's JSON reader (:func:`load_column`) hands these to the ORM in
    place of raising, so one bad row never fails a whole query.
    """


def load_column(text: str | bytes) -> Any:
    """The engine's JSON deserializer: the parsed value, or :class:`Unreadable`."""
    loaded = load_json(text)
    return Unreadable(loaded.problem) if loaded.problem is not None else loaded.value


@dataclass(frozen=True)
class Shown:
    """What a reader shows of a stored JSON object: ``value``, or ``{}`` and ``omitted``."""

    value: dict[str, Any]
    omitted: str | None = None


def show_object(raw: str | bytes | None, bounds: FreeformBounds, what: str) -> Shown:
    """The stored object ``raw`` if it is one within ``bounds``; else a note naming the problem.

    ``what`` names the field in the note (``"details"``). SQL NULL shows as ``{}``.
    """
    loaded = load_json(raw)
    if loaded.problem is not None:
        return Shown({}, f"{what} not shown: what is stored {loaded.problem}")
    return show_value(loaded.value, bounds, what, len(raw or ""))


def show_value(value: Any, bounds: FreeformBounds, what: str, size: int | None = None) -> Shown:
    """Like :func:`show_object`, for a value already parsed (``size``: its stored length)."""
    stored = f" ({size} bytes stored)" if size is not None else ""
    if isinstance(value, Unreadable):
        return Shown({}, f"{what} not shown: what is stored {value}")
    if value is None:
        return Shown({})
    if not isinstance(value, dict):
        return Shown(
            {}, f"{what} not shown: what is stored is a {_json_type(value)}, not an object"
        )
    problem = freeform_problem(value, bounds)
    if problem is not None:
        return Shown({}, f"{what} not shown: what is stored {problem.message}{stored}")
    return Shown(value)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "JSON array"
    if isinstance(value, str):
        return "JSON string"
    return "JSON scalar"
