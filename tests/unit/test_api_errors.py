"""Errors a caller can cause are answered with their status and one line, never a 500."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from fleet_server.api.errors import errors_middleware
from fleet_server.drift import DriftError
from fleet_server.labels.rules import LabelsMismatch


async def answer_to(error: Exception) -> web.Response:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise error

    request = make_mocked_request("GET", "/api/v1/drift?tag=nope")
    response = await errors_middleware(request, handler)
    assert isinstance(response, web.Response)
    return response


@pytest.mark.asyncio
async def test_a_drift_error_is_answered_with_its_status_and_message() -> None:
    response = await answer_to(DriftError("no device has tag 'nope'"))
    assert response.status == 404
    assert response.text is not None
    assert json.loads(response.text) == {"error": "no device has tag 'nope'"}


@pytest.mark.asyncio
async def test_another_kind_of_error_is_answered_with_its_own_status() -> None:
    response = await answer_to(LabelsMismatch("window w1: its model has no score output"))
    assert response.status == 422
    assert response.text is not None
    assert json.loads(response.text) == {"error": "window w1: its model has no score output"}
