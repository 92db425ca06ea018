"""The checks of a few values without numpy give what the numpy checks give, value for value.

The input contract's range test, the decoder's test against a datatype's largest
value and the chain's output test each take a path in Python for small tensors
(a request of one example is the common case). Each is run here on the same
values both ways (the numpy way forced by a limit of 0) and must accept the same
arrays, return equal arrays and refuse with the same message: random values
around the bounds and beyond, NaN and Inf at every position, several rows, and
each float dtype.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agent.serving.chain as chain_module
import protocol.inference as inference_module
import protocol.validation as validation_module
from agent.serving.chain import _check_outputs
from protocol.bundle import read_bundle
from protocol.inference import InferenceRequestError, decode_tensor
from protocol.manifest import Manifest
from protocol.validation import InputContract, InvalidInput

SPECIALS = (float("nan"), float("inf"), float("-inf"), 3.5e38, -3.5e38, 1e300, 0.0, -0.0)


@pytest.fixture(scope="module")
def manifest(bundles: dict[str, Path]) -> Manifest:
    with bundles["v2"].open("rb") as f:
        return read_bundle(f)[0]


def outcome(call: Any) -> tuple[str, Any]:
    try:
        result = call()
    except (InvalidInput, InferenceRequestError) as exc:
        return "refused", str(exc)
    if isinstance(result, tuple):  # _check_outputs: (outputs or None, reason)
        outputs, reason = result
        return "checked", (
            None if outputs is None else {k: v.tolist() for k, v in outputs.items()},
            reason,
        )
    if isinstance(result, dict):
        return "accepted", {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in result.items()}
    return "accepted", (result.dtype.str, result.shape, result.tobytes())


def both_ways(monkeypatch: pytest.MonkeyPatch, module: Any, limit: str, call: Any) -> None:
    fast = outcome(call)
    with monkeypatch.context() as m:
        m.setattr(module, limit, 0)
        full = outcome(call)
    assert fast == full


def samples(rng: random.Random, lows: list[float], highs: list[float], rows: int) -> list[float]:
    values = []
    for _ in range(rows):
        for low, high in zip(lows, highs, strict=True):
            pick = rng.random()
            if pick < 0.6:
                values.append(rng.uniform(low, high))
            elif pick < 0.8:
                values.append(
                    rng.choice((low, high, np.nextafter(low, -np.inf), np.nextafter(high, np.inf)))
                )
            elif pick < 0.9:
                values.append(rng.choice(SPECIALS))
            else:
                values.append(rng.uniform(-1e4, 1e4))
    return values


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_contract_range_test_of_a_few_floats_is_numpys(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    contract = InputContract(manifest)
    (rule,) = contract._rules.values()
    assert rule.lows is not None and rule.highs is not None
    rng = random.Random(dtype)
    for case in range(400):
        rows = 1 + case % 2
        values = samples(rng, rule.lows, rule.highs, rows)
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(values, dtype=np.float64).astype(dtype).reshape(rows, -1)
        both_ways(
            monkeypatch,
            validation_module,
            "_SMALL",
            lambda a=array: contract.validate({"features": a}),
        )


def test_every_position_of_nan_and_inf_is_refused_alike(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = InputContract(manifest)
    (rule,) = contract._rules.values()
    assert rule.lows is not None and rule.highs is not None
    middle = [(low + high) / 2 for low, high in zip(rule.lows, rule.highs, strict=True)]
    for position in range(len(middle)):
        for special in (float("nan"), float("inf"), float("-inf")):
            values = list(middle)
            values[position] = special
            array = np.array([values], dtype=np.float32)
            both_ways(
                monkeypatch,
                validation_module,
                "_SMALL",
                lambda a=array: contract.validate({"features": a}),
            )


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_the_decoders_range_test_of_a_few_values_is_numpys(
    monkeypatch: pytest.MonkeyPatch, datatype: str
) -> None:
    rng = random.Random(datatype)
    edges = (65504.0, 65520.0, 3.4028234663852886e38, 3.4028235677973366e38, 1.7976931348623157e308)
    for case in range(400):
        size = 1 + case % 16
        values: list[Any] = []
        for _ in range(size):
            pick = rng.random()
            if pick < 0.5:
                values.append(rng.uniform(-100.0, 100.0))
            elif pick < 0.7:
                values.append(rng.choice(edges) * rng.choice((1, -1)))
            elif pick < 0.85:
                values.append(rng.choice(SPECIALS))
            else:
                values.append(rng.choice((1, -7, 10**20, True)))
        if all(type(v) is not float for v in values):
            values[0] = 0.5  # float data: the path under test
        both_ways(
            monkeypatch,
            inference_module,
            "_SMALL_DATA",
            lambda v=values: decode_tensor("x", [len(v)], datatype, v),
        )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the cast to FP32 after
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_chains_output_test_of_a_few_values_is_numpys(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    (spec,) = manifest.outputs
    width = spec.example_shape[0]
    rng = random.Random(dtype)
    for case in range(200):
        rows = 1 + case % 3
        values = [rng.choice((rng.random(), rng.random(), *SPECIALS)) for _ in range(rows * width)]
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(values, dtype=np.float64).astype(dtype).reshape(rows, width)
        both_ways(
            monkeypatch,
            chain_module,
            "_SMALL_OUTPUT",
            lambda a=array, r=rows: _check_outputs(manifest, {spec.name: a}, r),
        )
