"""What the MQTT link reads from the device once, at start: its password and its CA bundle.

Apart from the link (no MQTT client is imported), so that ``edge-agent run``
can refuse a file it cannot use before its API listens, though it builds the
link itself only after.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.config import AgentConfig, ConfigError
from protocol.broker_url import parse_broker_url


def read_password(path: Path | None) -> str | None:
    """The password in ``path`` (``None``: none); :class:`ConfigError` if it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"credentials.password_file: cannot read {path}: {exc}") from None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificate and host name checked against ``ca_file`` (or the system's CAs)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.ca_file: cannot use {ca_file} as a CA bundle: {exc}") from None


def check_link_files(config: AgentConfig) -> None:
    """Raise :class:`ConfigError` now if the link could not use its CA or password file."""
    if config.server.broker is None:
        return
    if parse_broker_url(config.server.broker).tls:
        tls_context(config.mqtt.ca_file)
    read_password(config.credentials.password_file)
