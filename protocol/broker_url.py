"""Broker URLs: ``mqtt://host[:port]`` or ``mqtts://host[:port]``, and nothing else.

A URL that is anything else is refused rather than guessed at: ``127.0.0.1:18883``
(no scheme) once connected to port 1883 of 127.0.0.1 without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(ValueError):
    """A broker URL that is not ``mqtt(s)://host[:port]``; the message says what is wrong."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens and whether the connection uses TLS."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """The address ``url`` names, or :class:`BrokerUrlError` saying why it names none."""
    if "://" not in url:
        raise BrokerUrlError(
            f"{url!r} has no scheme: write mqtt://host:port (or mqtts://host:port for TLS)"
        )
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise BrokerUrlError(
            f"{url!r}: unknown scheme {parts.scheme!r}; use mqtt:// or mqtts:// (TLS)"
        )
    try:
        port = parts.port
    except ValueError:
        raise BrokerUrlError(f"{url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise BrokerUrlError(f"{url!r} names no host: write {parts.scheme}://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerUrlError(f"{url!r}: only {parts.scheme}://host[:port], no path or query")
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds a password.
        raise BrokerUrlError(
            "credentials do not belong in the broker URL (the agent's go in [credentials], "
            "the server's in --mqtt-username and --mqtt-password-file)"
        )
    if port == 0:
        raise BrokerUrlError(f"{url!r}: the port must be a number from 1 to 65535")
    return BrokerAddress(
        parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts"
    )
