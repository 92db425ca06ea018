"""The OpenAPI 3.1 document, written from the operations' declarations.

Schemas come from the pydantic models of :mod:`protocol.api` (JSON Schema
2020-12, which OpenAPI 3.1 uses as is); paths, parameters, security and
responses come from each :class:`~fleet_server.api.operations.Operation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from fleet_server.api.operations import PATH_PARAMETERS, Operation
from protocol.api.base import ErrorBody

_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    206: "Partial content (HTTP Range)",
    400: "The body is not a JSON object, or the request cannot be done",
    401: "No credentials, or wrong ones",
    403: "The credentials do not allow this",
    404: "No such thing",
    409: "It conflicts with what exists",
    413: "The body is too large",
    416: "The range is outside the file",
    422: "A field is invalid; the message names it",
    503: "Not ready",
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "viewer": [{"bearer": []}],
    "operator": [{"bearer": []}],
    "admin": [{"bearer": []}],
    "device": [{"device": []}],
    "public": [],
}


def _schemas(operations: Iterable[Operation]) -> tuple[dict[Any, Any], dict[str, Any]]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for op in operations:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.query is not None:
            wanted.append((op.query, "validation"))
        if op.response is not None:
            wanted.append((op.response, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF)
    return refs, top.get("$defs", {})


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is either absent or a value; ``null`` cannot be written in a URL."""
    variants = schema.get("anyOf")
    if variants:
        rest = [v for v in variants if v.get("type") != "null"]
        if len(rest) == 1:
            merged = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            return {**merged, **rest[0]}
    return {k: v for k, v in schema.items() if k != "default" or v is not None}


def _parameters(op: Operation, defs: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": PATH_PARAMETERS[name]},
        }
        for name in op.path_parameters
    ]
    if op.query is not None:
        schema = defs[op.query.__name__]
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": _without_null(prop),
            }
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    return params


def _content(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _operation(op: Operation, refs: dict[Any, Any], defs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": _SECURITY[op.auth],
    }
    if op.description:
        out["description"] = op.description
    params = _parameters(op, defs)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": _content("application/json", refs[(op.body, "validation")]),
        }
    if op.response is not None:
        success = _content(op.media_type, refs[(op.response, "serialization")])
    elif op.media_type == "application/json":
        success = _content(op.media_type, {"type": "object"})
    else:
        success = _content(op.media_type, {"type": "string"})
    error = _content("application/json", refs[(ErrorBody, "serialization")])
    responses: dict[str, Any] = {}
    for status in (op.status, *op.other_success):
        responses[str(status)] = {"description": _STATUS_TEXT.get(status, ""), "content": success}
    for status in op.errors:
        responses[str(status)] = {"description": _STATUS_TEXT.get(status, ""), "content": error}
    out["responses"] = responses
    return out


def openapi_document(operations: Sequence[Operation], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``operations``."""
    refs, defs = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, defs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgefleet fleet server",
            "version": version,
            "description": (
                "Operators' REST API (bearer tokens with roles viewer < operator < admin) "
                "and release hosting for devices (HTTP Basic with the device's credentials). "
                'Every error is JSON {"error": "..."}.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token, ID.SECRET",
                },
                "device": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "device id and the password given at enrolment",
                },
            },
        },
    }
