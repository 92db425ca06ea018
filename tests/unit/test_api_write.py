"""How the local API writes a response: all of it, however little the socket takes at once,
and within its timeout. Real TCP sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from agent.api import LocalApi
from agent.serving import FallbackChain


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """A server-side socket, non-blocking, and its client."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    return server, client


def read_all(sock: socket.socket, size: int, out: list[bytes]) -> None:
    time.sleep(0.2)  # the writer has filled the buffers and waits for room
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    out.append(bytes(received))


@pytest.mark.asyncio
async def test_a_response_larger_than_the_socket_takes_at_once_is_written_whole() -> None:
    api = LocalApi(FallbackChain(), port=0)
    server, client = connected_pair()
    data = bytes(range(256)) * 65536  # 16 MiB, far over what the buffers take
    out: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(client, len(data), out))
    reader.start()
    try:
        await api._write(server, data)
        await asyncio.to_thread(reader.join, 10)
    finally:
        server.close()
        client.close()
    assert out == [data]


@pytest.mark.asyncio
async def test_a_write_to_a_client_that_never_reads_times_out() -> None:
    api = LocalApi(FallbackChain(), port=0, read_timeout_s=0.3)
    server, client = connected_pair()
    try:
        with pytest.raises(TimeoutError):
            await api._write(server, b"x" * (32 * 1024 * 1024))
    finally:
        server.close()
        client.close()
