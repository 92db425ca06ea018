"""Property-based requests from the served OpenAPI document (schemathesis), on both databases.

For every operation, schemathesis generates valid requests and requests that
break the document (wrong types, missing fields, bad patterns, odd path
values), sent with a mix of credentials. The server must never answer 5xx,
every answer must match the document (status, media type, body schema),
invalid data must be refused, and every refusal must show in
``edgefleet_api_requests_rejected_total``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from testbed.api_server import ServerThread, repository_files
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

EXAMPLES = 10  # per operation and generation mode: about 400 requests per database
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module", params=DATABASES)
def api(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    """A server holding a release and a device, and an Authorization header of each kind."""
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            repo = ImageRepository(tmp / "repo")
            repo.create(session_keys)
            repo.add_bundle(bundles["v1"], session_keys)
            files = repository_files(repo.path)
            admin = api.admin_token
            r = api.request("POST", "/api/v1/releases", token=admin, json={"files": files})
            assert r.status == 201, r.data
            r = api.request(
                "POST",
                "/api/v1/devices",
                token=admin,
                json={"device_id": "fuzz-device", "hardware_id": HARDWARE},
            )
            assert r.status == 201, r.data
            password = json.loads(r.data)["password"]
            r = api.request(
                "POST", "/api/v1/tokens", token=admin, json={"name": "fuzz", "role": "viewer"}
            )
            viewer = json.loads(r.data)["token"]
            device = base64.b64encode(f"fuzz-device:{password}".encode()).decode()
            credentials = {
                "admin": f"Bearer {admin}",
                "viewer": f"Bearer {viewer}",
                "device": f"Basic {device}",
                "forged": "Bearer 0123456789abcdef.forged",
                "none": "",
            }
            yield api, credentials
        finally:
            api.close()


def rejected_total(api: ServerThread) -> float:
    text = api.request("GET", "/metrics").data.decode()
    return sum(
        float(value)
        for value in re.findall(
            r"^edgefleet_api_requests_rejected_total\{[^}]*\} (\S+)$", text, re.M
        )
    )


def test_generated_requests_never_crash_and_every_rejection_is_counted(
    api: tuple[ServerThread, dict[str, str]],
) -> None:
    server, credentials = api
    schema = schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    statuses: Counter[int] = Counter()
    before = rejected_total(server)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation of the document is invalid: {result.err()}"
        operations.append(result.ok())
    assert len(operations) >= 20

    for operation in operations:
        # Mostly the credentials the operation wants, so requests get past authentication.
        wanted = "device" if operation.path.startswith(("/repository", "/director")) else "admin"
        who = st.sampled_from([*[wanted] * 5, "viewer", "forged", "none"])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), caller=who)
            def exchange(case: Any, caller: str) -> None:
                headers = {"Authorization": credentials[caller]} if credentials[caller] else {}
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                statuses[response.status_code] += 1
                assert response.status_code < 500, case.as_curl_command(headers)
                case.validate_response(response, checks=CHECKS, headers=headers)

            # An operation without parameters or body has nothing to make invalid.
            with contextlib.suppress(Unsatisfiable):
                exchange()

    assert sum(statuses.values()) >= 300, statuses
    assert not [s for s in statuses if s >= 500], statuses
    refused = sum(n for status, n in statuses.items() if status >= 400)
    assert refused > 0
    assert rejected_total(server) - before == refused, statuses
    assert server.request("GET", "/healthz").status == 200
