"""Devices authenticate to the cloud endpoint with HTTP Basic: their id and MQTT credential.

The credential is checked against the database
(:func:`fleet_server.devices.store.authenticate_device`) and the verdict
cached for ``ttl_s`` by device id and the credential's hash, so a busy device
costs one query a minute, not one a request, and a rotated or revoked
credential stops working within ``ttl_s``. Only a hash of the credential is
kept in memory.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable

from fleet_server.devices.store import secret_hash

Check = Callable[[str, str], Awaitable[bool]]

# Failed checks are cached too (briefly), so guessing costs the database little.
FAILED_TTL_S = 5.0
MAX_CACHED = 100_000


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(device_id, password)`` of an ``Authorization: Basic ...`` header, or ``None``."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    device_id, sep, password = decoded.partition(":")
    if not sep or not device_id:
        return None
    return device_id, password


class DeviceAuthenticator:
    """Checks device credentials through ``check``, caching verdicts."""

    def __init__(
        self, check: Check, *, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}

    async def authenticate(self, device_id: str, password: str) -> bool:
        """Whether ``password`` is ``device_id``'s current credential."""
        key = (device_id, secret_hash(password))
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        ok = await self._check(device_id, password)
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if now < v[1]}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key] = (ok, now + (self._ttl_s if ok else min(self._ttl_s, FAILED_TTL_S)))
        return ok
