"""Checking JSON documents without pydantic, by pydantic's rules and in its words.

The server validates the contract with pydantic models; a device reads a few
of the same documents (a bundle's manifest first) where pydantic's runtime
costs more than the check: its import and model building are most of
``edge-agent verify``'s time and 11 MB of the serving process. The checks here
follow pydantic's lax mode for JSON input — which values a field accepts,
what it converts them to, which constraint fails first — and a refusal names
the same place and says the same words as pydantic's first error, so a
document is accepted or refused alike on both sides
(``tests/unit/test_manifest_check.py`` holds the two to the same corpus).

A check is a function ``(value, loc) -> value``: it returns the value as the
pydantic model would hold it (``model_dump()``'s form) or raises
:class:`Invalid`. Checks stop at the first error, which is the error pydantic
lists first: fields in declaration order, depth first, then unknown keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

Loc = tuple[str | int, ...]
Check = Callable[[Any, Loc], Any]

# pydantic-core parses integers into an i64 unless the JSON literal is an integer.
_I64: Final = 2**63
_INT_STRING = re.compile(r"^[+-]?\d+(?:_\d+)*(?:\.0*)?$")


class Invalid(ValueError):
    """A document breaks the contract at ``loc``; ``msg`` is pydantic's message for it."""

    def __init__(self, loc: Loc, msg: str) -> None:
        super().__init__(loc, msg)
        self.loc = loc
        self.msg = msg

    def where(self, root: str) -> str:
        """``loc`` as dotted path, or ``root`` for the document itself."""
        return ".".join(str(p) for p in self.loc) or root

    def __str__(self) -> str:
        return f"{self.where('document')}: {self.msg}"


def _bound(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _limits(
    value: Any,
    loc: Loc,
    ge: float | None,
    gt: float | None,
    le: float | None,
    lt: float | None,
) -> None:
    # pydantic-core's order: le, lt, ge, gt (NaN fails the first one present).
    if le is not None and not value <= le:
        raise Invalid(loc, f"Input should be less than or equal to {_bound(le)}")
    if lt is not None and not value < lt:
        raise Invalid(loc, f"Input should be less than {_bound(lt)}")
    if ge is not None and not value >= ge:
        raise Invalid(loc, f"Input should be greater than or equal to {_bound(ge)}")
    if gt is not None and not value > gt:
        raise Invalid(loc, f"Input should be greater than {_bound(gt)}")


def as_int(value: Any, loc: Loc) -> int:
    """An integer in pydantic's lax mode: also a bool, a whole float, a numeric string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid(loc, "Input should be a finite number")
        if not value.is_integer():
            raise Invalid(
                loc, "Input should be a valid integer, got a number with a fractional part"
            )
        if not -_I64 <= value < _I64:
            raise Invalid(loc, "Unable to parse input string as an integer, exceeded maximum size")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INT_STRING.match(text):
            return int(text.split(".", 1)[0])
        raise Invalid(loc, "Input should be a valid integer, unable to parse string as an integer")
    raise Invalid(loc, "Input should be a valid integer")


def as_float(value: Any, loc: Loc) -> float:
    """A number in pydantic's lax mode: also a bool or a numeric string; NaN and inf pass."""
    if isinstance(value, bool | int | float):
        try:
            return float(value)
        except OverflowError:
            return math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        raise Invalid(loc, "Input should be a valid number, unable to parse string as a number")
    raise Invalid(loc, "Input should be a valid number")


def integer(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Check:
    """``int`` with ``Field(ge=..., ...)``."""

    def check(value: Any, loc: Loc) -> int:
        number = as_int(value, loc)
        _limits(number, loc, ge, gt, le, lt)
        return number

    return check


def number(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Check:
    """``float`` with ``Field(ge=..., ...)``."""

    def check(value: Any, loc: Loc) -> float:
        f = as_float(value, loc)
        _limits(f, loc, ge, gt, le, lt)
        return f

    return check


def string(value: Any, loc: Loc) -> str:
    """``str``: only a string (pydantic converts nothing to a string)."""
    if isinstance(value, str):
        return value
    raise Invalid(loc, "Input should be a valid string")


def literal(*allowed: str | int) -> Check:
    """``Literal[...]`` of strings or of ints."""
    shown = [repr(a) for a in allowed]
    expected = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    ints = all(isinstance(a, int) for a in allowed)

    def check(value: Any, loc: Loc) -> str | int:
        if ints and isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _I64:
            raise Invalid(loc, "Unable to parse input string as an integer, exceeded maximum size")
        if isinstance(value, str) and not ints and value in allowed:
            return value
        # An int literal also matches True and 1.0, as pydantic's lookup by hash does.
        if ints and isinstance(value, bool | int | float):
            for a in allowed:
                if value == a:
                    return a
        raise Invalid(loc, f"Input should be {expected}")

    return check


def optional(inner: Check) -> Check:
    """``X | None``."""

    def check(value: Any, loc: Loc) -> Any:
        return None if value is None else inner(value, loc)

    return check


def array(item: Check, *, min_length: int | None = None) -> Check:
    """``list[X]`` with ``Field(min_length=...)``."""

    def check(value: Any, loc: Loc) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid(loc, "Input should be a valid array")
        out = [item(v, (*loc, i)) for i, v in enumerate(value)]
        if min_length is not None and len(out) < min_length:
            unit = "item" if min_length == 1 else "items"
            raise Invalid(
                loc,
                f"List should have at least {min_length} {unit} after validation, not {len(out)}",
            )
        return out

    return check


def pair(first: Check, second: Check) -> Check:
    """``tuple[A, B]``."""

    def check(value: Any, loc: Loc) -> tuple[Any, Any]:
        if not isinstance(value, list):
            raise Invalid(loc, "Input should be a valid array")
        items = [first, second]
        out = []
        for i, item in enumerate(items):
            if i >= len(value):
                raise Invalid((*loc, i), "Field required")
            out.append(item(value[i], (*loc, i)))
        if len(value) > len(items):
            raise Invalid(
                loc,
                f"Tuple should have at most {len(items)} items after validation, not {len(value)}",
            )
        return (out[0], out[1])

    return check


def mapping(item: Check) -> Check:
    """``dict[str, X]`` (JSON keys are always strings)."""

    def check(value: Any, loc: Loc) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Invalid(loc, "Input should be an object")
        return {k: item(v, (*loc, k)) for k, v in value.items()}

    return check


_REQUIRED: Final[Any] = object()


@dataclass(frozen=True)
class Field:
    """A model field: its check, its default (none: required), and whether ``None`` is dumped."""

    name: str
    check: Check
    default: Any = _REQUIRED
    exclude_none: bool = False
    after: Sequence[Callable[[Any], Any]] = ()

    @property
    def required(self) -> bool:
        """Whether the field has no default."""
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Model:
    """A pydantic model's fields and ``mode="after"`` validators, as a check.

    ``forbid_extra`` is ``extra="forbid"``; otherwise unknown keys are dropped.
    A validator raises ``ValueError`` to refuse (pydantic's "Value error, ...").
    """

    name: str
    fields: Sequence[Field]
    forbid_extra: bool = False
    after: Sequence[Callable[[dict[str, Any]], None]] = field(default=())

    def __call__(self, value: Any, loc: Loc = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Invalid(loc, "Input should be an object")
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in value:
                if f.required:
                    raise Invalid((*loc, f.name), "Field required")
                out[f.name] = f.default() if callable(f.default) else f.default
                continue
            got = f.check(value[f.name], (*loc, f.name))
            for validate in f.after:
                try:
                    got = validate(got)
                except ValueError as exc:
                    raise Invalid((*loc, f.name), f"Value error, {exc}") from None
            out[f.name] = got
        if self.forbid_extra:
            known = {f.name for f in self.fields}
            for key in value:
                if key not in known:
                    raise Invalid((*loc, key), "Extra inputs are not permitted")
        for validate_model in self.after:
            try:
                validate_model(out)
            except ValueError as exc:
                raise Invalid(loc, f"Value error, {exc}") from None
        for f in self.fields:
            if f.exclude_none and out[f.name] is None:
                del out[f.name]
        return out
