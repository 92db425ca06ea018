"""A real local API on a free port for tests that speak to it over a socket."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from agent.api import LocalApi
from agent.serving import FallbackChain


class Served:
    """A LocalApi on a free port, its event loop in a background thread."""

    def __init__(self, chain: FallbackChain, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.api = LocalApi(chain, port=0, **options)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.api.start(), self.loop).result(10)
        self.port = self.api.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def connect(self, *, nodelay: bool = False, **options: int) -> socket.socket:
        """A connection to the API; ``options`` are SOL_SOCKET options by name
        (``SO_RCVBUF=4096``), set before connecting."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for option, value in options.items():
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        return sock
