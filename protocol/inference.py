"""The Open Inference Protocol (KServe v2) REST bodies, and tensors to and from numpy.

Both the agent's local API and the fleet server's cloud endpoint speak this
protocol. A request tensor carries ``name``, ``shape``, ``datatype`` and
``data`` (row-major, flat or nested); decoding checks the shape first (at
most :data:`MAX_RANK` dimensions, none negative, a size an array can have),
then that the data holds exactly ``prod(shape)`` numbers of the declared
datatype, and raises :class:`InferenceRequestError`, naming the tensor, when it
does not: nothing is allocated for a shape before it has passed.

edgefleet adds three response ``parameters`` (the protocol's extension point):
``stage`` (which stage of the fallback chain answered), ``model_version`` (the
version that answered) and ``escalated`` (a low-confidence local answer was
sent on to the cloud). Pure data and functions: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.manifest import Manifest, TensorSpec

StageName = Literal["active", "previous", "cloud", "safe_default"]
STAGE_NAMES: Final[tuple[StageName, ...]] = ("active", "previous", "cloud", "safe_default")

# Open Inference Protocol datatype -> numpy dtype name (the names TensorSpec.dtype uses).
DATATYPES: Final[Mapping[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPE_OF_DTYPE: Final[Mapping[str, str]] = {v: k for k, v in DATATYPES.items()}
# The same, by numpy dtype (native byte order): a dict look-up instead of dtype.name's work.
_DATATYPE_OF_NP: Final[Mapping[np.dtype[Any], str]] = {np.dtype(v): k for k, v in DATATYPES.items()}
_NP_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {k: np.dtype(v) for k, v in DATATYPES.items()}
# The largest finite value of each float datatype.
_FLOAT_MAX: Final[Mapping[np.dtype[Any], float]] = {
    np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32, np.float64)
}
# Flat data up to this many values is tested against its datatype's range without numpy.
_SMALL_DATA: Final = 64
# Shapes the plain parse takes; a dimension beyond is left to pydantic (which takes any int).
_PLAIN_DIM: Final = 2**63

Parameters = dict[str, Any]

# numpy 1.x's limit on an array's dimensions (numpy 2 allows 64); models use far fewer.
MAX_RANK: Final = 32
# numpy refuses an array whose non-zero dimensions multiply, with the item size,
# beyond the largest intp, even when another dimension is 0 and the array empty.
_MAX_NONZERO_BYTES: Final = int(np.iinfo(np.intp).max)


class InferenceRequestError(ValueError):
    """A request the protocol cannot accept; ``tensor`` names the tensor at fault, if one is."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class _Body(BaseModel):
    # Unknown fields are ignored: the protocol lets clients and servers add their own.
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Body):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: Parameters | None = None


class RequestOutput(_Body):
    """An output the client asks for; when a request names none, every output is returned."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Body):
    """``POST /v2/models/{name}[/versions/{version}]/infer`` request body."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Body):
    """One output tensor of an inference response."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: Parameters | None = None


class InferenceResponse(_Body):
    """The inference response body; ``parameters`` carries edgefleet's answer fields."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]

    def answer(self) -> AnswerParameters | None:
        """edgefleet's answer fields, when the server that answered sets them."""
        try:
            return AnswerParameters.model_validate(self.parameters or {})
        except ValidationError:
            return None


class AnswerParameters(_Body):
    """Who answered an inference request: the stage of the fallback chain and its model version."""

    stage: StageName
    model_version: str | None = None
    escalated: bool = False


class TensorMetadata(_Body):
    """A tensor in model metadata; ``-1`` marks a dimension of any size (the batch)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Body):
    """``GET /v2/models/{name}`` response body."""

    name: str
    versions: list[str] = []
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(_Body):
    """``GET /v2`` response body."""

    name: str
    version: str
    extensions: list[str] = []


class ErrorResponse(_Body):
    """The body of every error response: one sentence saying what was wrong."""

    error: str


class InputFields(Protocol):
    """What decoding reads of an input: a :class:`RequestInput` or a :class:`PlainInput`."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def datatype(self) -> str: ...
    @property
    def data(self) -> Sequence[Any]: ...


class PlainInput(NamedTuple):
    """An input of a request in the common shape, read without pydantic (:func:`plain_request`)."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class PlainRequest(NamedTuple):
    """What the routes read of a request: its id, inputs and requested outputs."""

    id: str | None
    inputs: list[PlainInput]
    outputs: list[RequestOutput] | None


def plain_request(document: dict[str, Any]) -> PlainRequest | None:
    """``document`` read as :class:`InferenceRequest` would read it, when it has the common shape.

    The common shape: ``inputs`` a non-empty list of objects, each with a string
    ``name`` and ``datatype``, a list of integers ``shape``, a list ``data`` and
    no ``parameters`` (or null, or empty); ``id`` a string or null; no
    ``outputs`` (or null); the request's ``parameters`` absent, null or empty.
    Unknown fields are ignored, as the model ignores them. Every such document
    is one the model accepts, with the same fields; for any other this returns
    ``None`` and the caller validates with the model, which accepts or refuses
    it as before (a test holds the two to that over a corpus).
    """
    inputs = document.get("inputs")
    if type(inputs) is not list or not inputs:
        return None
    request_id = document.get("id")
    if request_id is not None and type(request_id) is not str:
        return None
    if document.get("outputs") is not None or document.get("parameters") not in _NO_PARAMETERS:
        return None
    plain = []
    for tensor in inputs:
        if type(tensor) is not dict:
            return None
        name, shape = tensor.get("name"), tensor.get("shape")
        datatype, data = tensor.get("datatype"), tensor.get("data")
        if (
            type(name) is not str
            or type(datatype) is not str
            or type(data) is not list
            or type(shape) is not list
            or tensor.get("parameters") not in _NO_PARAMETERS
        ):
            return None
        for d in shape:
            if type(d) is not int or not -_PLAIN_DIM <= d < _PLAIN_DIM:
                return None
        plain.append(PlainInput(name, shape, datatype, data))
    return PlainRequest(request_id, plain, None)


_NO_PARAMETERS: Final[tuple[Any, ...]] = (None, {})


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The protocol datatype of a numpy dtype (``float32`` -> ``FP32``)."""
    known = _DATATYPE_OF_DTYPE.get(dtype) if isinstance(dtype, str) else _DATATYPE_OF_NP.get(dtype)
    if known is not None:
        return known
    name = np.dtype(dtype).name
    try:
        return _DATATYPE_OF_DTYPE[name]
    except KeyError:
        raise InferenceRequestError(
            f"dtype {name} has no Open Inference Protocol datatype"
        ) from None


def dtype_of(datatype: str) -> str:
    """The numpy dtype name of a protocol datatype (``FP32`` -> ``float32``)."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InferenceRequestError(
            f"datatype {datatype!r} is not supported; use one of {', '.join(DATATYPES)}"
        ) from None


def decode_tensor(
    name: str,
    shape: Sequence[int],
    datatype: str,
    data: Sequence[Any],
    *,
    role: Literal["input", "output"] = "input",
) -> npt.NDArray[Any]:
    """The numpy array a protocol tensor describes.

    ``data`` may be flat or nested; its element count must equal ``prod(shape)``
    and every element must be a value of ``datatype`` (an integer datatype
    refuses 1.5, a numeric one refuses ``true`` and strings, a float one refuses
    a finite number it cannot hold, such as 1e300 as FP32). In float data,
    ``null`` decodes as NaN: JSON has no NaN, and encoders (pydantic among
    them) write null for it; validation then refuses it by name.
    """
    known = _NP_DTYPES.get(datatype)
    if known is not None:
        target = known
    else:
        try:
            target = np.dtype(dtype_of(datatype))
        except InferenceRequestError as exc:
            raise InferenceRequestError(f"{role} {name!r}: {exc}", name) from None
    expected = check_shape(name, shape, target.itemsize, role=role)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InferenceRequestError(
            f"{role} {name!r}: data is a ragged nested list", name
        ) from None
    if raw.size != expected:
        raise InferenceRequestError(
            f"{role} {name!r}: data has {raw.size} elements, shape {list(shape)} needs {expected}",
            name,
        )
    if expected == 0:
        return np.zeros(tuple(shape), dtype=target)
    kind = raw.dtype.kind
    if kind == "f" and target.kind == "f":
        # The common case, float data for a float datatype: both ends of the data within the
        # datatype's largest value (no NaN, no Inf) is the one test _convert's fast path makes.
        limit = _FLOAT_MAX[target]
        if raw.ndim == 1 and expected <= _SMALL_DATA:
            # A flat list of a few numbers: its ends found by Python, without numpy's per-call
            # cost. A NaN in it is never taken for an end within the limit: it compares false.
            within = max(data) <= limit and min(data) >= -limit
        else:
            within = raw.max() <= limit and raw.min() >= -limit
        if within:
            return raw.astype(target).reshape(shape)
    if kind == "O" and target.kind == "f":
        raw = _nulls_as_nan(raw)
    if raw.dtype.kind not in "biuf":
        raise InferenceRequestError(
            f"{role} {name!r}: data holds values that are not {datatype}", name
        )
    return _convert(f"{role} {name!r}", name, raw, target, datatype).reshape(shape)


def check_shape(
    name: str,
    shape: Sequence[int],
    itemsize: int = 8,
    *,
    role: Literal["input", "output"] = "input",
) -> int:
    """The number of elements ``shape`` describes, once it is a shape an array can have.

    Refuses, naming the tensor, more than :data:`MAX_RANK` dimensions, a negative
    dimension, and non-zero dimensions that multiply (with ``itemsize``) beyond
    what numpy can address — even when a 0 elsewhere leaves the tensor empty.
    Pure integer arithmetic: nothing is allocated.
    """
    if len(shape) > MAX_RANK:
        raise InferenceRequestError(
            f"{role} {name!r}: shape has {len(shape)} dimensions, at most {MAX_RANK} are supported",
            name,
        )
    nonzero = itemsize
    for d in shape:
        if d < 0:
            raise InferenceRequestError(
                f"{role} {name!r}: shape {list(shape)} has a negative dimension", name
            )
    for d in shape:
        nonzero *= d or 1
        if nonzero > _MAX_NONZERO_BYTES:
            raise InferenceRequestError(
                f"{role} {name!r}: shape {list(shape)} is larger than any array can be "
                f"(its non-zero dimensions multiply to more than {_MAX_NONZERO_BYTES} bytes)",
                name,
            )
    return math.prod(shape)


def _nulls_as_nan(raw: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Float data with ``null`` where a value was NaN (JSON has no NaN; encoders write null)."""
    flat = raw.reshape(-1)
    missing = np.equal(flat, np.array(None))
    if not missing.any():
        return raw
    rest = np.asarray(flat[~missing].tolist())
    if rest.size and rest.dtype.kind not in "iuf":
        return raw
    out = np.full(flat.shape, np.nan)
    out[~missing] = rest
    return out.reshape(raw.shape)


def _convert(
    where: str, name: str, raw: npt.NDArray[Any], target: np.dtype[Any], datatype: str
) -> npt.NDArray[Any]:
    flat = raw.reshape(-1)
    if target.kind == "b":
        if raw.dtype.kind != "b":
            raise InferenceRequestError(
                f"{where}: datatype BOOL needs true/false, data holds numbers", name
            )
        return raw
    if raw.dtype.kind == "b":
        raise InferenceRequestError(
            f"{where}: data holds true/false, datatype {datatype} needs numbers", name
        )
    if target.kind == "f":
        if raw.dtype.kind == "f" and not (np.abs(flat) > _FLOAT_MAX[target]).any():
            # Nothing beyond the datatype's largest value (nor any Inf): no overflow to look for.
            return raw.astype(target)
        with np.errstate(over="ignore"):
            converted = raw.astype(target)
        # A finite number the datatype cannot hold would become +-inf: refuse it
        # for what it is. JSON's NaN/Infinity (and numbers beyond even FP64) are
        # already non-finite here and are left for validation to name.
        overflow = np.isinf(converted.reshape(-1)) & np.isfinite(flat)
        if overflow.any():
            index = int(np.argmax(overflow))
            raise InferenceRequestError(
                f"{where}: element {index} is {flat[index].item()!r}, out of range for {datatype}",
                name,
            )
        return converted
    if raw.dtype.kind == "f":
        whole = np.isfinite(flat) & (flat == np.trunc(flat))
        if not whole.all():
            index = int(np.argmin(whole))
            raise InferenceRequestError(
                f"{where}: element {index} is {flat[index].item()!r}, "
                f"not an integer as datatype {datatype} needs",
                name,
            )
    info = np.iinfo(target)
    inside = (flat >= info.min) & (flat <= info.max)
    if not inside.all():
        index = int(np.argmin(inside))
        raise InferenceRequestError(
            f"{where}: element {index} is {flat[index].item()!r}, outside {datatype}'s "
            f"range {info.min}..{info.max}",
            name,
        )
    return raw.astype(target)


def check_input_datatypes(manifest: Manifest, inputs: Sequence[InputFields]) -> None:
    """Refuse, naming the tensor, an input declared with a datatype other than the model's.

    The protocol leaves a server free to refuse a datatype its model does not
    take, and Triton does (400, "unexpected datatype"): data is never converted
    silently, so INT64 or FP64 data for an FP32 input is refused, not cast.
    Inputs the model does not have are left to the shape check, which names them.
    """
    wanted = {spec.name: datatype_of(spec.dtype) for spec in manifest.inputs}
    for tensor in inputs:
        takes = wanted.get(tensor.name)
        if takes is None or tensor.datatype == takes:
            continue
        where = f"input {tensor.name!r}"
        if tensor.datatype not in DATATYPES:
            raise InferenceRequestError(
                f"{where}: datatype {tensor.datatype!r} is not supported; the model takes {takes}",
                tensor.name,
            )
        raise InferenceRequestError(
            f"{where}: unexpected datatype {tensor.datatype}, the model takes {takes}", tensor.name
        )


def decode_inputs(request: InferenceRequest | PlainRequest) -> dict[str, npt.NDArray[Any]]:
    """Every input tensor of a request as a numpy array, by name."""
    tensors: dict[str, npt.NDArray[Any]] = {}
    for tensor in request.inputs:
        if tensor.name in tensors:
            raise InferenceRequestError(f"input {tensor.name!r} appears twice", tensor.name)
        tensors[tensor.name] = decode_tensor(
            tensor.name, tensor.shape, tensor.datatype, tensor.data
        )
    return tensors


def decode_outputs(response: InferenceResponse) -> dict[str, npt.NDArray[Any]]:
    """Every output tensor of a response as a numpy array, by name."""
    tensors: dict[str, npt.NDArray[Any]] = {}
    for tensor in response.outputs:
        if tensor.name in tensors:
            raise InferenceRequestError(f"output {tensor.name!r} appears twice", tensor.name)
        tensors[tensor.name] = decode_tensor(
            tensor.name, tensor.shape, tensor.datatype, tensor.data, role="output"
        )
    return tensors


def _tensor_fields(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [int(d) for d in array.shape],
        "datatype": datatype_of(array.dtype),
        "data": array.reshape(-1).tolist(),
        "parameters": None,
    }


def encode_request(
    tensors: Mapping[str, npt.NDArray[Any]],
    *,
    id: str | None = None,
    parameters: Parameters | None = None,
    outputs: Sequence[str] | None = None,
) -> InferenceRequest:
    """A request carrying ``tensors`` (flat row-major data)."""
    # model_construct: the fields are built from arrays, so they are valid by construction.
    return InferenceRequest.model_construct(
        id=id,
        parameters=parameters,
        inputs=[RequestInput.model_construct(**_tensor_fields(k, v)) for k, v in tensors.items()],
        outputs=[RequestOutput.model_construct(name=n, parameters=None) for n in outputs]
        if outputs is not None
        else None,
    )


def select_outputs(
    outputs: Mapping[str, npt.NDArray[Any]], requested: Sequence[RequestOutput] | None
) -> dict[str, npt.NDArray[Any]]:
    """The outputs a request asked for (all of them when it named none)."""
    if not requested:
        return dict(outputs)
    check_requested_outputs(list(outputs), requested)
    return {r.name: outputs[r.name] for r in requested}


def check_requested_outputs(
    available: Sequence[str], requested: Sequence[RequestOutput] | None
) -> None:
    """Refuse a request that asks for an output the model does not have."""
    for r in requested or ():
        if r.name not in available:
            raise InferenceRequestError(
                f"output {r.name!r} is not an output of the model; it has {list(available)}",
                r.name,
            )


def encode_response(
    outputs: Mapping[str, npt.NDArray[Any]],
    *,
    model_name: str,
    model_version: str | None,
    stage: StageName,
    escalated: bool = False,
    id: str | None = None,
) -> InferenceResponse:
    """The response for an answer; ``model_version`` is the version that answered."""
    answer = AnswerParameters(stage=stage, model_version=model_version, escalated=escalated)
    return InferenceResponse.model_construct(
        model_name=model_name,
        model_version=model_version,
        id=id,
        parameters=answer.model_dump(),
        outputs=[
            ResponseOutput.model_construct(**_tensor_fields(k, v)) for k, v in outputs.items()
        ],
    )


def tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    """A manifest tensor as protocol metadata (the resizable batch dimension as ``-1``)."""
    shape = spec.shape_signature if len(spec.shape_signature) == len(spec.shape) else spec.shape
    return TensorMetadata(name=spec.name, datatype=datatype_of(spec.dtype), shape=list(shape))


def model_metadata(manifest: Manifest, versions: Sequence[str] | None = None) -> ModelMetadata:
    """Model metadata from a bundle manifest; ``versions`` defaults to the manifest's own."""
    return ModelMetadata(
        name=manifest.name,
        versions=list(versions) if versions is not None else [manifest.version],
        platform="tflite",
        inputs=[tensor_metadata(t) for t in manifest.inputs],
        outputs=[tensor_metadata(t) for t in manifest.outputs],
    )


def describe_validation_error(exc: ValidationError) -> str:
    """One line saying what is wrong with a body pydantic refused."""
    error = exc.errors(include_url=False)[0]
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def response_json(
    outputs: Mapping[str, npt.NDArray[Any]],
    *,
    model_name: str,
    model_version: str | None,
    stage: StageName,
    escalated: bool = False,
    id: str | None = None,
) -> bytes:
    """:func:`encode_response`'s body as JSON without its unset fields, built directly.

    The same document ``encode_response(...).model_dump_json(exclude_none=True)``
    writes (equal once parsed: Python writes an exponent as ``e-06`` where
    pydantic writes ``e-6``; a test holds them to it), from fragments made once per answer kind
    and the outputs' ``tolist()``: no model objects per request. Data that JSON
    cannot hold as numbers (NaN, Inf) goes through the models, which write null.
    """
    head, middle = _response_fragments(model_name, model_version, stage, escalated)
    parts = [head]
    if id is not None:
        parts.append(b',"id":' + _json_string(id))
    parts.append(middle)
    first = True
    for name, array in outputs.items():
        try:
            data = _encode_data(array.reshape(-1).tolist())
        except ValueError:
            return (
                encode_response(
                    outputs,
                    model_name=model_name,
                    model_version=model_version,
                    stage=stage,
                    escalated=escalated,
                    id=id,
                )
                .model_dump_json(exclude_none=True)
                .encode()
            )
        parts.append(_output_head(name, array.shape, array.dtype, first))
        parts.append(data.encode())
        parts.append(b"}")
        first = False
    parts.append(b"]}")
    return b"".join(parts)


@lru_cache(maxsize=256)
def _output_head(name: str, shape: tuple[int, ...], dtype: np.dtype[Any], first: bool) -> bytes:
    """An output's JSON up to its data: made once per name, shape and dtype."""
    return b'%s{"name":%s,"shape":[%s],"datatype":"%s","data":' % (
        b"" if first else b",",
        _json_string(name),
        ",".join(str(int(d)) for d in shape).encode(),
        datatype_of(dtype).encode(),
    )


@lru_cache(maxsize=64)
def _response_fragments(
    model_name: str, model_version: str | None, stage: StageName, escalated: bool
) -> tuple[bytes, bytes]:
    """The bytes before a response's ``id``, and from after it to its first output."""
    head = b'{"model_name":' + _json_string(model_name)
    if model_version is not None:
        head += b',"model_version":' + _json_string(model_version)
    version = b"null" if model_version is None else _json_string(model_version)
    middle = b',"parameters":{"stage":%s,"model_version":%s,"escalated":%s},"outputs":[' % (
        _json_string(stage),
        version,
        b"true" if escalated else b"false",
    )
    return head, middle


def _json_string(text: str) -> bytes:
    try:
        return _STRING_JSON.encode(text).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): escaped, valid UTF-8
        return _ASCII_JSON.encode(text).encode("ascii")


# Made once: json.dumps builds an encoder on every call given any option.
_DATA_JSON: Final = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
# And JSONEncoder.encode makes its C encoder on every call: this one is made once, for
# the lists of numbers tolist() gives (no circular check: they hold no containers twice).
_MAKE_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_C_DATA_ENCODER: Final = (
    _MAKE_C_ENCODER(
        None,
        _DATA_JSON.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    if _MAKE_C_ENCODER is not None
    else None
)


def _encode_data(data: list[Any]) -> str:
    """``data`` as JSON as ``_DATA_JSON`` writes it; ``ValueError`` for NaN or Inf."""
    if _C_DATA_ENCODER is None:
        return _DATA_JSON.encode(data)
    return "".join(_C_DATA_ENCODER(data, 0))


_STRING_JSON: Final = json.JSONEncoder(ensure_ascii=False)
_ASCII_JSON: Final = json.JSONEncoder()
