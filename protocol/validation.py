"""Input validation against a manifest's contract, before any model runs (device or cloud).

A request must give every input the model declares and no other, each as a
``[batch, *example_shape]`` array of numbers the input's dtype can hold
exactly, without NaN or Inf, and — for inputs summarised element by element —
every element inside its feature's valid range. The first violation found is
raised as :class:`InvalidInput`, naming the tensor, the element (and its
feature) and what was wrong, so an app can fix its request. The checks are
vectorised: a request costs a few numpy calls whatever its size.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.derivation import derived_names
from protocol.manifest import Manifest, TensorSpec

Tensors = dict[str, npt.NDArray[Any]]


class InvalidInput(ValueError):
    """A request input breaks the model's contract; ``tensor`` names it."""

    def __init__(self, tensor: str, message: str) -> None:
        super().__init__(f"input {tensor!r}: {message}")
        self.tensor = tensor
        self.reason = message


_LARGEST = float(np.finfo(np.float64).max)
# Float arrays up to this many elements are tested against their bounds without numpy.
_SMALL = 32


@dataclass(frozen=True)
class _InputRule:
    spec: TensorSpec
    # For an input summarised element by element: the feature of each element
    # and its valid range (the largest finite floats where the manifest gives no bound,
    # so that one comparison also refuses Inf).
    features: tuple[str, ...] | None
    low: npt.NDArray[np.float64] | None
    high: npt.NDArray[np.float64] | None
    # Made once, read per request: the model's dtype and the shape of one example; the
    # bounds as Python floats, for a small float array's test (:func:`_clean`).
    dtype: np.dtype[Any] = dataclasses.field(init=False)
    example: tuple[int, ...] = dataclasses.field(init=False)
    lows: list[float] | None = dataclasses.field(init=False)
    highs: list[float] | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.spec.dtype))
        object.__setattr__(self, "example", tuple(self.spec.example_shape))
        object.__setattr__(self, "lows", None if self.low is None else self.low.tolist())
        object.__setattr__(self, "highs", None if self.high is None else self.high.tolist())


class InputContract:
    """The input half of a manifest's contract, prepared once for fast per-request checks."""

    def __init__(self, manifest: Manifest) -> None:
        self.model_name = manifest.name
        self._rules = {spec.name: _InputRule(spec, None, None, None) for spec in manifest.inputs}
        offset = 0
        for derivation in manifest.derivations:
            spec = self._rules[derivation.input].spec
            count = len(derived_names(derivation.input, derivation.method, spec.example_shape))
            features = manifest.features[offset : offset + count]
            offset += count
            if derivation.method != "elements" or len(features) != count:
                continue
            self._rules[spec.name] = _InputRule(
                spec,
                tuple(f.name for f in features),
                np.array([-_LARGEST if f.valid_min is None else f.valid_min for f in features]),
                np.array([_LARGEST if f.valid_max is None else f.valid_max for f in features]),
            )

    @property
    def input_names(self) -> list[str]:
        """The inputs the model takes, in manifest order."""
        return list(self._rules)

    def validate(self, tensors: Mapping[str, npt.ArrayLike]) -> Tensors:
        """The inputs converted to the model's dtypes; raises :class:`InvalidInput`."""
        rules = self._rules
        if len(rules) == 1 and len(tensors) == 1:
            # One input, the common case: the same checks without the bookkeeping for several.
            ((name, rule),) = rules.items()
            if name in tensors:
                return {name: _check(rule, tensors[name])}
        unknown = [name for name in tensors if name not in self._rules]
        if unknown:
            raise InvalidInput(
                unknown[0],
                f"is not an input of model {self.model_name!r}; its inputs are {self.input_names}",
            )
        missing = [name for name in self._rules if name not in tensors]
        if missing:
            raise InvalidInput(missing[0], "is missing from the request")
        out = {name: _check(rule, tensors[name]) for name, rule in self._rules.items()}
        rows = {name: array.shape[0] for name, array in out.items()}
        if len(set(rows.values())) > 1:
            first, *others = rows
            other = next(n for n in others if rows[n] != rows[first])
            raise InvalidInput(
                other, f"has {rows[other]} rows but input {first!r} has {rows[first]}"
            )
        return out


def validate_inputs(manifest: Manifest, tensors: Mapping[str, npt.ArrayLike]) -> Tensors:
    """Check ``tensors`` against the manifest's inputs; see :class:`InputContract`."""
    return InputContract(manifest).validate(tensors)


def check_declared_shapes(manifest: Manifest, shapes: Iterable[tuple[str, Sequence[int]]]) -> None:
    """Check the shapes a request declares for its inputs, before any array is made.

    The same shape rule as :meth:`InputContract.validate` (``[batch,
    *example_shape]``, at least one row), applied to ``(name, shape)`` pairs as
    the request states them, so that a shape no model input can have — too many
    dimensions, a dimension of 2**63 — is refused by name before it costs
    memory. Names the model does not take are refused as by ``validate``.
    """
    specs = {spec.name: spec for spec in manifest.inputs}
    for name, shape in shapes:
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(
                name, f"is not an input of model {manifest.name!r}; its inputs are {list(specs)}"
            )
        if problem := _shape_problem(spec, list(shape)):
            raise InvalidInput(name, problem)


def _check(rule: _InputRule, value: npt.ArrayLike) -> npt.NDArray[Any]:
    spec = rule.spec
    if type(value) is np.ndarray:
        array: npt.NDArray[Any] = value
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(spec.name, "is not a numeric array (ragged nested lists?)") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInput(spec.name, f"holds {array.dtype} values, the model takes {spec.dtype}")
    shape = array.shape
    if not (shape[1:] == rule.example and len(shape) == len(rule.example) + 1 and shape[0] >= 1):
        _check_shape(spec, array)  # raises: it names what is wrong
    if _clean(rule, array):
        if array.dtype == rule.dtype and array.flags.c_contiguous:
            return array  # what _convert would return: np.ascontiguousarray of it is itself
        return _convert(rule, array)
    # Something is wrong: the slow path finds the first offending element and names it.
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            row, element = _first(bad)
            value_text = "NaN" if np.isnan(array.reshape(bad.shape[0], -1)[row, element]) else "Inf"
            raise InvalidInput(spec.name, f"{_where(rule, row, element, array)} is {value_text}")
    converted = _convert(rule, array)
    if rule.low is not None and rule.high is not None:
        flat = converted.reshape(converted.shape[0], -1).astype(np.float64, copy=False)
        below = flat < rule.low
        outside = below | (flat > rule.high)
        if outside.any():
            row, element = _first(outside)
            if below[row, element]:
                bound = f"below its valid minimum {_number(rule.low[element])}"
            else:
                bound = f"above its valid maximum {_number(rule.high[element])}"
            place = _where(rule, row, element, converted)
            sent = converted.reshape(converted.shape[0], -1)[row, element]  # in its own dtype
            raise InvalidInput(spec.name, f"{place} is {_number(sent)}, {bound}")
    return converted


def _clean(rule: _InputRule, array: npt.NDArray[Any]) -> bool:
    """One vectorised test that passes a request with nothing wrong (the common case).

    NaN fails every comparison and the bounds are finite, so NaN and Inf fail it too.
    """
    if rule.low is None or rule.high is None:
        return array.dtype.kind != "f" or bool(np.isfinite(array).all())
    lows, highs = rule.lows, rule.highs
    if (
        array.dtype.kind == "f"
        and array.size <= _SMALL
        and array.itemsize <= 8
        and lows is not None
        and highs is not None
    ):
        # A few floats: compared one by one in C (map), without numpy's per-call cost. Each
        # value as a Python float is its exact value, so every comparison is numpy's.
        values = array.reshape(-1).tolist()
        if len(values) != len(lows):
            rows = len(values) // len(lows) if lows else 0
            lows, highs = lows * rows, highs * rows
        return all(map(operator.le, lows, values)) and all(map(operator.le, values, highs))
    flat = array.reshape(array.shape[0], -1)
    return bool(((flat >= rule.low) & (flat <= rule.high)).all())


def _check_shape(spec: TensorSpec, array: npt.NDArray[Any]) -> None:
    if problem := _shape_problem(spec, [int(d) for d in array.shape]):
        raise InvalidInput(spec.name, problem)


def _shape_problem(spec: TensorSpec, shape: list[int]) -> str | None:
    """What is wrong with ``shape`` for ``spec``'s input, or ``None``."""
    example = list(spec.example_shape)
    if any(d < 0 for d in shape[:64]):
        return f"has a negative dimension in its shape {shape[:64]}"
    if len(shape) == len(example) + 1 and shape[1:] == example:
        return "holds no rows (the batch dimension is 0)" if shape[0] < 1 else None
    wanted = "[batch" + "".join(f", {d}" for d in example) + "]"
    hint = " (add the batch dimension)" if shape == example else ""
    if len(shape) > 8 * (len(example) + 1):
        # A shape as long as a request allows would make an error as long: name its rank.
        return f"has {len(shape)} dimensions, the model takes {wanted}"
    return f"has shape {shape}, the model takes {wanted}{hint}"


def _convert(rule: _InputRule, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    spec = rule.spec
    target = rule.dtype
    if array.dtype == target:
        return np.ascontiguousarray(array)
    if target.kind == "f":
        if array.dtype.kind == "b":
            raise InvalidInput(spec.name, f"holds booleans, the model takes {spec.dtype}")
        with np.errstate(over="ignore"):
            converted = array.astype(target)
        _require(np.isfinite(converted), rule, array, f"out of range for {spec.dtype}")
        return converted
    flat = array.reshape(array.shape[0], -1)
    if target.kind == "b":
        _require((flat == 0) | (flat == 1), rule, array, "the model takes booleans (0 or 1)")
        return array.astype(target)
    if array.dtype.kind == "f":
        whole = flat == np.trunc(flat)
        _require(whole, rule, array, f"not a whole number as {spec.dtype} needs")
    info = np.iinfo(target)
    inside = (flat >= info.min) & (flat <= info.max)
    _require(inside, rule, array, f"outside {spec.dtype}'s range {info.min}..{info.max}")
    return array.astype(target)


def _require(
    ok: npt.NDArray[np.bool_], rule: _InputRule, array: npt.NDArray[Any], why: str
) -> None:
    """Refuse the first element of ``array`` where ``ok`` is false, saying ``why``."""
    if not ok.all():
        row, element = _first(~ok)
        sent = array.reshape(array.shape[0], -1)[row, element]
        where = _where(rule, row, element, array)
        raise InvalidInput(rule.spec.name, f"{where} is {_number(sent)}, {why}")


def _first(mask: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """Row and flat element index of the first true entry of a ``[batch, ...]`` mask."""
    flat = mask.reshape(mask.shape[0], -1)
    index = int(np.argmax(flat))
    row, element = divmod(index, flat.shape[1])
    return row, element


def _where(rule: _InputRule, row: int, element: int, array: npt.NDArray[Any]) -> str:
    if rule.features is not None:
        place = f"feature {rule.features[element]!r} (element {element})"
    elif array.ndim == 1:
        place = "the value"
    else:
        index = np.unravel_index(element, array.shape[1:])
        place = f"element {[int(i) for i in index]}"
    return place if array.shape[0] == 1 else f"{place} of row {row}"


def _number(value: Any) -> str:
    # str() of a numpy scalar is its shortest round-trip form in its own precision (-2113.1).
    return str(value) if isinstance(value, np.generic) else repr(value)
