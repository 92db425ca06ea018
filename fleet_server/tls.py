"""TLS contexts built from configuration.

:func:`server_context` is for the fleet server's HTTPS listener (aiohttp's
``ssl_context``); :func:`client_context` is for anything that connects to the
fleet (the agent's MQTT and HTTP clients, the server's MQTT client) and
checks the peer's certificate and host name against the fleet's own CA.
Both keep Python's secure defaults and refuse anything older than TLS 1.2.
Files that are missing or are not what they claim raise
:class:`TLSConfigError`, whose message names the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names it."""


def server_context(
    cert_file: Path | str, key_file: Path | str, client_ca_file: Path | str | None = None
) -> ssl.SSLContext:
    """A server context presenting ``cert_file`` (leaf first, then any intermediates).

    With ``client_ca_file``, clients must present a certificate that CA issued.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use certificate {cert_file} with key {key_file}: they must be PEM "
            f"files and the key must belong to the certificate ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {exc.filename or cert_file}: {exc.strerror}") from None
    if client_ca_file is not None:
        _load_ca(context, client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: Path | str | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context that trusts only ``ca_file`` (the system's CAs when ``None``).

    ``check_hostname`` stays on unless a deployment deliberately addresses
    its server by a name the certificate does not carry.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except OSError as exc:
        raise _ca_error(ca_file, exc) from None
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = check_hostname
    return context


def _load_ca(context: ssl.SSLContext, ca_file: Path | str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except OSError as exc:
        raise _ca_error(ca_file, exc) from None


def _ca_error(ca_file: Path | str | None, exc: OSError) -> TLSConfigError:
    if isinstance(exc, ssl.SSLError):
        return TLSConfigError(
            f"{ca_file} holds no usable CA certificate in PEM ({exc.reason or exc})"
        )
    return TLSConfigError(f"cannot read CA file {ca_file}: {exc.strerror}")
