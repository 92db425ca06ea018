"""The local inference API end to end: a real server on localhost, real models, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from agent.api import ApiLimits, InferenceClient, LocalApi
from agent.api.admission import MAX_JSON_DEPTH, parse_cost, request_cost
from agent.api.jsonscan import scan_structure
from agent.serving import ChainNotReady, FallbackChain, InvalidInput, ModelSlot
from firmware_images.tflite_writer import build_image_model
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from protocol.inference import MAX_RANK
from protocol.manifest import Manifest
from testbed.fleet import AgentProcess
from testbed.images import MODELS, make_bundle

pytestmark = pytest.mark.integration

T = TypeVar("T")
BASELINE = np.load(MODELS / "baseline.npy")
RUNTIME = default_runtime()
ROOT = Path(__file__).resolve().parents[2]


def read_manifest(path: Path) -> Manifest:
    with path.open("rb") as f:
        return read_bundle(f)[0]


@pytest.fixture(scope="module")
def manifests(
    bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Manifest]:
    bad = make_bundle(tmp_path_factory.mktemp("v3"), "v3-bad", "3.0.0")
    return {
        "v1": read_manifest(bundles["v1"]),
        "v2": read_manifest(bundles["v2"]),
        "v3-bad": read_manifest(bad),
    }


def slot(manifests: dict[str, Manifest], model: str) -> ModelSlot:
    return ModelSlot(manifests[model], RUNTIME.load(MODELS / f"{model}.tflite"))


class ServedApi:
    """A LocalApi on a free port, served by an event loop in a background thread."""

    def __init__(self, chain: FallbackChain, **options: Any) -> None:
        self.chain = chain
        self.loop = asyncio.new_event_loop()
        self.api = LocalApi(chain, port=0, **options)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.api.start())
        self.port = self.api.port

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.call(self.api.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(
        self, method: str, path: str, body: bytes | str | None = None
    ) -> tuple[int, dict[str, Any]]:
        conn = self.connect()
        try:
            return exchange(conn, method, path, body)
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        """Send raw bytes, return everything the server sends before it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def exchange(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(payload) if payload else {}


def infer_body(x: npt.NDArray[Any], **extra: Any) -> str:
    tensor = {"name": "features", "shape": list(x.shape), "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": x.reshape(-1).tolist()}], **extra})


INFER = "/v2/models/pump-health/infer"


@pytest.fixture(scope="module")
def served(manifests: dict[str, Manifest]) -> Iterator[ServedApi]:
    server = ServedApi(FallbackChain(slot(manifests, "v2"), slot(manifests, "v1")))
    yield server
    server.close()


# -- health and metadata -----------------------------------------------------------------------


def test_live_and_ready(served: ServedApi) -> None:
    assert served.request("GET", "/v2/health/live") == (200, {"live": True})
    assert served.request("GET", "/v2/health/ready") == (200, {"ready": True})
    assert served.request("GET", "/v2/models/pump-health/ready") == (
        200,
        {"name": "pump-health", "ready": True},
    )


def test_a_device_without_a_model_is_not_ready() -> None:
    server = ServedApi(FallbackChain())
    try:
        status, body = server.request("GET", "/v2/health/ready")
        assert status == 503
        assert body == {"error": "no model is installed on this device yet"}
        assert server.request("GET", "/v2/health/live")[0] == 200
        assert server.request("POST", INFER, infer_body(BASELINE[:1]))[0] == 503
    finally:
        server.close()


def test_model_metadata_comes_from_the_manifest(served: ServedApi) -> None:
    status, body = served.request("GET", "/v2/models/pump-health")
    assert status == 200
    assert body == {
        "name": "pump-health",
        "versions": ["2.0.0", "1.0.0"],
        "platform": "tflite",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert served.request("GET", "/v2/models/pump-health/versions/1.0.0")[0] == 200


def test_unknown_models_versions_and_routes_are_404(served: ServedApi) -> None:
    status, body = served.request("GET", "/v2/models/other-model")
    assert status == 404
    assert body["error"] == "no model named 'other-model'; this device serves 'pump-health'"
    status, body = served.request("POST", "/v2/models/pump-health/versions/9.9.9/infer", "{}")
    assert status == 404
    assert "'9.9.9'" in body["error"]
    assert served.request("GET", "/v1/models")[0] == 404
    status, body = served.request("GET", INFER)
    assert status == 405
    assert body["error"] == "use POST here, not GET"


# -- inference -------------------------------------------------------------------------------


def test_an_inference_says_which_stage_and_version_answered(served: ServedApi) -> None:
    x = BASELINE[:2]
    status, body = served.request("POST", INFER, infer_body(x, id="req-7"))
    assert status == 200
    assert body["model_name"] == "pump-health"
    assert body["model_version"] == "2.0.0"
    assert body["id"] == "req-7"
    assert body["parameters"] == {"stage": "active", "model_version": "2.0.0", "escalated": False}
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("scores", "FP32", [2, 4])
    expected = RUNTIME.load(MODELS / "v2.tflite").run({"features": x})["scores"]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, 4), expected, rtol=1e-6)


def test_nested_data_and_a_pinned_version(served: ServedApi) -> None:
    x = BASELINE[:2]
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [2, 16], "datatype": "FP32", "data": x.tolist()}]}
    )
    status, answer = served.request("POST", "/v2/models/pump-health/versions/1.0.0/infer", body)
    assert status == 200
    assert answer["parameters"]["stage"] == "previous"
    assert answer["model_version"] == "1.0.0"


def test_a_failing_active_model_is_answered_by_the_previous_one(
    manifests: dict[str, Manifest],
) -> None:
    server = ServedApi(FallbackChain(slot(manifests, "v3-bad"), slot(manifests, "v2")))
    try:
        idle = BASELINE[:2].copy()
        idle[1, 0] = 0.0
        status, body = server.request("POST", INFER, infer_body(idle))
        assert status == 200
        assert body["parameters"] == {
            "stage": "previous",
            "model_version": "2.0.0",
            "escalated": False,
        }
        assert all(np.isfinite(body["outputs"][0]["data"]))
    finally:
        server.close()


# -- bad requests: always 4xx, naming what was wrong -----------------------------------------


def valid_tensor(**changes: Any) -> dict[str, Any]:
    x = BASELINE[:1]
    tensor = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": x[0].tolist()}
    return {**tensor, **changes}


def with_value(index: int, value: Any) -> dict[str, Any]:
    data: list[Any] = BASELINE[0].tolist()
    data[index] = value
    return valid_tensor(data=data)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "the body is not valid JSON"),
        ("[]", 400, "Input should be an object"),
        ("{}", 400, "inputs: Field required"),
        ('{"inputs": []}', 400, "inputs: List should have at least 1 item"),
        (
            {"inputs": [valid_tensor(shape=[2, 16])]},
            400,
            "data has 16 elements, shape [2, 16] needs 32",
        ),
        ({"inputs": [valid_tensor(datatype="BYTES")]}, 400, "datatype 'BYTES' is not supported"),
        (
            {"inputs": [with_value(3, "hot")]},
            400,
            "input 'features': data holds values that are not FP32",
        ),
        ({"inputs": [valid_tensor(), valid_tensor()]}, 400, "input 'features' appears twice"),
        ({"inputs": [valid_tensor()], "outputs": [{"name": "logits"}]}, 400, "output 'logits'"),
        (
            {"inputs": [valid_tensor(shape=[16])]},
            422,
            "has shape [16], the model takes [batch, 16] (add the batch dimension)",
        ),
        (
            {"inputs": [valid_tensor(name="image")]},
            422,
            "input 'image': is not an input of model 'pump-health'",
        ),
        (
            {"inputs": [with_value(5, None)]},
            422,
            "input 'features': feature 'vib_rms_x' (element 5) is NaN",
        ),
        (
            {"inputs": [with_value(0, -5.0)]},
            422,
            "feature 'shaft_rpm' (element 0) is -5.0, below its valid minimum 0.0",
        ),
        (
            {"inputs": [with_value(15, 1e400)]},
            422,
            "input 'features': feature 'acoustic_db' (element 15) is Inf",
        ),
    ],
)
def test_a_bad_request_gets_a_4xx_naming_what_was_wrong(
    served: ServedApi, body: Any, status: int, message: str
) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    got, answer = served.request("POST", INFER, text)
    assert got == status
    assert list(answer) == ["error"]
    assert message in answer["error"]


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        # Whole numbers that FP32 could hold: still refused, never converted silently.
        ("INT64", [int(v) for v in BASELINE[0]], "unexpected datatype INT64, the model takes FP32"),
        # FP64 too: the protocol has no implicit conversions (Triton: "unexpected datatype").
        ("FP64", BASELINE[0].tolist(), "unexpected datatype FP64, the model takes FP32"),
        ("BOOL", [True] * 16, "unexpected datatype BOOL, the model takes FP32"),
        ("BYTES", ["a"] * 16, "datatype 'BYTES' is not supported; the model takes FP32"),
    ],
)
def test_a_datatype_other_than_the_models_is_a_400_naming_the_tensor_and_both_datatypes(
    served: ServedApi, datatype: str, data: list[Any], message: str
) -> None:
    body = {"inputs": [valid_tensor(datatype=datatype, data=data)]}
    status, answer = served.request("POST", INFER, json.dumps(body))
    assert (status, answer) == (400, {"error": f"input 'features': {message}"})


@pytest.mark.parametrize(("index", "value"), [(15, 1e300), (3, -1e300)])
def test_an_fp32_value_beyond_float32_is_out_of_range_not_inf(
    served: ServedApi, index: int, value: float
) -> None:
    status, answer = served.request(
        "POST", INFER, json.dumps({"inputs": [with_value(index, value)]})
    )
    assert (status, answer) == (
        400,
        {"error": f"input 'features': element {index} is {value!r}, out of range for FP32"},
    )


def test_json_nan_is_refused_by_name(served: ServedApi) -> None:
    text = infer_body(BASELINE[:1]).replace(repr(float(BASELINE[0, 2])), "NaN", 1)
    status, body = served.request("POST", INFER, text)
    assert (status, body) == (
        422,
        {"error": "input 'features': feature 'ambient_temp_c' (element 2) is NaN"},
    )


def test_a_body_over_the_limit_is_413(manifests: dict[str, Manifest]) -> None:
    server = ServedApi(FallbackChain(slot(manifests, "v2")), limits=ApiLimits(max_body_bytes=4096))
    try:
        big = infer_body(BASELINE[:64])  # about 20 KB
        status, body = server.request("POST", INFER, big)
        assert status == 413
        assert body == {"error": "the request body is over 4096 bytes"}
        chunked = (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{len(big):x}\r\n{big}\r\n0\r\n\r\n"
        ).encode()
        assert server.raw(chunked).startswith(b"HTTP/1.1 413 ")
        assert server.request("POST", INFER, infer_body(BASELINE[:1]))[0] == 200
    finally:
        server.close()


def test_a_huge_declared_length_is_refused_before_the_body_arrives(served: ServedApi) -> None:
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n"
    response = served.raw(head.encode())
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in response


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\x00\xff\x10garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /v2/health/ready HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 40_000 + b"\r\n\r\n",
    ],
)
def test_garbage_on_the_wire_gets_a_4xx_and_a_closed_connection(
    served: ServedApi, data: bytes
) -> None:
    response = served.raw(data)
    status = int(response.split(b" ", 2)[1])
    assert 400 <= status < 500


def test_mutated_requests_never_get_a_5xx(served: ServedApi) -> None:
    valid = infer_body(BASELINE[:2], id="fuzz").encode()
    rng = random.Random(7)
    conn = served.connect()
    statuses = set()
    try:
        for _ in range(300):
            body = bytearray(valid)
            for _ in range(rng.randint(1, 6)):
                position = rng.randrange(len(body))
                action = rng.random()
                if action < 0.4:
                    body[position] = rng.choice(b'{}[],:"0123456789.-eE nulltruefalseNaN\x00\xff')
                elif action < 0.7:
                    del body[position : position + rng.randint(1, 40)]
                else:
                    body[position:position] = bytes(rng.randrange(256) for _ in range(3))
            status, answer = exchange(conn, "POST", INFER, bytes(body))
            statuses.add(status)
            assert status < 500, answer
            assert status == 200 or set(answer) == {"error"}
    finally:
        conn.close()
    assert {200, 400, 422} <= statuses, statuses


ODD_VALUES: list[Any] = [
    None,
    True,
    "",
    "FP32",
    -1,
    0,
    2**70,
    1e308,
    [],
    {},
    [[]],
    [None],
    ["1"],
    [[1, 2], [3]],
    [[[[[[[[1]]]]]]]],
    {"name": "features"},
]


def test_requests_with_odd_values_in_any_field_never_get_a_5xx(served: ServedApi) -> None:
    rng = random.Random(11)
    conn = served.connect()
    statuses = set()
    try:
        for _ in range(300):
            request: dict[str, Any] = json.loads(infer_body(BASELINE[:2]))
            request["outputs"] = [{"name": "scores"}]
            tensor, output, data = (
                request["inputs"][0],
                request["outputs"][0],
                request["inputs"][0]["data"],
            )
            for _ in range(rng.randint(1, 3)):
                value = rng.choice(ODD_VALUES)
                target = rng.choice([request, tensor, output, data])
                if target is data:
                    data[rng.randrange(len(data))] = value
                else:
                    target[rng.choice([*target, "parameters", "id"])] = value
            status, answer = exchange(conn, "POST", INFER, json.dumps(request))
            statuses.add(status)
            assert status < 500, (request, answer)
            assert status == 200 or set(answer) == {"error"}
    finally:
        conn.close()
    assert {400, 422} <= statuses, statuses


# -- shapes: checked against the model before anything is allocated ---------------------------


def shaped(shape: list[int], data: list[Any] | None = None) -> str:
    tensor = {"name": "features", "shape": shape, "datatype": "FP32", "data": data or []}
    return json.dumps({"inputs": [tensor]})


@pytest.mark.parametrize(
    ("shape", "data", "status", "message"),
    [
        ([1] * 33, [1.0], 422, "input 'features': has 33 dimensions, the model takes [batch, 16]"),
        (
            [0, 2**63],
            [],
            422,
            "input 'features': has shape [0, 9223372036854775808], the model takes [batch, 16]",
        ),
        (
            [0, 2**40, 2**40, 3],
            [],
            422,
            "input 'features': has shape [0, 1099511627776, 1099511627776, 3], "
            "the model takes [batch, 16]",
        ),
        ([1] * 100_000, [1.0], 422, "input 'features': has 100000 dimensions"),
        ([-1, 16], [], 422, "input 'features': has a negative dimension in its shape [-1, 16]"),
        ([1, -16], [], 422, "input 'features': has a negative dimension in its shape [1, -16]"),
        ([0, 16], [], 422, "input 'features': holds no rows (the batch dimension is 0)"),
        (
            [2**63, 16],
            BASELINE[0].tolist(),
            400,
            "input 'features': shape [9223372036854775808, 16] is larger than any array can be",
        ),
        (
            [10**30, 16],
            BASELINE[0].tolist(),
            400,
            "input 'features': shape [1000000000000000000000000000000, 16] is larger",
        ),
        (
            [3, 16],
            BASELINE[0].tolist(),
            400,
            "input 'features': data has 16 elements, shape [3, 16] needs 48",
        ),
        (
            [1, 16],
            BASELINE[0].tolist()[:15],
            400,
            "input 'features': data has 15 elements, shape [1, 16] needs 16",
        ),
    ],
)
def test_a_shape_no_input_can_have_is_a_4xx_naming_the_tensor(
    served: ServedApi, shape: list[int], data: list[Any], status: int, message: str
) -> None:
    got, answer = served.request("POST", INFER, shaped(shape, data))
    assert (got, list(answer)) == (status, ["error"])
    assert answer["error"].startswith(message)
    assert len(answer["error"]) < 300
    # and the API still answers
    assert served.request("POST", INFER, infer_body(BASELINE[:1]))[0] == 200


# -- limits: connections and bytes in flight --------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock``: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, body


def metrics(server: ServedApi) -> dict[str, float]:
    conn = server.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain")
        text = response.read().decode()
    finally:
        conn.close()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_connection_beyond_the_limit_gets_503_with_retry_after(
    manifests: dict[str, Manifest],
) -> None:
    limits = ApiLimits(max_connections=2, retry_after_s=7)
    server = ServedApi(FallbackChain(slot(manifests, "v2")), limits=limits)
    held = [server.connect(), server.connect()]
    try:
        for conn in held:  # two keep-alive connections take both slots
            assert exchange(conn, "GET", "/v2/health/live")[0] == 200
        body = infer_body(BASELINE[:1]).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
            third.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, headers, answer = read_response(third)
            assert status == 503
            assert headers["retry-after"] == "7"
            assert headers["connection"] == "close"
            assert json.loads(answer) == {
                "error": "the local API serves 2 connections at a time and all are busy; "
                "retry after 7 s"
            }
            assert third.recv(1) == b""  # closed
        held.pop().close()
        server.call(asyncio.sleep(0.2))  # the server notices the close
        conn = server.connect()
        try:
            assert exchange(conn, "POST", INFER, body)[0] == 200
        finally:
            conn.close()
        assert metrics(server)['edgefleet_agent_api_refused_total{limit="connections"}'] == 1
    finally:
        for conn in held:
            conn.close()
        server.close()


def api_with_room_for_one(
    manifests: dict[str, Manifest], *, spare: int = 0, **limits: Any
) -> tuple[ServedApi, bytes, bytes]:
    """An API with room in flight for one 8-row request (and ``spare`` bytes); its body and head."""
    body = infer_body(BASELINE[:8]).encode()
    room = ApiLimits(
        max_body_bytes=len(body), max_inflight_bytes=request_cost(len(body)) + spare, **limits
    )
    server = ServedApi(FallbackChain(slot(manifests, "v2")), limits=room)
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return server, body, head


def test_a_request_beyond_the_bytes_in_flight_gets_503_and_its_body_is_never_read(
    manifests: dict[str, Manifest],
) -> None:
    server, body, head = api_with_room_for_one(manifests, admission_wait_s=0, retry_after_s=3)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as first:
            first.sendall(head + body[:100])  # admitted: its charge is held until it is answered
            server.call(asyncio.sleep(0.2))
            assert metrics(server)["edgefleet_agent_api_inflight_bytes"] == request_cost(len(body))
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as second:
                second.sendall(head + body)
                status, headers, answer = read_response(second)
                assert (status, headers["retry-after"]) == (503, "3")
                assert "bytes for requests in flight" in json.loads(answer)["error"]
            first.sendall(body[100:])
            status, _, answer = read_response(first)
            assert status == 200
            assert json.loads(answer)["outputs"][0]["shape"] == [8, 4]
        figures = metrics(server)
        assert figures['edgefleet_agent_api_refused_total{limit="inflight_bytes"}'] == 1
        assert figures["edgefleet_agent_api_inflight_bytes"] == 0
        assert figures["edgefleet_agent_api_peak_inflight_bytes"] == request_cost(len(body))
        assert server.request("POST", INFER, body)[0] == 200
    finally:
        server.close()


def test_a_request_waits_for_room_rather_than_being_refused(
    manifests: dict[str, Manifest],
) -> None:
    server, body, head = api_with_room_for_one(manifests, admission_wait_s=30)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as first:
            first.sendall(head + body[:100])
            server.call(asyncio.sleep(0.2))
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as second:
                second.sendall(head + body)
                server.call(asyncio.sleep(0.2))
                first.sendall(body[100:])  # the first finishes, the second gets its room
                assert read_response(first)[0] == 200
                assert read_response(second)[0] == 200
        assert metrics(server)['edgefleet_agent_api_refused_total{limit="inflight_bytes"}'] == 0
    finally:
        server.close()


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(
    manifests: dict[str, Manifest],
) -> None:
    server = ServedApi(FallbackChain(slot(manifests, "v2")), limits=ApiLimits(max_body_bytes=4096))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            )
            for _ in range(3):
                sock.sendall(b"800\r\n" + b" " * 2048 + b"\r\n")
            status, headers, answer = read_response(sock)
        assert (status, headers["connection"]) == (413, "close")
        assert json.loads(answer) == {"error": "the request body is over 4096 bytes"}
        assert metrics(server)['edgefleet_agent_api_refused_total{limit="body_too_large"}'] == 1
    finally:
        server.close()


def nested_data(rows: int, depth: int) -> str:
    """``rows`` values of 0, each in ``depth - 1`` arrays of one, in the data array."""
    one = "[" * (depth - 1) + "0" + "]" * (depth - 1)
    return "[" + ",".join([one] * rows) + "]"


def nested_request(rows: int, depth: int) -> bytes:
    shape = [rows] + [1] * (depth - 1)
    tensor = f'"name": "features", "shape": {json.dumps(shape)}, "datatype": "FP32"'
    return ('{"inputs": [{' + tensor + ', "data": ' + nested_data(rows, depth) + "}]}").encode()


def test_json_nested_deeper_than_a_request_needs_is_refused_before_it_is_parsed(
    served: ServedApi,
) -> None:
    # 100 levels of arrays: 31.7 bytes per body byte to parse; no tensor has 97 dimensions
    status, body = served.request("POST", INFER, nested_request(2000, 97))
    assert status == 400
    assert body == {
        "error": f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep; an "
        "inference request needs 3 levels around a tensor's data, and the data one per "
        f"dimension, at most {MAX_RANK}"
    }
    deep_parameters = '{"parameters": {"p": %s}, "inputs": []}' % ("[" * 40 + "]" * 40)
    assert served.request("POST", INFER, deep_parameters)[0] == 400
    # the deepest a request can be is parsed, and refused by the model's contract
    status, body = served.request("POST", INFER, nested_request(2, MAX_RANK))
    assert status == 422
    assert "input 'features'" in body["error"]
    # brackets in strings are not structure
    request = json.loads(infer_body(BASELINE[:1]))
    request["id"] = "[" * 200
    status, body = served.request("POST", INFER, json.dumps(request))
    assert (status, body["id"]) == (200, "[" * 200)


def test_a_body_of_many_small_arrays_is_charged_what_parsing_them_costs(
    manifests: dict[str, Manifest],
) -> None:
    body = nested_request(4096, 2)  # [[0],[0],...]: 4 bytes of body, a list of 88 bytes
    structure = scan_structure(body, MAX_JSON_DEPTH)
    cost = parse_cost(len(body), structure)
    assert cost > 2 * request_cost(len(body))
    server = ServedApi(
        FallbackChain(slot(manifests, "v2")),
        limits=ApiLimits(max_body_bytes=len(body), max_inflight_bytes=cost),
    )
    try:
        assert server.request("POST", INFER, body)[0] == 422  # a [4096, 1] input is not [n, 16]
        figures = metrics(server)
        assert figures["edgefleet_agent_api_peak_inflight_bytes"] == cost
        assert figures["edgefleet_agent_api_inflight_bytes"] == 0
    finally:
        server.close()
    # with a budget that holds the body's bytes but not its arrays, it is refused unparsed
    server = ServedApi(
        FallbackChain(slot(manifests, "v2")),
        limits=ApiLimits(max_body_bytes=len(body), max_inflight_bytes=cost - 1),
    )
    try:
        status, answer = server.request("POST", INFER, body)
        assert status == 413
        assert answer == {
            "error": f"the body holds {structure.arrays} arrays and {structure.objects} "
            f"objects, which would take {cost} bytes to parse, more than the {cost - 1} "
            "the local API has for requests in flight"
        }
        assert metrics(server)['edgefleet_agent_api_refused_total{limit="body_too_large"}'] == 1
    finally:
        server.close()


def wait_for_metric(server: ServedApi, name: str, value: float) -> None:
    for _ in range(200):
        if metrics(server)[name] == value:
            return
        server.call(asyncio.sleep(0.05))
    raise AssertionError(f"{name} never reached {value}: {metrics(server)[name]}")


def test_a_slow_client_is_cut_off_and_the_requests_waiting_for_its_bytes_are_served(
    manifests: dict[str, Manifest],
) -> None:
    # the next request waits for room as long as it takes
    server, body, head = api_with_room_for_one(manifests, admission_wait_s=60, body_timeout_s=0.5)
    answered = threading.Event()

    def trickle(sock: socket.socket) -> None:
        # a byte at a time, each well within read_timeout_s, until the server answers
        with contextlib.suppress(OSError):
            for byte in body:
                if answered.wait(0.05):
                    return
                sock.sendall(bytes([byte]))

    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
            slow.sendall(head)
            wait_for_metric(server, "edgefleet_agent_api_inflight_bytes", request_cost(len(body)))
            sender = threading.Thread(target=trickle, args=(slow,), daemon=True)
            sender.start()
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as other:
                other.sendall(head + body)
                assert read_response(other)[0] == 200
            status, headers, answer = read_response(slow)
            answered.set()
            sender.join(10)
        assert (status, headers["connection"]) == (408, "close")
        assert json.loads(answer)["error"].startswith("the request body did not arrive in time")
        figures = metrics(server)
        assert figures['edgefleet_agent_api_refused_total{limit="body_timeout"}'] == 1
        assert figures['edgefleet_agent_api_refused_total{limit="inflight_bytes"}'] == 0
        assert figures["edgefleet_agent_api_inflight_bytes"] == 0
    finally:
        server.close()


def chunked_head(path: str = INFER) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def test_a_tiny_chunked_request_does_not_hold_the_budget_of_the_largest_body(
    manifests: dict[str, Manifest],
) -> None:
    body = infer_body(BASELINE[:8]).encode()
    # room for one body of the largest size, and no waiting for room
    limits = ApiLimits(
        max_body_bytes=64 * 1024,
        max_inflight_bytes=request_cost(64 * 1024),
        admission_wait_s=0,
    )
    server = ServedApi(FallbackChain(slot(manifests, "v2")), limits=limits)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as tiny:
            tiny.sendall(chunked_head() + b"2\r\n{}\r\n")  # and nothing more, for now
            wait_for_metric(server, "edgefleet_agent_api_inflight_bytes", request_cost(2))
            assert server.request("POST", INFER, body)[0] == 200
            tiny.sendall(b"0\r\n\r\n")
            status, _, answer = read_response(tiny)
        assert (status, json.loads(answer)) == (400, {"error": "inputs: Field required"})
        assert metrics(server)["edgefleet_agent_api_inflight_bytes"] == 0
    finally:
        server.close()


def test_a_chunked_body_that_outgrows_the_room_left_is_refused_and_released(
    manifests: dict[str, Manifest],
) -> None:
    server, body, head = api_with_room_for_one(
        manifests, spare=request_cost(100), admission_wait_s=0
    )
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as holder:
            holder.sendall(head + body[:10])  # holds all but request_cost(100)
            wait_for_metric(server, "edgefleet_agent_api_inflight_bytes", request_cost(len(body)))
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as grower:
                grower.sendall(chunked_head() + f"{len(body):x}\r\n".encode() + body + b"\r\n")
                status, headers, answer = read_response(grower)
            assert (status, headers["retry-after"]) == (503, "1")
            assert "bytes for requests in flight" in json.loads(answer)["error"]
            holder.sendall(body[10:])
            assert read_response(holder)[0] == 200
        figures = metrics(server)
        assert figures['edgefleet_agent_api_refused_total{limit="inflight_bytes"}'] == 1
        assert figures["edgefleet_agent_api_inflight_bytes"] == 0
    finally:
        server.close()


# -- connections ----------------------------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(served: ServedApi) -> None:
    conn = served.connect()
    try:
        assert exchange(conn, "GET", "/v2/health/ready")[0] == 200
        sock = conn.sock
        assert exchange(conn, "POST", INFER, infer_body(BASELINE[:1]))[0] == 200
        assert exchange(conn, "POST", INFER, "{broken")[0] == 400  # an error keeps it open too
        assert exchange(conn, "POST", INFER, infer_body(BASELINE[1:3]))[0] == 200
        assert exchange(conn, "GET", "/v2/models/pump-health")[0] == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_concurrent_clients_are_all_answered_correctly(served: ServedApi) -> None:
    expected = RUNTIME.load(MODELS / "v2.tflite").run({"features": BASELINE[:40]})["scores"]

    def client(n: int) -> None:
        conn = served.connect()
        try:
            for i in range(10):
                row = (n * 10 + i) % 40
                status, body = exchange(conn, "POST", INFER, infer_body(BASELINE[row : row + 1]))
                assert status == 200
                np.testing.assert_allclose(body["outputs"][0]["data"], expected[row], rtol=1e-6)
        finally:
            conn.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))


def test_a_stalled_client_does_not_hold_up_others(served: ServedApi) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as stalled:
        stalled.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{{".encode()
        )
        assert served.request("POST", INFER, infer_body(BASELINE[:1]))[0] == 200


def test_the_api_runs_in_a_task_group_and_stops_on_cancel(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v2"))

    async def scenario() -> None:
        api = LocalApi(chain, port=0)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(api.serve_forever())
            while api.port == 0:
                await asyncio.sleep(0.01)
            port = api.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            task.cancel()
        # the open keep-alive connection was closed: the rest of the response, then EOF
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest.endswith(b'{"ready":true}')
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())


# -- in-process API ------------------------------------------------------------------------------


def test_the_in_process_client_validates_and_answers_like_http(
    manifests: dict[str, Manifest],
) -> None:
    chain = FallbackChain(slot(manifests, "v3-bad"), slot(manifests, "v2"))

    async def scenario() -> None:
        client = InferenceClient(chain)
        assert client.manifest is not None and client.manifest.version == "3.0.0"
        idle = BASELINE[:1].copy()
        idle[0, 0] = 0.0
        answer = await client.infer({"features": idle})
        assert (answer.stage, answer.model_version) == ("previous", "2.0.0")
        with pytest.raises(InvalidInput, match="'shaft_rpm'"):
            await client.infer({"features": [[-1.0] + [1.0] * 15]})
        with pytest.raises(RuntimeError, match="would block the event loop"):
            client.infer_blocking({"features": idle})
        # an app thread waits for an answer computed on the agent's loop
        from_thread = await asyncio.to_thread(client.infer_blocking, {"features": BASELINE[:2]})
        assert (from_thread.stage, from_thread.outputs["scores"].shape) == ("active", (2, 4))

    asyncio.run(scenario())


def test_the_blocking_client_runs_its_own_loop_when_there_is_none(
    manifests: dict[str, Manifest],
) -> None:
    client = InferenceClient(FallbackChain(slot(manifests, "v2")))
    answer = client.infer_blocking({"features": BASELINE[:3]})
    assert (answer.stage, answer.model_version) == ("active", "2.0.0")


# -- the agent's metrics ---------------------------------------------------------------------------


def scrape(server: ServedApi) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` parsed by prometheus-client's parser: value by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = server.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_by(figures: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """``edgefleet_agent_inference_requests_total`` as {"stage/outcome": count}, zeros left out."""
    found = {}
    for (name, labels), value in figures.items():
        if name == "edgefleet_agent_inference_requests_total" and value:
            found[f"{dict(labels)['stage']}/{dict(labels)['outcome']}"] = value
    return found


def test_metrics_count_requests_by_the_stage_that_answered_and_refusals(
    manifests: dict[str, Manifest],
) -> None:
    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    chain = FallbackChain(
        slot(manifests, "v3-bad"), slot(manifests, "v2"), counter=metrics.inference
    )
    metrics.watch(chain=chain)
    server = ServedApi(chain, metrics=metrics)
    idle = BASELINE[:1].copy()
    idle[0, 0] = 0.0  # v3-bad answers NaN for an idle machine
    stages = []
    try:
        for x in (BASELINE[:1], BASELINE[1:3], idle, BASELINE[3:4], idle):
            status, body = server.request("POST", INFER, infer_body(x))
            assert status == 200
            stages.append(body["parameters"]["stage"])
        assert stages == ["active", "active", "previous", "active", "previous"]
        figures = scrape(server)
        info = {
            dict(labels)["slot"]: (dict(labels)["name"], dict(labels)["version"], value)
            for (name, labels), value in figures.items()
            if name == "edgefleet_agent_model_info"
        }
        assert info == {
            "active": ("pump-health", "3.0.0", 1),
            "previous": ("pump-health", "2.0.0", 1),
        }

        # The previous model gone (an install reuses its slot): only the safe default is left.
        chain.set_models(active=slot(manifests, "v3-bad"), previous=None)
        status, body = server.request("POST", INFER, infer_body(idle))
        assert (status, body["parameters"]["stage"]) == (200, "safe_default")

        # Refused by the API before the chain: not JSON, an unknown version, a wrong shape.
        assert server.request("POST", INFER, "{not json")[0] == 400
        assert server.request("POST", "/v2/models/pump-health/versions/9.9.9/infer", "{}")[0] == 404
        assert server.request("POST", INFER, infer_body(BASELINE[:1, :8]))[0] == 422
        # Refused by the chain's validation: out of the valid range.
        out_of_range = BASELINE[:1].copy()
        out_of_range[0, 0] = -1.0
        assert server.request("POST", INFER, infer_body(out_of_range))[0] == 422
        # And through the in-process client, which goes to the chain alone.
        with pytest.raises(InvalidInput):
            asyncio.run(InferenceClient(chain).infer({"features": out_of_range}))

        figures = scrape(server)
        assert requests_by(figures) == {
            "active/ok": 3,
            "previous/ok": 2,
            "safe_default/ok": 1,
            "none/client_error": 5,
        }
        for stage, answered in (("active", 3), ("previous", 2), ("safe_default", 1), ("cloud", 0)):
            labels = (("stage", stage),)
            count = figures[("edgefleet_agent_inference_duration_seconds_count", labels)]
            assert count == answered
            inf = figures[
                ("edgefleet_agent_inference_duration_seconds_bucket", (("le", "+Inf"), *labels))
            ]
            assert inf == answered
            assert (figures[("edgefleet_agent_inference_duration_seconds_sum", labels)] > 0) == (
                answered > 0
            )
        assert [v for (n, _), v in figures.items() if n == "edgefleet_agent_model_info"] == [1]
        # The API's own figures are still there, beside the agent's.
        assert figures[("edgefleet_agent_api_refused_total", (("limit", "connections"),))] == 0
        assert figures[("edgefleet_agent_api_connections", ())] == 1
    finally:
        server.close()


def test_a_device_without_a_model_counts_its_requests_as_unavailable() -> None:
    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    server = ServedApi(FallbackChain(counter=metrics.inference), metrics=metrics)
    try:
        assert server.request("POST", INFER, infer_body(BASELINE[:1]))[0] == 503
        assert requests_by(scrape(server)) == {"none/unavailable": 1}
        with pytest.raises(ChainNotReady):
            InferenceClient(server.chain).infer_blocking({"features": BASELINE[:1]})
        assert requests_by(scrape(server)) == {"none/unavailable": 2}
    finally:
        server.close()


# -- footprint -------------------------------------------------------------------------------------

SERVE_AND_MEASURE = """
import asyncio, json, sys
from pathlib import Path
from agent.api import LocalApi
from model_runtime import default_runtime
from agent.serving import FallbackChain, ModelSlot
from protocol.bundle import read_bundle

bundle, model = Path(sys.argv[1]), Path(sys.argv[2])
with bundle.open("rb") as f:
    manifest = read_bundle(f)[0]
chain = FallbackChain(ModelSlot(manifest, default_runtime().load(model)))
body = json.dumps({"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32",
                   "data": [1500.0] + [5.0] * 15}]}).encode()

async def main():
    async with LocalApi(chain, port=0) as api:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
            head = b"POST /v2/models/pump-health/infer HTTP/1.1\\r\\nHost: x\\r\\n"
            head += b"Connection: close\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
            writer.write(head + body)
            assert (await reader.read()).startswith(b"HTTP/1.1 200"), "inference failed"
            writer.close()
    status = Path("/proc/self/status").read_text()
    rss = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
    print(json.dumps({"rss_kib": int(rss), "aiohttp": "aiohttp" in sys.modules}))

asyncio.run(main())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_process_serving_v2_stays_within_the_device_memory_budget(
    bundles: dict[str, Path],
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_AND_MEASURE, str(bundles["v2"]), str(MODELS / "v2.tflite")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["aiohttp"] is False
    assert measured["rss_kib"] < 64 * 1024


# -- memory under 1,000 parallel requests: a real edge-agent serving a 128x128x3 image model ------

FACE_LIMITS = {
    "max_connections": 32,
    "max_body_bytes": 1_200_000,  # the images are about 1.0 MB of JSON each
    "max_inflight_bytes": 24 * 1024 * 1024,
    "retry_after_s": 2,
    "admission_wait_s": 1.0,
}
# What the process may add beyond its serving RSS and the budget: the state of
# 32 served and up to 256 turned-away connections (a few kB each), the worker
# threads that run the model, and the allocator's slack.
ALLOWANCE_KB = 24 * 1024
PARALLEL = 1000


def status_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@dataclass
class FaceAgent:
    agent: AgentProcess
    port: int
    images: list[npt.NDArray[np.float32]]
    expected: list[dict[str, npt.NDArray[Any]]]
    bodies: list[bytes]


@pytest.fixture(scope="module")
def face_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaceAgent]:
    from fleet_server.release.bundle_builder import BundleSpec, build_bundle
    from fleet_server.release.keys import init_keys
    from testbed.fleet import HARDWARE, AgentProcess, Fleet

    tmp = tmp_path_factory.mktemp("face")
    rng = np.random.default_rng(5)
    np.save(tmp / "images.npy", rng.uniform(0, 1, size=(24, 128, 128, 3)).astype(np.float32))
    model = build_image_model()
    (tmp / "face.tflite").write_bytes(model)
    built = build_bundle(
        model, tmp / "images.npy", BundleSpec(name="face", version="1.0.0", hardware_ids=[HARDWARE])
    )
    built.write(tmp / "face.bundle")
    fleet = Fleet(tmp / "fleet", init_keys(tmp / "release"), init_keys(tmp / "director"))
    fleet.director.register(fleet.director_keys, "camera-1")
    fleet.assign("camera-1", fleet.release(tmp / "face.bundle"))
    config = fleet.agent_config("camera-1")
    limits = "".join(f"{k} = {json.dumps(v)}\n" for k, v in FACE_LIMITS.items())
    config.write_text(config.read_text().replace("port = 0\n", f"port = 0\n{limits}", 1))
    agent = AgentProcess(config)
    try:
        url = agent.wait_ready()
        agent.wait_for(
            "face 1.0.0 installed",
            lambda: (
                (agent.journal().get("installed") or {}).get("version") == "1.0.0"
                and agent.journal().get("phase") == "idle"
            ),
        )
        local = RUNTIME.load(tmp / "face.tflite")
        images = [rng.uniform(0, 1, size=(1, 128, 128, 3)).astype(np.float32) for _ in range(4)]
        bodies = [
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1, 128, 128, 3],
                            "datatype": "FP32",
                            "data": x.reshape(-1).tolist(),
                        }
                    ]
                }
            ).encode()
            for x in images
        ]
        yield FaceAgent(
            agent,
            int(url.rsplit(":", 1)[1]),
            images,
            [local.run({"image": x}) for x in images],
            bodies,
        )
    finally:
        agent.stop()
        fleet.close()


async def post_and_close(port: int, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection, as a careful client sends it.

    The body is written as the server takes it, while the answer is read: a
    server may answer early (503) and close, and then the rest is not sent.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        view = memoryview(body)
        with contextlib.suppress(ConnectionError):  # answered early and closed
            for start in range(0, len(body), 65536):
                writer.write(view[start : start + 65536])
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
        data = await reader.read()  # Connection: close, so the answer ends at EOF
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, payload


def check_face_answer(face: FaceAgent, index: int, payload: bytes) -> None:
    answer = json.loads(payload)
    assert answer["parameters"]["stage"] == "active"
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    for name, expected in face.expected[index % len(face.images)].items():
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-5, atol=1e-6)


def test_face_shapes_no_input_can_have_get_a_4xx_from_the_agent(face_agent: FaceAgent) -> None:
    path = "/v2/models/face/infer"
    for shape, status, message in [
        (
            [0, 2**40, 2**40, 3],
            422,
            "input 'image': has shape [0, 1099511627776, 1099511627776, 3]",
        ),
        ([1] * 33, 422, "input 'image': has 33 dimensions, the model takes [batch, 128, 128, 3]"),
        ([0, 2**63], 422, "input 'image': has shape [0, 9223372036854775808]"),
        ([0, 128, 128, 3], 422, "input 'image': holds no rows (the batch dimension is 0)"),
        ([1, 128, 128, -3], 422, "input 'image': has a negative dimension"),
        ([2, 128, 128, 3], 400, "input 'image': data has 0 elements, shape [2, 128, 128, 3] needs"),
    ]:
        body = json.dumps(
            {"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": []}]}
        ).encode()
        got, _, payload = asyncio.run(post_and_close(face_agent.port, path, body))
        assert (got, json.loads(payload)["error"][: len(message)]) == (status, message)
    got, _, payload = asyncio.run(post_and_close(face_agent.port, path, face_agent.bodies[0]))
    assert got == 200
    check_face_answer(face_agent, 0, payload)


def test_the_agent_refuses_a_foreign_datatype_and_an_out_of_range_fp32_value(
    face_agent: FaceAgent,
) -> None:
    path = "/v2/models/face/infer"
    pixels = face_agent.images[0].reshape(-1)
    whole = [int(v > 0.5) for v in pixels]
    beyond = pixels.tolist()
    beyond[7] = -1e300
    for datatype, data, message in [
        ("INT64", whole, "input 'image': unexpected datatype INT64, the model takes FP32"),
        ("FP64", pixels.tolist(), "input 'image': unexpected datatype FP64, the model takes FP32"),
        ("FP32", beyond, "input 'image': element 7 is -1e+300, out of range for FP32"),
    ]:
        tensor = {"name": "image", "shape": [1, 128, 128, 3], "datatype": datatype, "data": data}
        body = json.dumps({"inputs": [tensor]}).encode()
        got, _, payload = asyncio.run(post_and_close(face_agent.port, path, body))
        assert (got, json.loads(payload)) == (400, {"error": message})
    got, _, payload = asyncio.run(post_and_close(face_agent.port, path, face_agent.bodies[0]))
    assert got == 200
    check_face_answer(face_agent, 0, payload)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_1000_parallel_requests_stay_within_the_serving_memory_plus_the_budget(
    face_agent: FaceAgent,
) -> None:
    pid, path = face_agent.agent.proc.pid, "/v2/models/face/infer"

    async def requests(n: int) -> list[tuple[int, dict[str, str], bytes]]:
        return await asyncio.gather(
            *(post_and_close(face_agent.port, path, face_agent.bodies[i % 4]) for i in range(n))
        )

    # Serving: warmed up by requests one and a few at a time, below every limit.
    for _ in range(8):
        assert asyncio.run(requests(1))[0][0] == 200
    warm = [status for status, _, _ in asyncio.run(requests(4))]
    assert set(warm) <= {200, 503}
    serving_kb = status_kb(pid)["VmRSS"]
    # "5" resets VmHWM to the current RSS (Linux 4.0+); sampling covers older kernels.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    sampled = [serving_kb]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled.append(status_kb(pid)["VmRSS"])
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answers = asyncio.run(requests(PARALLEL))
    finally:
        done.set()
        sampler.join()
    peak_kb = max(status_kb(pid)["VmHWM"], *sampled)

    answered = [i for i, (status, _, _) in enumerate(answers) if status == 200]
    refused = [(s, h, p) for s, h, p in answers if s == 503]
    assert len(answered) + len(refused) == PARALLEL, {s for s, _, _ in answers}
    for i in answered:
        check_face_answer(face_agent, i, answers[i][2])
    for _, headers, payload in refused:
        assert headers["retry-after"] == "2"
        assert "retry after 2 s" in json.loads(payload)["error"]
    assert answered and refused  # the limits were reached, and requests were still served
    budget_kb = FACE_LIMITS["max_inflight_bytes"] // 1024
    assert peak_kb <= serving_kb + budget_kb + ALLOWANCE_KB, (serving_kb, peak_kb)

    # The agent still serves, and counted what it refused.
    status, _, payload = asyncio.run(post_and_close(face_agent.port, path, face_agent.bodies[1]))
    assert status == 200
    check_face_answer(face_agent, 1, payload)
    text = urllib.request.urlopen(f"http://127.0.0.1:{face_agent.port}/metrics", timeout=10).read()
    figures = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line[0] != "#")
    counted = sum(
        int(figures[f'edgefleet_agent_api_refused_total{{limit="{reason}"}}'])
        for reason in ("connections", "inflight_bytes")
    )
    assert counted == len(refused) + warm.count(503)
    assert (
        int(figures["edgefleet_agent_api_peak_inflight_bytes"]) <= FACE_LIMITS["max_inflight_bytes"]
    )
    print(
        f"serving {serving_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB under {PARALLEL} "
        f"parallel requests: {len(answered)} answered, {len(refused)} refused (503)"
    )
