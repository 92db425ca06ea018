"""The Open Inference Protocol's routes (KServe v2): what each request to the local API gets.

Routes::

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process serves
    GET  /v2/health/ready                      200 when a model, or at least the safe default,
                                               can answer; 503 and the reason otherwise
    GET  /v2/models/{name}[/versions/{v}]         model metadata from the manifest
    GET  /v2/models/{name}[/versions/{v}]/ready   200 when the model can answer
    POST /v2/models/{name}[/versions/{v}]/infer   inference through the fallback chain
    GET  /metrics                              the API's connections, bytes in flight and
                                               refusals, and the agent's own metrics
                                               (:mod:`agent.metrics`), as Prometheus text

``{name}`` is the manifest's name. Every error has a JSON body
``{"error": "..."}`` that names the tensor at fault: 400 for a body that is not
a valid protocol request, that declares a datatype other than the model's (as
Triton does: data is never converted silently) or holds a value its datatype
cannot (1e300 as FP32), 404 for an unknown route, model or version, 413 for a
body over the limit, 422 for a request that breaks the model's contract
(shape, NaN/Inf, valid range), 503 with ``Retry-After`` when the API is
at one of its limits (:mod:`agent.api.admission`). A failing stage is no
error — the chain answers — so a 500 only ever means a bug here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

import numpy.typing as npt
from pydantic import ValidationError

import agent
from agent.api.inprocess import ChainProvider, current_chain
from agent.api.responses import Response, error_response, json_response
from agent.serving.chain import ChainNotReady, FallbackChain, UnknownVersion
from agent.serving.validation import InvalidInput, check_declared_shapes
from protocol.inference import (
    InferenceRequest,
    InferenceRequestError,
    InputFields,
    PlainRequest,
    RequestOutput,
    ServerMetadata,
    check_input_datatypes,
    check_requested_outputs,
    datatype_of,
    decode_inputs,
    describe_validation_error,
    model_metadata,
    plain_request,
    response_json,
    select_outputs,
)

if TYPE_CHECKING:
    from agent.api.connection import Request
    from agent.metrics import AgentMetrics
    from protocol.manifest import Manifest

logger = logging.getLogger(__name__)

# A target of only a path, with nothing escaped: no query, fragment, "%" or authority ("//").
_PLAIN_PATH: Final = re.compile(r"/(?!/)[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
# What json.loads(text) calls, made once.
_DECODE: Final = json.JSONDecoder().decode
# Charges what parsing a body costs before it is parsed; the refusal when it cannot.
ParseCharge = Callable[[bytearray], Awaitable[Response | None]]


class InferenceRoutes:
    """Answers the protocol's requests from the chain (or a callable returning it).

    ``admission_metrics`` gives the API's own figures for ``/metrics``, served
    before the agent's ``metrics``; requests refused before they reach the
    chain are counted in ``metrics``.
    """

    def __init__(
        self,
        chain: ChainProvider,
        admission_metrics: Callable[[], str],
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._chain = chain
        self._admission_metrics = admission_metrics
        self._metrics = metrics
        self._plan: _InputPlan | None = None

    async def dispatch(
        self, request: Request, body: bytearray, charge_parse: ParseCharge
    ) -> Response:
        """The response to ``request``; a bug here is a 500, logged."""
        method = request.method.decode("ascii", "replace")
        raw_target = request.target
        if len(raw_target) <= _KNOWN_TARGET_BYTES:
            path, known = _split_target(raw_target)
            parts = list(known)
        else:
            path, parts = _split(raw_target)
        try:
            if len(parts) == 4 and parts[3] == "infer" and parts[:2] == ["v2", "models"]:
                # The common request, routed as _route would route it.
                return _only("POST", method) or await self._infer(
                    parts[2], None, request, body, charge_parse
                )
            return await self._route(method, parts, request, body, charge_parse)
        except Exception:
            logger.exception("the local API failed on %s %s", method, path)
            return error_response(500, "internal error in the local inference API")

    async def _route(
        self,
        method: str,
        parts: list[str],
        request: Request,
        body: bytearray,
        charge_parse: ParseCharge,
    ) -> Response:
        if parts == ["metrics"]:
            return _only("GET", method) or Response(
                200,
                self._metrics_text(),
                content_type="text/plain; version=0.0.4; charset=utf-8",
            )
        if parts == ["v2"]:
            return _only("GET", method) or json_response(
                200, ServerMetadata(name="edgefleet-agent", version=agent.__version__)
            )
        if parts == ["v2", "health", "live"]:
            return _only("GET", method) or Response(200, b'{"live":true}')
        if parts == ["v2", "health", "ready"]:
            if wrong := _only("GET", method):
                return wrong
            ready, reason = current_chain(self._chain).readiness()
            return Response(200, b'{"ready":true}') if ready else error_response(503, reason)
        if len(parts) < 3 or parts[:2] != ["v2", "models"]:
            return error_response(
                404, f"no route {'/' + '/'.join(parts)}; see /v2/models/{{name}}/infer"
            )
        name, rest, version = parts[2], parts[3:], None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if rest == []:
            return _only("GET", method) or self._metadata(name, version)
        if rest == ["ready"]:
            return _only("GET", method) or self._model_ready(name, version)
        if rest == ["infer"]:
            return _only("POST", method) or await self._infer(
                name, version, request, body, charge_parse
            )
        return error_response(404, f"no route {'/' + '/'.join(parts)}")

    def _metrics_text(self) -> bytes:
        text = self._admission_metrics().encode()
        return text if self._metrics is None else text + self._metrics.exposition()

    def _find_model(self, chain: FallbackChain, name: str, version: str | None) -> Response | None:
        """An error response when this device does not serve ``name`` (at ``version``)."""
        manifest = chain.manifest
        if manifest is None:
            return error_response(503, "no model is installed on this device yet")
        if name != manifest.name:
            return error_response(
                404, f"no model named {name!r}; this device serves {manifest.name!r}"
            )
        if version is not None and version not in chain.versions:
            return error_response(
                404, f"model {name!r} has no version {version!r} here; it has {chain.versions}"
            )
        return None

    def _metadata(self, name: str, version: str | None) -> Response:
        chain = current_chain(self._chain)
        if missing := self._find_model(chain, name, version):
            return missing
        manifest = chain.manifest_of(version)
        assert manifest is not None  # _find_model checked the version
        return json_response(200, model_metadata(manifest, chain.versions))

    def _model_ready(self, name: str, version: str | None) -> Response:
        chain = current_chain(self._chain)
        if missing := self._find_model(chain, name, version):
            return missing
        ready, reason = chain.readiness()
        if not ready:
            return error_response(503, reason)
        return Response(200, json.dumps({"name": name, "ready": True}).encode())

    async def _infer(
        self,
        name: str,
        version: str | None,
        request: Request,
        body: bytearray,
        charge_parse: ParseCharge,
    ) -> Response:
        chain = current_chain(self._chain)
        prepared = await self._decode(chain, name, version, request, body, charge_parse)
        if isinstance(prepared, Response):
            # Refused before the chain saw it (the chain counts what it refuses itself).
            if self._metrics is not None:
                self._metrics.inference.refused(
                    "client_error" if prepared.status < 500 else "unavailable"
                )
            return prepared
        tensors, request_id, wanted = prepared
        try:
            answer = await chain.infer(tensors, version=version)
        except InvalidInput as exc:
            return error_response(422, str(exc))
        except UnknownVersion as exc:
            return error_response(404, str(exc))
        except ChainNotReady as exc:
            return error_response(503, str(exc))
        outputs = answer.outputs
        if wanted:
            try:
                outputs = select_outputs(outputs, wanted)
            except InferenceRequestError as exc:
                return error_response(400, str(exc))
        encoded = response_json(
            outputs,
            model_name=answer.model_name,
            model_version=answer.model_version,
            stage=answer.stage,
            escalated=answer.escalated,
            id=request_id,
        )
        return Response(200, encoded)

    async def _decode(
        self,
        chain: FallbackChain,
        name: str,
        version: str | None,
        request: Request,
        body: bytearray,
        charge_parse: ParseCharge,
    ) -> tuple[dict[str, npt.NDArray[Any]], str | None, list[RequestOutput] | None] | Response:
        """The request's tensors, id and requested outputs; or the response refusing it."""
        if missing := self._find_model(chain, name, version):
            return missing
        if request.binary_data:
            return error_response(
                400, "the binary tensor data extension is not supported; send JSON data"
            )
        if refused := await charge_parse(body):
            return refused
        try:
            parsed = parse_request(body)
        except InferenceRequestError as exc:
            return error_response(400, str(exc))
        except ValidationError as exc:
            return error_response(400, describe_validation_error(exc))
        finally:
            body.clear()  # parsed, the body is dead weight for the rest of the request
        manifest = chain.manifest
        assert manifest is not None
        plan = self._plan
        if plan is None or plan.manifest is not manifest:
            plan = self._plan = _InputPlan(manifest)
        inputs = parsed.inputs
        if not plan.shapes_fit(inputs):
            try:
                # The declared shapes against the model's before decoding allocates anything.
                check_declared_shapes(manifest, [(t.name, t.shape) for t in inputs])
            except InvalidInput as exc:
                return error_response(422, str(exc))
        try:
            if not plan.datatypes_fit(inputs):
                check_input_datatypes(manifest, inputs)
            tensors = decode_inputs(parsed)
            if parsed.outputs:
                check_requested_outputs(plan.output_names, parsed.outputs)
        except InferenceRequestError as exc:
            return error_response(400, str(exc))
        # Not the parsed request itself: its data lists take several times the tensors' memory.
        return tensors, parsed.id, parsed.outputs


class _InputPlan:
    """A manifest's inputs as the checks before decoding read them, made once per manifest.

    ``shapes_fit`` and ``datatypes_fit`` pass what ``check_declared_shapes`` and
    ``check_input_datatypes`` pass, and nothing they refuse; when they do not
    pass, those checks run, and refuse or not as before.
    """

    __slots__ = ("datatypes", "examples", "manifest", "output_names")

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        # An input with a negative dimension in its example shape is left to the full check.
        self.examples = {
            spec.name: list(spec.example_shape)
            for spec in manifest.inputs
            if all(d >= 0 for d in spec.example_shape)
        }
        self.datatypes = {spec.name: datatype_of(spec.dtype) for spec in manifest.inputs}
        self.output_names = [spec.name for spec in manifest.outputs]

    def shapes_fit(self, inputs: Sequence[InputFields]) -> bool:
        """Whether every input is one the model has, shaped ``[rows >= 1, *example]``."""
        examples = self.examples
        for tensor in inputs:
            example = examples.get(tensor.name)
            shape = tensor.shape
            if (
                example is None
                or len(shape) != len(example) + 1
                or shape[0] < 1
                or shape[1:] != example
            ):
                return False
        return True

    def datatypes_fit(self, inputs: Sequence[InputFields]) -> bool:
        """Whether every input declares the datatype the model takes for it."""
        datatypes = self.datatypes
        return all(datatypes.get(tensor.name) == tensor.datatype for tensor in inputs)


def parse_request(body: bytearray) -> InferenceRequest | PlainRequest:
    """The request ``body`` holds, parsed by Python's json and checked by pydantic.

    Not by pydantic's own JSON parser: it builds a tree of its own before the
    Python objects, which costs about twice as much memory per array. A request
    of the common shape is read without pydantic (:func:`plain_request`), with
    the same fields.
    """
    try:
        text = body.decode("utf-8")
        # json.loads(text) without its own checks of the argument's type; a byte order mark,
        # which it refuses in a way of its own, still goes to it.
        document = json.loads(text) if text[:1] == "\ufeff" else _DECODE(text)
    except UnicodeDecodeError as exc:
        raise InferenceRequestError(
            f"the body is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer of over 4300 digits
        raise InferenceRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else "a single value"
        raise InferenceRequestError(
            f"Input should be an object (an inference request), the body is {kind}"
        )
    if (read := plain_request(document)) is not None:
        return read
    return InferenceRequest.model_validate(document)


# Targets up to this long are split once each (the few a device's apps send, over and over).
_KNOWN_TARGET_BYTES: Final = 256


@lru_cache(maxsize=128)
def _split_target(target: bytes) -> tuple[str, tuple[str, ...]]:
    path, parts = _split(target)
    return path, tuple(parts)


def _split(raw_target: bytes) -> tuple[str, list[str]]:
    """A request target's path and its non-empty segments, unescaped."""
    target = raw_target.decode("ascii", "replace")
    if _PLAIN_PATH.fullmatch(target):  # what urlsplit and unquote would leave as it is
        return target, [p for p in target.split("/") if p]
    path = urlsplit(target).path
    return path, [unquote(p) for p in path.split("/") if p]


def _only(allowed: str, method: str) -> Response | None:
    if method == allowed or (allowed == "GET" and method == "HEAD"):
        return None
    response = error_response(405, f"use {allowed} here, not {method}")
    response.headers.append(("Allow", allowed))
    return response
