"""Free ports, and waits on the thing itself with a deadline instead of sleeps."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WaitTimeout(AssertionError):
    """What was waited for did not happen before the deadline."""


LOWEST_PORT = 20000
"""Ports handed out start here, above the well-known services the machine runs."""


def _ephemeral_start() -> int:
    """Where the kernel's range for outgoing connections begins (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    Drawn below the kernel's ephemeral range: a port the kernel hands out
    (``bind(0)``) is also what it gives outgoing connections, so between
    choosing one and a server binding it, any of the machine's many client
    connections could take it ("Address already in use"). Ports below that
    range are only ever taken by someone binding them on purpose.
    """
    top = _ephemeral_start()
    if top - LOWEST_PORT >= 1000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(LOWEST_PORT, top)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str,
    probe: Callable[[], Any],
    timeout: float = 30.0,
    *,
    every: float = 0.05,
    failure: type[Exception] = WaitTimeout,
) -> Any:
    """Poll ``probe`` until it returns something true and return that.

    After ``timeout`` seconds raise ``failure`` naming ``what`` was waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise failure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def observe_for(seconds: float, probe: Callable[[], Any], *, every: float = 0.05) -> Any:
    """Watch ``probe`` for a bounded window of ``seconds``; its first true value, else the last.

    For checks that something does NOT happen: the caller asserts on what is
    returned, and the window is named as what it is, an observation window,
    not a wait for something.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)
