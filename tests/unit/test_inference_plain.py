"""The local API's pydantic-free reading of a request, held to the pydantic model's.

``protocol.inference.plain_request`` reads a request of the common shape
without pydantic, and ``response_json`` writes the answer without it;
``InferenceRequest`` and ``encode_response`` stay the definitions. Every
document of a corpus (valid requests and every variant with a field missing,
of the wrong type, huge, nested, or beside an unknown key) goes through the
local API's routes twice, on the real sample model: once as served, once with
every request checked by pydantic. Both must answer each with the same status
and the same body (the same tensors, or the same refusal naming the same
thing), and the plain reading must only ever take what pydantic accepts, with
the same fields.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import agent.api.routes as routes_module
from agent.api.connection import Request
from agent.api.http import LocalApi
from agent.api.routes import InferenceRoutes
from agent.serving import FallbackChain, ModelSlot
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from protocol.inference import (
    DATATYPES,
    InferenceRequest,
    InferenceRequestError,
    decode_tensor,
    encode_response,
    plain_request,
    response_json,
)
from testbed.images import MODELS, make_bundle

ROW = [float(v) for v in np.load(MODELS / "baseline.npy")[0].astype(np.float32)]
TENSOR: dict[str, Any] = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": ROW}
BASE: dict[str, Any] = {"inputs": [TENSOR]}


def with_tensor(**changes: Any) -> dict[str, Any]:
    tensor = {**TENSOR, **changes}
    for key, value in changes.items():
        if value is _MISSING:
            del tensor[key]
    return {"inputs": [tensor]}


def with_top(**changes: Any) -> dict[str, Any]:
    document = {**copy.deepcopy(BASE), **changes}
    for key, value in changes.items():
        if value is _MISSING:
            del document[key]
    return document


_MISSING = object()
ODD_VALUES: list[Any] = [
    _MISSING,
    None,
    True,
    0,
    -1,
    1.0,
    1.5,
    2**63,
    2**70,
    "",
    "1",
    "FP32",
    "\ud800",
    [],
    [1],
    [1.0, 16],
    ["1", "16"],
    [True, 16],
    [1, 16, 1],
    [-1, 16],
    [2**63, 16],
    [2**64, 0],
    {},
    {"a": 1},
    [[1.0] * 16],
]


def corpus() -> Iterator[Any]:
    yield BASE
    yield with_top(id="req-1")
    yield with_top(id='é\\"')
    yield with_top(parameters={})
    yield with_top(parameters={"priority": 1})
    yield with_top(outputs=None)
    yield with_top(outputs=[])
    yield with_top(outputs=[{"name": "scores"}])
    yield with_top(outputs=[{"name": "nope"}])
    yield with_top(outputs=[{"name": "scores"}, {"name": "scores"}])
    yield with_top(extra={"anything": [1, 2]})
    yield with_top(inputs=[TENSOR, TENSOR])
    yield with_top(inputs=[TENSOR, {**TENSOR, "name": "other"}])
    yield with_top(inputs=[])
    yield [BASE]
    yield "a string"
    yield 1
    yield None
    for key in ("id", "parameters", "outputs", "inputs"):
        for value in ODD_VALUES:
            yield with_top(**{key: value})
    for key in ("name", "shape", "datatype", "data", "parameters"):
        for value in ODD_VALUES:
            yield with_tensor(**{key: value})
    for datatype in ("FP64", "FP16", "INT32", "BOOL", "BYTES", "fp32"):
        yield with_tensor(datatype=datatype)
    for value in (None, "x", True, 1, 1e300, -1e300, 2**64, [1.0], {}):
        yield with_tensor(data=[value, *ROW[1:]])
    yield with_tensor(data=ROW[:15])
    yield with_tensor(data=[*ROW, 0.0])
    yield with_tensor(data=[ROW])
    yield with_tensor(data=[ROW[:8], ROW[8:]], shape=[2, 8])
    yield with_tensor(data=[ROW, ROW], shape=[2, 16])
    yield with_tensor(data=[], shape=[0, 16])
    yield with_tensor(shape=[16])
    yield with_tensor(name="")


BODIES: list[bytes] = [
    *(json.dumps(d, default=str).encode("utf-8", "surrogatepass") for d in corpus()),
    b"",
    b"{",
    b'{"inputs": [NaN]}',
    json.dumps(with_tensor(data=[float("nan"), *ROW[1:]])).encode(),
    json.dumps(with_tensor(data=[float("inf"), *ROW[1:]])).encode(),
    b"\xff\xfe",
    json.dumps(BASE).encode().replace(b"features", b"f\\u00e9atures"),
]


def test_the_corpus_is_not_empty_of_either_kind() -> None:
    documents = [d for d in corpus() if isinstance(d, dict)]
    plain = [d for d in documents if plain_request(d) is not None]
    assert len(plain) >= 20
    assert len(documents) - len(plain) >= 100


@pytest.mark.parametrize("document", [d for d in corpus() if isinstance(d, dict)])
def test_what_the_plain_reading_takes_pydantic_accepts_with_the_same_fields(
    document: dict[str, Any],
) -> None:
    plain = plain_request(copy.deepcopy(document))
    try:
        model = InferenceRequest.model_validate(copy.deepcopy(document))
    except ValidationError:
        assert plain is None
        return
    if plain is None:
        return  # left to pydantic: a shape the plain reading does not take
    assert plain.id == model.id
    assert plain.outputs is None and model.outputs is None
    assert len(plain.inputs) == len(model.inputs)
    for ours, theirs in zip(plain.inputs, model.inputs, strict=True):
        assert ours.name == theirs.name
        assert ours.shape == theirs.shape
        assert ours.datatype == theirs.datatype
        assert ours.data == theirs.data
        assert theirs.parameters in (None, {})


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> InferenceRoutes:
    tmp = tmp_path_factory.mktemp("plain")
    with make_bundle(tmp, "v2", "2.0.0").open("rb") as f:
        manifest, members = read_bundle(f)
    path = Path(tmp) / manifest.model_file
    path.write_bytes(members[manifest.model_file])
    chain = FallbackChain(active=ModelSlot.load(manifest, path, default_runtime()))
    return LocalApi(chain, "127.0.0.1", 0)._routes


def answer(routes: InferenceRoutes, body: bytes) -> tuple[int, Any]:
    async def run() -> tuple[int, bytes]:
        head = [(b"host", b"x"), (b"content-length", str(len(body)).encode())]
        request = Request(b"POST", b"/v2/models/pump-health/infer", head, b"1.1", keep_alive=True)
        request.body += body

        async def no_charge(_: bytearray) -> None:
            return None

        response = await routes.dispatch(request, request.body, no_charge)
        return response.status, response.body

    status, raw = asyncio.run(run())
    return status, json.loads(raw)


@pytest.mark.parametrize("body", BODIES)
def test_the_routes_answer_as_with_pydantic_alone(
    routes: InferenceRoutes, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = answer(routes, body)
    monkeypatch.setattr(routes_module, "plain_request", lambda _: None)
    assert answer(routes, body) == served


def test_the_common_request_is_answered(routes: InferenceRoutes) -> None:
    status, document = answer(routes, json.dumps(with_top(id="r")).encode())
    assert status == 200
    assert document["id"] == "r"
    assert document["parameters"] == {
        "stage": "active",
        "model_version": "2.0.0",
        "escalated": False,
    }
    (output,) = document["outputs"]
    assert output["shape"] == [1, 4] and output["datatype"] == "FP32"
    assert math.isclose(sum(output["data"]), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("request_id", [None, "r", 'é"\\\n\u2028'])
@pytest.mark.parametrize("version", [None, "2.0.0"])
@pytest.mark.parametrize("escalated", [False, True])
@pytest.mark.parametrize(
    "outputs",
    [
        {"scores": np.array([[0.25, 0.5, 1e-5, 3e38]], np.float32)},
        {"a": np.zeros((2, 0), np.float64), "b": np.array([[1, -2]], np.int64)},
        {"flags": np.array([True, False]), "small": np.array([7], np.uint8)},
        {"nan": np.array([math.nan, math.inf], np.float32)},
    ],
)
def test_the_response_is_the_document_pydantic_writes(
    request_id: str | None, version: str | None, escalated: bool, outputs: dict[str, Any]
) -> None:
    kwargs: dict[str, Any] = {
        "model_name": "pump-health",
        "model_version": version,
        "stage": "active",
        "escalated": escalated,
        "id": request_id,
    }
    ours = response_json(outputs, **kwargs)
    theirs = encode_response(outputs, **kwargs).model_dump_json(exclude_none=True).encode()
    assert ours == theirs or json.loads(ours) == json.loads(theirs)
    if "scores" not in outputs:  # no float written with an exponent: the very same bytes
        assert ours == theirs


def test_a_request_id_holding_a_lone_surrogate_is_answered_in_valid_utf_8() -> None:
    # JSON lets a request carry "\ud800" as its id; the answer must still be UTF-8.
    outputs = {"scores": np.array([[0.25]], np.float32)}
    ours = response_json(
        outputs, model_name="pump-health", model_version="2.0.0", stage="active", id="a\ud800é"
    )
    assert json.loads(ours.decode("utf-8"))["id"] == "a\ud800é"


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize(
    "value", [0.5, -1.0, 65504.0, 65520.0, 3.4028235e38, 3.4028236e38, 3.5e38, 1e300, -1e300]
)
def test_a_float_the_datatype_cannot_hold_is_refused_and_every_other_kept(
    datatype: str, value: float
) -> None:
    dtype = np.dtype(DATATYPES[datatype])
    with np.errstate(over="ignore"):
        held = np.array([value]).astype(dtype)
    if np.isinf(held[0]):
        with pytest.raises(InferenceRequestError, match=r"element 1 is .*out of range"):
            decode_tensor("x", [3], datatype, [0.0, value, math.nan])
    else:
        decoded = decode_tensor("x", [3], datatype, [0.0, value, math.nan])
        assert decoded.dtype == dtype
        assert decoded[1] == held[0] and math.isnan(decoded[2])
