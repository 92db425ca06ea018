"""The local API's bytes on the wire: requests in many small writes, pipelined requests,
refusals inside a pipeline, and a large response to a client with a small receive buffer."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api import ApiLimits
from agent.serving import FallbackChain, ModelSlot
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from testbed.images import MODELS
from tests.support.local_api import Served

pytestmark = pytest.mark.integration

BASELINE = np.load(MODELS / "baseline.npy")
INFER = "/v2/models/pump-health/infer"
EXPECTED = default_runtime().load(MODELS / "v2.tflite").run({"features": BASELINE})["scores"]


def chain_of(bundle: Path) -> FallbackChain:
    with bundle.open("rb") as f:
        manifest = read_bundle(f)[0]
    return FallbackChain(ModelSlot(manifest, default_runtime().load(MODELS / "v2.tflite")))


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path]) -> Iterator[Served]:
    server = Served(chain_of(bundles["v2"]))
    yield server
    server.close()


def infer_request(rows: slice, *, extra_headers: str = "") -> bytes:
    x = BASELINE[rows]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + body


class Reader:
    """Reads responses off a socket one at a time (Content-Length framing)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def response(self) -> tuple[int, dict[str, str], Any]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split(" ")[1]), headers, json.loads(body)

    def closed(self) -> bool:
        """Whether the server closes the connection with nothing more to read."""
        return not self.buffer and self.sock.recv(65536) == b""


def scores(answer: Any) -> Any:
    return np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(-1, 4)


def test_a_request_in_many_small_writes_is_answered(served: Served) -> None:
    request = infer_request(slice(0, 2))
    with served.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 7):
            sock.sendall(request[start : start + 7])
            time.sleep(0.001)
        status, _, answer = Reader(sock).response()
    assert status == 200
    np.testing.assert_allclose(scores(answer), EXPECTED[0:2], rtol=1e-6)


def test_pipelined_requests_in_one_write_are_answered_in_order(served: Served) -> None:
    requests = [infer_request(slice(i, i + 1)) for i in range(3)]
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with served.connect() as sock:
        sock.sendall(requests[0] + health + requests[1] + requests[2])
        reader = Reader(sock)
        first = reader.response()
        live = reader.response()
        rest = [reader.response(), reader.response()]
    assert first[0] == 200 and live[0] == 200 and all(r[0] == 200 for r in rest)
    assert live[2] == {"live": True}
    for row, (_, _, answer) in zip((0, 1, 2), [first, *rest], strict=True):
        np.testing.assert_allclose(scores(answer), EXPECTED[row : row + 1], rtol=1e-6)


def test_a_body_over_the_limit_inside_a_pipeline_is_413_and_ends_the_connection(
    bundles: dict[str, Path],
) -> None:
    server = Served(chain_of(bundles["v2"]), limits=ApiLimits(max_body_bytes=4096))
    try:
        with server.connect() as sock:
            sock.sendall(infer_request(slice(0, 1)) + infer_request(slice(0, 64)))
            reader = Reader(sock)
            ok = reader.response()
            refused = reader.response()
            assert reader.closed()
    finally:
        server.close()
    assert ok[0] == 200
    assert refused[0] == 413
    assert refused[1]["connection"] == "close"
    assert refused[2] == {"error": "the request body is over 4096 bytes"}


def test_a_header_line_over_the_limit_in_a_pipeline_is_refused_after_the_first_answer(
    served: Served,
) -> None:
    long_line = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 40_000
    with served.connect() as sock:
        sock.sendall(infer_request(slice(0, 1)) + long_line + b"\r\n\r\n")
        reader = Reader(sock)
        ok = reader.response()
        refused = reader.response()
    assert ok[0] == 200
    assert 400 <= refused[0] < 500
    assert refused[1]["connection"] == "close"


def test_a_large_response_arrives_whole_to_a_client_with_a_small_receive_buffer(
    served: Served,
) -> None:
    rows = slice(0, len(BASELINE))
    with served.connect(SO_RCVBUF=4096) as sock:
        sock.sendall(infer_request(rows))
        time.sleep(0.2)  # the server has written its answer before the client reads
        status, headers, answer = Reader(sock).response()
        # The connection still serves the next request.
        sock.sendall(infer_request(slice(0, 1)))
        again = Reader(sock).response()
    assert status == 200
    assert int(headers["content-length"]) > 100_000
    np.testing.assert_allclose(scores(answer), EXPECTED, rtol=1e-6)
    assert again[0] == 200
