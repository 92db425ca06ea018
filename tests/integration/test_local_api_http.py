"""The local API's HTTP/1.1 on a real socket: malformed and oversized heads, half-closed
connections, pipelined requests split anywhere, 100-continue, upgrade requests and HTTP/1.0."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.serving import FallbackChain, ModelSlot
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from testbed.images import MODELS
from tests.support.local_api import Served as LocalServed

pytestmark = pytest.mark.integration

BASELINE = np.load(MODELS / "baseline.npy")
INFER = "/v2/models/pump-health/infer"
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


class Served(LocalServed):
    """The shared test server, its connections without Nagle's delay."""

    def connect(self, *, nodelay: bool = True, **options: int) -> socket.socket:
        return super().connect(nodelay=nodelay, **options)

    def exchange(self, data: bytes) -> bytes:
        """Send ``data`` and half-close; everything the server sends until it closes."""
        with self.connect() as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data``, in order (Content-Length framing)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        found.append((int(status_line.split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return found


def infer_request(rows: slice, *, extra_headers: str = "") -> bytes:
    x = BASELINE[rows]
    tensor = {"name": "features", "shape": list(x.shape), "datatype": "FP32"}
    body = json.dumps({"inputs": [{**tensor, "data": x.reshape(-1).tolist()}]}).encode()
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + body


@pytest.fixture(scope="module")
def bare() -> Iterator[Served]:
    """An API without a model: its health routes answer, inference is 503."""
    server = Served(FallbackChain())
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path]) -> Iterator[Served]:
    with bundles["v2"].open("rb") as f:
        manifest = read_bundle(f)[0]
    runtime = default_runtime()
    server = Served(FallbackChain(ModelSlot(manifest, runtime.load(MODELS / "v2.tflite"))))
    yield server
    server.close()


# -- malformed and oversized heads: a 4xx/5xx naming the fault, then the connection ends ------


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request: Invalid method encountered"),
        (
            b"GET /v2 health HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "malformed HTTP request: Expected HTTP/, RTSP/ or ICE/",
        ),
        (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
            400,
            "malformed HTTP request: Invalid header token",
        ),
        (
            b"GET /v2/health/live HTTP/1.1\r\n\r\n",
            400,
            "malformed HTTP request: Missing mandatory Host: header",
        ),
        (
            b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Content-Length: 4\r\n\r\nabcd",
            400,
            "malformed HTTP request: Duplicate Content-Length",
        ),
        (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
            400,
            "malformed HTTP request: Invalid character in Content-Length",
        ),
        (
            b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "malformed HTTP request: Invalid character in chunk size",
        ),
        (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "malformed HTTP request: Request has invalid `Transfer-Encoding`; "
            "only chunked is supported",
        ),
        (
            b"GET /v2/health/live HTTP/3.7\r\nHost: x\r\n\r\n",
            505,
            "malformed HTTP request: Invalid HTTP version; this API speaks HTTP/1.1",
        ),
    ],
)
def test_a_malformed_request_is_refused_by_name_and_the_connection_closed(
    bare: Served, data: bytes, status: int, error: str
) -> None:
    [(got, headers, body)] = responses(bare.exchange(data))
    assert (got, headers["connection"]) == (status, "close")
    assert json.loads(body) == {"error": error}


def test_a_malformed_request_after_good_ones_is_refused_after_their_answers(
    bare: Served,
) -> None:
    answers = responses(bare.exchange(LIVE + LIVE + b"NOT HTTP\r\n\r\n" + LIVE))
    assert [status for status, _, _ in answers] == [200, 200, 400]


@pytest.mark.parametrize("piece", [None, 1000])
def test_a_head_over_16_kb_is_431_whether_it_comes_at_once_or_in_pieces(
    bare: Served, piece: int | None
) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(200))  # 22 KB
    data = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n"
    with bare.connect() as sock:
        for start in range(0, len(data), piece or len(data)):
            sock.sendall(data[start : start + (piece or len(data))])
            if piece:
                time.sleep(0.002)
        sock.shutdown(socket.SHUT_WR)
        [(status, headers, body)] = responses(read_to_end(sock))
    assert (status, headers["connection"]) == (431, "close")
    assert json.loads(body) == {
        "error": "malformed HTTP request: the request line and headers are over 16384 bytes"
    }


def test_a_single_header_line_over_16_kb_in_pieces_is_431(bare: Served) -> None:
    with bare.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        for _ in range(40):  # never ends: refused once over the limit
            try:
                sock.sendall(b"a" * 1000)
            except OSError:
                break
            time.sleep(0.002)
        [(status, _, _)] = responses(read_to_end(sock))
    assert status == 431


def test_a_head_of_12_kb_is_served(bare: Served) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100) for i in range(110))
    [(status, _, body)] = responses(
        bare.exchange(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n")
    )
    assert (status, json.loads(body)) == (200, {"live": True})


# -- half-closed connections ---------------------------------------------------------------


def test_requests_sent_before_a_half_close_are_all_answered_then_the_connection_ends(
    served: Served,
) -> None:
    data = served.exchange(infer_request(slice(0, 1)) + LIVE + infer_request(slice(1, 3)))
    answers = responses(data)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[2][2])["outputs"][0]["shape"] == [2, 4]


def test_a_half_close_inside_a_body_is_400_naming_how_much_came(served: Served) -> None:
    request = infer_request(slice(0, 4))
    head, _, body = request.partition(b"\r\n\r\n")
    [(status, headers, answer)] = responses(served.exchange(head + b"\r\n\r\n" + body[:50]))
    assert (status, headers["connection"]) == (400, "close")
    assert json.loads(answer) == {
        "error": "malformed HTTP request: the client stopped sending after 50 bytes of a "
        f"body of {len(body)} bytes"
    }


def test_a_connection_closed_while_its_request_is_served_leaves_the_api_serving(
    served: Served,
) -> None:
    for _ in range(20):
        with served.connect() as sock:
            # closed with a reset, before the answer comes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(infer_request(slice(0, 8)))
    [(status, _, _)] = responses(served.exchange(LIVE))
    assert status == 200


# -- pipelining -------------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 333])
def test_pipelined_requests_split_anywhere_are_answered_in_order(
    served: Served, piece: int
) -> None:
    requests = [infer_request(slice(i, i + 1)) for i in range(3)]
    data = requests[0] + LIVE + requests[1] + requests[2]
    expected = default_runtime().load(MODELS / "v2.tflite").run({"features": BASELINE[:3]})
    with served.connect() as sock:
        for start in range(0, len(data), piece):
            sock.sendall(data[start : start + piece])
        sock.shutdown(socket.SHUT_WR)
        answers = responses(read_to_end(sock))
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    assert json.loads(answers[1][2]) == {"live": True}
    for row, (_, _, body) in zip((0, 1, 2), [answers[0], *answers[2:]], strict=True):
        data_out = json.loads(body)["outputs"][0]["data"]
        np.testing.assert_allclose(data_out, expected["scores"][row], rtol=1e-6)


def test_a_pipelined_request_asking_to_close_is_the_last_answered(bare: Served) -> None:
    close = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = responses(bare.exchange(LIVE + close + LIVE))
    assert [(s, h.get("connection")) for s, h, _ in answers] == [(200, None), (200, "close")]


def test_pipelined_requests_get_one_answer_each_on_a_kept_alive_connection(
    served: Served,
) -> None:
    with served.connect() as sock:
        for _ in range(3):
            sock.sendall(LIVE * 5)
            data = b""
            while data.count(b"HTTP/1.1 200 OK") < 5 or not data.endswith(b"}"):
                data += sock.recv(65536)
            assert [s for s, _, _ in responses(data)] == [200] * 5


# -- the rest of HTTP/1.1 the API meets ------------------------------------------------------------


def test_expect_100_continue_is_answered_before_the_body_is_sent(served: Served) -> None:
    request = infer_request(slice(0, 2), extra_headers="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with served.connect() as sock:
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        [(status, _, answer)] = responses(read_to_end(sock))
    assert (status, json.loads(answer)["outputs"][0]["shape"]) == (200, [2, 4])


def test_an_upgrade_request_is_answered_without_switching_and_the_next_one_too(
    bare: Served,
) -> None:
    upgrade = (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: upgrade\r\n\r\n"
    )
    answers = responses(bare.exchange(upgrade + LIVE))
    assert [status for status, _, _ in answers] == [200, 200]


def test_an_upgrade_request_with_a_body_is_refused_and_its_body_never_read_as_a_request(
    bare: Served,
) -> None:
    # The body is itself a request: served, it would be one the client never sent as such.
    smuggled = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = (
        b"POST /v2/models/pump-health/infer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: upgrade\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    )
    answers = responses(bare.exchange(upgrade + smuggled))
    assert len(answers) == 1, answers
    status, _, body = answers[0]
    assert status == 400
    assert b"a request to switch protocols (Upgrade or CONNECT) cannot carry a body" in body


def test_an_http_1_0_request_is_answered_and_its_connection_closed(bare: Served) -> None:
    with bare.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [(status, headers, body)] = responses(read_to_end(sock))  # ends: the server closed
    assert (status, headers["connection"], json.loads(body)) == (200, "close", {"live": True})


def test_head_gets_the_headers_of_get_without_the_body(bare: Served) -> None:
    data = bare.exchange(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    )


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    server = Served(FallbackChain(), idle_timeout_s=0.3)
    try:
        with server.connect() as sock:
            sock.sendall(LIVE)
            data = read_to_end(sock)  # the answer, then EOF well before the socket's timeout
        assert [s for s, _, _ in responses(data)] == [200]
    finally:
        server.close()


# -- a body waiting for admission waits in the kernel, not in the process ---------------------


def unread_bytes(server_port: int, client_port: int) -> int:
    """What the kernel holds unread for the server's end of a loopback connection."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port
        ):
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no connection {server_port} <- {client_port} in /proc/net/tcp")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc/net/tcp")
def test_the_body_of_a_request_waiting_for_room_stays_in_the_kernel(
    bundles: dict[str, Path],
) -> None:
    from agent.api import ApiLimits
    from agent.api.admission import request_cost

    with bundles["v2"].open("rb") as f:
        manifest = read_bundle(f)[0]
    chain = FallbackChain(ModelSlot(manifest, default_runtime().load(MODELS / "v2.tflite")))
    request = infer_request(slice(0, 64))  # about 20 KB, five times one read of a head
    head, _, body = request.partition(b"\r\n\r\n")
    head += b"\r\n\r\n"
    limits = ApiLimits(
        max_body_bytes=len(body),
        max_inflight_bytes=request_cost(len(body)),  # room for one such request
        admission_wait_s=30,
    )
    server = Served(chain, limits=limits)
    try:
        with server.connect() as first, server.connect() as second:
            first.sendall(head + body[:100])  # admitted; holds the room until answered
            time.sleep(0.3)
            second.sendall(head + body)  # waits for room
            time.sleep(0.3)
            # At most the one read that brought the head (4 KB) left the kernel.
            assert unread_bytes(server.port, second.getsockname()[1]) >= len(request) - 4096
            first.sendall(body[100:])
            first.shutdown(socket.SHUT_WR)
            second.shutdown(socket.SHUT_WR)
            answers = [responses(read_to_end(first)), responses(read_to_end(second))]
        assert [[status for status, _, _ in a] for a in answers] == [[200], [200]]
        assert json.loads(answers[1][0][2])["outputs"][0]["shape"] == [64, 4]
    finally:
        server.close()
