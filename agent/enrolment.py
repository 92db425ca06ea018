"""First start of a device: enrol with the fleet server, keep the credentials it gives.

With ``[enrolment]`` in its configuration and no password file yet, the
agent presents its provisioning token, device id and hardware id to the
server (``POST /api/v1/devices/enrol``) and stores the password it receives
in ``[credentials] password_file`` (mode 0600 from the first byte, written to
a temporary file, fsynced and renamed into place), and the server's answer
without the password in ``DATA/enrolment.json`` (the MQTT namespace). Later
starts find the password file and never enrol again.

The server's refusals (a token unknown, used up or expired, hardware the
token does not allow, a device id already registered, a malformed request)
cannot be cured by asking again: they are an :class:`EnrolmentRefused`, which
the command line reports in one line. A server that cannot be reached or
answers 5xx/429 is retried with jittered exponential backoff, as a device
that boots before its network is up must wait, not die.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agent.config import AgentConfig, ConfigError, EnrolmentConfig
from agent.ota.durable import fsync_dir
from protocol.api.base import API_PREFIX
from protocol.topics import NAMESPACE_RULE, NamespaceError, check_namespace

if TYPE_CHECKING:
    # Loaded only to enrol: a device that has its credentials starts without them.
    import urllib3

    from protocol.api.devices import DeviceCredentials

log = logging.getLogger(__name__)

RECORD = "enrolment.json"


def _not_now(status: int) -> bool:
    """Statuses that say "not now" rather than "no": the same request may succeed later."""
    return status == 429 or status >= 500


class EnrolmentRefused(Exception):
    """The server refused the enrolment; asking again as is will not help."""


@dataclass(frozen=True)
class Enrolment:
    """What the server said at enrolment, besides the password."""

    device_id: str
    server: str
    mqtt_namespace: str | None


def record_path(config: AgentConfig) -> Path:
    return config.data_dir / RECORD


def read_token(enrolment: EnrolmentConfig, environ: Mapping[str, str]) -> str:
    """The provisioning token from ``token_file`` or the ``token_env`` variable."""
    if enrolment.token_file is not None:
        try:
            token = enrolment.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"enrolment.token_file: cannot read {enrolment.token_file}: {reason}"
            ) from None
        where = str(enrolment.token_file)
    else:
        assert enrolment.token_env is not None  # the config insists on one of the two
        token = environ.get(enrolment.token_env, "").strip()
        where = f"environment variable {enrolment.token_env}"
    if not token:
        raise ConfigError(f"enrolment: {where} holds no provisioning token")
    return token


def enrolled_config(
    config: AgentConfig,
    environ: Mapping[str, str],
    *,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> AgentConfig:
    """``config`` of an enrolled device: enrols first if it never did.

    Returns the configuration with the server's MQTT namespace filled in when
    the file names none. Raises :class:`EnrolmentRefused` when the server says
    no, :class:`ConfigError` when the token or the stored answer is unusable
    or disagrees with the file.
    """
    if config.enrolment is None:
        return config
    password_file = config.credentials.password_file
    assert password_file is not None  # defaulted in AgentConfig.resolved with [enrolment]
    if not password_file.exists():
        token = read_token(config.enrolment, environ)
        credentials = _enrol(config, token, sleep, jitter)
        _store(config, credentials)
        log.info(
            "enrolled with %s as %s; credentials stored in %s",
            config.server.url,
            config.device_id,
            password_file,
        )
    return _with_namespace(config, _read_record(config))


def _enrol(
    config: AgentConfig,
    token: str,
    sleep: Callable[[float], None],
    jitter: Callable[[], float],
) -> DeviceCredentials:
    import urllib3

    from protocol.api.devices import EnrolDevice

    enrolment = config.enrolment
    assert enrolment is not None and config.server.url is not None
    server = config.server.url.rstrip("/")
    url = f"{server}{API_PREFIX}/devices/enrol"
    try:
        request = EnrolDevice(
            token=token,
            device_id=config.device_id,
            hardware_id=config.hardware_id,
            timezone=enrolment.timezone,
        )
    except ValidationError:
        # Never echo the token itself: it would land in logs.
        raise EnrolmentRefused(
            f"cannot enrol {config.device_id}: the provisioning token is not of the form "
            "ID.SECRET that fleetctl provisioning-token create prints"
        ) from None
    fetch = config.update.fetch
    http = urllib3.PoolManager(
        ca_certs=str(fetch.ca_file) if fetch.ca_file else None,
        retries=False,
        timeout=urllib3.Timeout(connect=fetch.connect_timeout_s, read=fetch.read_timeout_s),
    )
    attempt = 0
    while True:
        try:
            response = http.request(
                "POST",
                url,
                body=request.model_dump_json().encode(),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
        except urllib3.exceptions.HTTPError as exc:
            why = f"cannot reach it ({_reason(exc)})"
        else:
            if response.status == 201:
                return _credentials(server, response.data)
            message = _error_message(response)
            if not _not_now(response.status):
                raise EnrolmentRefused(
                    f"{server} refused to enrol {config.device_id} ({response.status}): {message}"
                )
            why = f"it answered {response.status}: {message}"
        delay = min(enrolment.retry_max_s, enrolment.retry_initial_s * 2.0 ** min(attempt, 32))
        delay *= 0.5 + 0.5 * jitter()  # a fleet powered on at once must not retry in step
        attempt += 1
        log.warning("enrolment with %s: %s; retrying in %.0f s", server, why, delay)
        sleep(delay)


def _credentials(server: str, body: bytes) -> DeviceCredentials:
    from protocol.api.devices import DeviceCredentials

    try:
        return DeviceCredentials.model_validate_json(body)
    except ValidationError as exc:
        raise EnrolmentRefused(
            f"{server} answered the enrolment with something that is not credentials: "
            f"{exc.errors()[0]['msg']}"
        ) from None


def _error_message(response: urllib3.BaseHTTPResponse) -> str:
    text = response.data.decode("utf-8", errors="replace")
    try:
        payload: Any = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return " ".join(str(payload["error"]).split())[:300]
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return first or str(response.reason or "no reason given")


def _reason(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).splitlines()[0]


def write_secret(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, readable by this user only at every moment.

    The temporary file is created 0600 (never through a stale one, which might
    have other permissions), fsynced, renamed over ``path``, and the folder
    fsynced: a power cut leaves the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask took away or left
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _store(config: AgentConfig, credentials: DeviceCredentials) -> None:
    """The server's answer first, the password last: the password file means "enrolled"."""
    password_file = config.credentials.password_file
    assert password_file is not None and config.server.url is not None
    config.data_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "device_id": credentials.device_id,
        "server": config.server.url,
        "mqtt_namespace": credentials.mqtt_namespace,
    }
    write_secret(record_path(config), json.dumps(record, indent=2).encode() + b"\n")
    write_secret(password_file, credentials.password.encode() + b"\n")


def _read_record(config: AgentConfig) -> Enrolment | None:
    path = record_path(config)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Enrolment(
            device_id=str(data["device_id"]),
            server=str(data["server"]),
            mqtt_namespace=data.get("mqtt_namespace"),
        )
    except FileNotFoundError:
        return None  # credentials given by hand: the file must name what it needs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: the stored enrolment cannot be read: {exc}") from None


def _with_namespace(config: AgentConfig, enrolment: Enrolment | None) -> AgentConfig:
    named = enrolment.mqtt_namespace if enrolment is not None else None
    own = config.mqtt.namespace
    if named is not None and own is not None and named != own:
        raise ConfigError(
            f"mqtt.namespace: the file says {own}, but the server named {named} at "
            f"enrolment ({record_path(config)}); remove [mqtt] namespace or set it to {named}"
        )
    if own is None and named is not None:
        try:
            named = check_namespace(named)
        except NamespaceError:
            raise ConfigError(
                f"{record_path(config)}: the stored MQTT namespace {named!r} is not "
                f"{NAMESPACE_RULE}"
            ) from None
    namespace = own or named
    if config.server.broker is not None and namespace is None:
        raise ConfigError(
            "mqtt.namespace: required with server.broker, and the server named none at "
            "enrolment; use the namespace the fleet server logs at start"
        )
    return config.model_copy(
        update={"mqtt": config.mqtt.model_copy(update={"namespace": namespace})}
    )
