"""The agent's configuration: one TOML file, validated once at start-up.

A wrong file is refused with a message naming the field and what is wrong
with it; nothing else in the agent reads files or the environment for settings.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocol.api.base import TimeZoneName
from protocol.broker_url import BrokerUrlError, parse_broker_url
from protocol.topics import NAMESPACE_RULE, NamespaceError, check_namespace
from protocol.versioning import HARDWARE_ID_PATTERN, NAME_PATTERN

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class RepositoryConfig(_Section):
    """Where a TUF repository is and the root this device trusts for it."""

    url: str = Field(min_length=1, description="http(s) URL or a directory")
    root: Path = Field(description="trusted root.json provisioned with the device")


class ImageRepositoryConfig(RepositoryConfig):
    """The image repository; ``name`` only on a standalone device (no director).

    A standalone device installs the newest bundle called ``name`` that the
    repository released for its hardware id, with every check a director's
    assignment gets (signatures, hardware, release counter never lower,
    self-test, rollback).
    """

    name: str | None = Field(
        default=None, description="the bundle a standalone device follows, e.g. pump-health"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.match(value):
            raise ValueError("must be a bundle name: 1-64 of a-z 0-9 . _ - (e.g. pump-health)")
        return value


_Repo = TypeVar("_Repo", bound=RepositoryConfig)


class ApiConfig(_Section):
    """The local inference API, and how much of the device it may take.

    Defaults for a device with little memory (the serving process itself takes
    about 70 MB): ``max_body_bytes`` 4 MiB holds a 224x224x3 float image as
    JSON; a request is charged 20 times its body while served (its parsed JSON
    and tensors at their worst; more when its JSON holds more arrays and
    objects than a request needs, see ``agent.api.admission``), so
    ``max_inflight_bytes`` 80 MiB bounds what requests can add to the process,
    and admits one request of the largest size or four 1 MB images at once —
    more would only queue for the same CPU. ``max_connections`` 64 local
    clients; beyond it, and beyond the bytes, requests get 503 with
    ``Retry-After: retry_after_s`` after waiting up to ``admission_wait_s`` for
    room. A body must arrive within ``body_timeout_s`` of its admission (a
    local client sends 4 MiB in milliseconds), or the request gets 408 and its
    charge goes back.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8500, ge=0, le=65535)
    max_connections: int = Field(default=64, ge=1, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_inflight_bytes: int = Field(default=80 * 1024 * 1024, ge=1024)
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    admission_wait_s: float = Field(default=2.0, ge=0, le=60, allow_inf_nan=False)
    body_timeout_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)

    @model_validator(mode="after")
    def _budget_holds_one_request(self) -> ApiConfig:
        from agent.api.admission import request_cost

        if self.max_inflight_bytes < request_cost(self.max_body_bytes):
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must hold one request of "
                f"max_body_bytes ({self.max_body_bytes}), which is charged "
                f"{request_cost(self.max_body_bytes)} bytes (the body and its parsed form)"
            )
        return self


class CloudConfig(_Section):
    """The cloud endpoint (Open Inference Protocol); the device authenticates with its credentials.

    HTTP Basic with the device id and the password of ``[credentials]`` (the
    MQTT connection's). ``model`` names the model at the endpoint; without it,
    a hybrid plan's ``cloud_model`` or the served model's own name.
    """

    url: str | None = Field(default=None, description="Open Inference Protocol endpoint")
    model: str | None = Field(default=None, description="model name at the endpoint")
    timeout_s: float = Field(default=1.0, gt=0)
    max_audits_in_flight: int = Field(default=2, ge=1)


class WatchdogConfig(_Section):
    window: int = Field(default=200, ge=1)
    max_failures: int = Field(default=3, ge=1)
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
    min_requests: int = Field(default=10, ge=1)


class FetchSettings(_Section):
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    min_bytes_per_second: float = Field(default=2048.0, ge=0)
    grace_s: float = Field(default=10.0, ge=0)
    ca_file: Path | None = Field(default=None, description="CA that signs the server's TLS cert")


class UpdateConfig(_Section):
    poll_interval_s: float = Field(default=60.0, gt=0)
    health_period_s: float = Field(default=300.0, ge=0)
    max_trial_boots: int = Field(default=2, ge=1)
    watchdog: WatchdogConfig = WatchdogConfig()
    fetch: FetchSettings = FetchSettings()


class CredentialsConfig(_Section):
    username: str | None = None
    password_file: Path | None = None


class EnrolmentConfig(_Section):
    """Enrol with the fleet server on first start (no password file yet).

    The provisioning token (``fleetctl provisioning-token create``) is read from
    ``token_file`` or the environment variable ``token_env``, only when
    enrolling. A server that cannot be reached is asked again after
    ``retry_initial_s``, doubling up to ``retry_max_s``. ``timezone`` (IANA) is
    the device's own, sent with the enrolment: a rollout's maintenance window
    opens on its clock.
    """

    token_file: Path | None = None
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    retry_initial_s: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    retry_max_s: float = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)
    timezone: TimeZoneName | None = None

    @model_validator(mode="after")
    def _one_token(self) -> EnrolmentConfig:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError(
                "enrolment: give the provisioning token as token_file or token_env (one of them)"
            )
        return self


class ServerConfig(_Section):
    url: str | None = None
    broker: str | None = Field(
        default=None, description="mqtt://host[:port], or mqtts://host[:port] for TLS"
    )

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_broker_url(value)
        except BrokerUrlError as exc:
            raise ValueError(str(exc)) from None
        return value


class MqttConfig(_Section):
    """How the agent talks to the broker named by ``server.broker``."""

    namespace: str | None = Field(
        default=None,
        description="the deployment's topic namespace (required with server.broker); "
        "the server names it when the device is registered",
    )
    client_id: str | None = Field(
        default=None,
        pattern=_ID,
        description="MQTT client id (default: NAMESPACE-DEVICE_ID, so that devices of two "
        "deployments with one id on one broker do not take each other's connection over)",
    )
    keepalive_s: int = Field(default=60, ge=5, le=65535)
    heartbeat_interval_s: float = Field(default=60.0, gt=0)
    ca_file: Path | None = Field(
        default=None, description="CA bundle for mqtts:// (default: the system's CAs)"
    )
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_namespace(value)
        except NamespaceError:
            raise ValueError(f"must be {NAMESPACE_RULE}") from None


class TelemetryConfig(_Section):
    """Feature-summary windows and their outbox (store-and-forward until acknowledged).

    ``max_overhead`` is the most summarising may add to an inference, as a share
    of its time (0.2: 20 %); the agent then summarises a random sample of the
    requests when the model is too fast for all of them (every request is still
    counted). 0 or ``false`` summarises every request, whatever it costs.
    """

    enabled: bool = True
    window_max_requests: int = Field(default=1000, ge=1)
    window_max_seconds: float = Field(default=60.0, gt=0)
    max_overhead: float = Field(default=0.2, ge=0, allow_inf_nan=False)
    outbox_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    outbox_max_age_s: float = Field(default=7 * 86400.0, gt=0)
    ack_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("max_overhead", mode="before")
    @classmethod
    def _max_overhead(cls, value: object) -> object:
        if value is False:
            return 0.0
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value < math.inf
        ):
            raise ValueError(
                "must be a share of the inference time such as 0.2, "
                "or 0 or false to summarise every request"
            )
        return value


class ShadowConfig(_Section):
    """How a shadow model (a rollout's shadow stage) runs beside the active model.

    ``share`` of the requests the active model answers (0.25: one in four,
    drawn at random) also go to the shadow, after their answer is made; its
    answers are compared and counted in the window summaries, never served.
    At most ``max_in_flight`` shadow runs at once: a request drawn while the
    shadow is that busy is skipped (counted), never queued. ``share = 0``
    installs a listed shadow but never runs it.
    """

    share: float = Field(default=0.25, ge=0, le=1, allow_inf_nan=False)
    max_in_flight: int = Field(default=1, ge=1, le=64)

    @field_validator("share", mode="before")
    @classmethod
    def _share(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a share of the requests from 0 to 1, such as 0.25")
        return value


class FaultsConfig(_Section):
    """Fault injection for crash tests; empty in production."""

    hold_at: list[str] = []


class AgentConfig(_Section):
    """Everything the agent needs to know, from ``agent.toml``."""

    device_id: str = Field(pattern=_ID)
    hardware_id: str
    data_dir: Path
    image_repository: ImageRepositoryConfig
    director: RepositoryConfig | None = None
    server: ServerConfig = ServerConfig()
    credentials: CredentialsConfig = CredentialsConfig()
    enrolment: EnrolmentConfig | None = None
    mqtt: MqttConfig = MqttConfig()
    api: ApiConfig = ApiConfig()
    cloud: CloudConfig = CloudConfig()
    update: UpdateConfig = UpdateConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    shadow: ShadowConfig = ShadowConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _namespace_with_broker(self) -> AgentConfig:
        # Without it the device would talk on topics no server of its fleet reads. An
        # enrolling device learns it from the server (checked again once enrolled).
        if (
            self.server.broker is not None
            and self.mqtt.namespace is None
            and self.enrolment is None
        ):
            raise ValueError(
                "mqtt.namespace: required with server.broker; use the namespace the fleet "
                "server named when the device was registered"
            )
        return self

    @model_validator(mode="after")
    def _enrolment_needs_a_server(self) -> AgentConfig:
        if self.enrolment is not None and self.server.url is None:
            raise ValueError("server.url: required with [enrolment]; the server to enrol with")
        return self

    @model_validator(mode="after")
    def _director_or_name(self) -> AgentConfig:
        # One source decides what to install: the director, or the newest release of a name.
        if self.director is None:
            if self.image_repository.name is None:
                raise ValueError(
                    "image_repository.name: required without [director]; name the bundle "
                    'this device installs the newest release of (e.g. name = "pump-health")'
                )
            if self.server.broker is not None:
                raise ValueError(
                    "director: required with server.broker; a device in a fleet installs what "
                    "the server's director assigns"
                )
        elif self.image_repository.name is not None:
            raise ValueError(
                "image_repository.name: only without [director]; the director chooses the "
                "bundle of a device that has one"
            )
        return self

    @field_validator("hardware_id")
    @classmethod
    def _hardware_id(cls, value: str) -> str:
        if not HARDWARE_ID_PATTERN.match(value):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 . _ : -")
        return value

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read and validate ``path``; relative paths in it are relative to its folder."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            if not err["loc"]:  # a rule across fields names its own fields
                raise ConfigError(f"{path}: {err['msg'].removeprefix('Value error, ')}") from None
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{path}: {where}: {err['msg']}") from None
        return config.resolved(path.parent)

    def resolved(self, base: Path) -> AgentConfig:
        """Relative paths made absolute against ``base``."""

        def absolute(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        def maybe(p: Path | None) -> Path | None:
            return absolute(p) if p is not None else None

        def repo(r: _Repo) -> _Repo:
            url = r.url
            if "://" not in url:
                url = str(absolute(Path(url)))
            return r.model_copy(update={"root": absolute(r.root), "url": url})

        password_file = self.credentials.password_file
        if password_file is None and self.enrolment is not None:
            password_file = self.data_dir / "password"  # where enrolment stores it
        return self.model_copy(
            update={
                "data_dir": absolute(self.data_dir),
                "image_repository": repo(self.image_repository),
                "director": repo(self.director) if self.director is not None else None,
                "credentials": self.credentials.model_copy(
                    update={"password_file": maybe(password_file)}
                ),
                "enrolment": (
                    self.enrolment.model_copy(
                        update={"token_file": maybe(self.enrolment.token_file)}
                    )
                    if self.enrolment is not None
                    else None
                ),
                "mqtt": self.mqtt.model_copy(update={"ca_file": maybe(self.mqtt.ca_file)}),
            }
        )
