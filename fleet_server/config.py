"""The fleet server's configuration, read once at start-up (flags of ``fleet-server``)."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from protocol.broker_url import parse_broker_url
from protocol.topics import check_namespace, namespace_for


class ServerConfig(BaseModel):
    """Where the server keeps its state and how it talks to the world."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(description="repository, director metadata and director keys")
    db_url: str = Field(description="sqlite:///PATH or postgresql://...")
    mqtt_url: str | None = Field(default=None, description="mqtt://host:port or mqtts://")
    mqtt_namespace: str | None = Field(
        default=None,
        description="the deployment's MQTT topic namespace (default: derived from the database)",
    )
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_ca_file: Path | None = None
    shared_subscription: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        # Part of an MQTT client id and of a topic: one safe segment.
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    )
    heartbeat_timeout_s: float = Field(default=90.0, gt=0)
    ingest_batch_size: int = Field(default=500, ge=1)
    ingest_batch_delay_s: float = Field(default=0.05, ge=0)
    max_message_bytes: int = Field(default=64 * 1024, ge=256)
    mqtt_receive_maximum: int = Field(
        default=1000,
        ge=1,
        le=65535,
        description="device messages the broker may hand over unacknowledged; it holds the rest",
    )
    mqtt_session_expiry_s: int = Field(
        default=3600,
        ge=0,
        le=2**32 - 1,
        description=(
            "how long the broker keeps a dead replica's session and its messages "
            "(only with a replica id given: a derived one changes every start)"
        ),
    )
    audit_anchor_interval_s: float = Field(
        default=300.0, gt=0, description="how often the audit log is checked and its head recorded"
    )
    drift_interval_s: float = Field(default=60.0, gt=0, description="how often alerts are updated")
    rollout_interval_s: float = Field(
        default=60.0, gt=0, le=86400, description="how often every active rollout takes a step"
    )
    drift_range_s: float = Field(default=3600.0, gt=0, description="trailing windows tested")
    accuracy_max_drop: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="estimated accuracy this far below the calibration's opens an alert",
    )

    hybrid_interval_s: float = Field(
        default=30.0, gt=0, le=86400, description="how often hybrid plans are checked and re-made"
    )
    hybrid_plan_ttl_s: float = Field(
        default=600.0, ge=60, le=86400, description="how long a signed hybrid plan holds"
    )
    hybrid_lookback_s: float = Field(
        default=3600.0, gt=0, description="the windows a device's request rate is counted over"
    )
    hybrid_capacity: float = Field(
        default=0.0,
        ge=0,
        description="the cloud's capacity (requests a second) until an operator sets one",
    )
    hybrid_headroom: float = Field(default=0.1, ge=0, lt=1)
    hybrid_audit_rate: float = Field(default=0.02, ge=0, le=1)
    hybrid_cloud_model: str | None = Field(
        default=None, max_length=128, description="the cloud model's name at the endpoint"
    )

    alert_webhook_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="where alert notifications are POSTed (http:// or https://)",
    )
    alert_webhook_secret: SecretStr | None = Field(
        default=None, description="the shared secret their HMAC-SHA256 signature is made with"
    )
    alert_webhook_attempts: int = Field(default=5, ge=1, le=20)
    alert_webhook_backoff_s: float = Field(default=1.0, gt=0)
    alert_webhook_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _webhook_secret(self) -> ServerConfig:
        if self.alert_webhook_url is not None and not (
            self.alert_webhook_secret is not None and self.alert_webhook_secret.get_secret_value()
        ):
            raise ValueError(
                "alert_webhook_secret: a webhook needs a shared secret its receiver verifies "
                "the signature with"
            )
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_broker_url(value)  # a BrokerUrlError (ValueError) says what is wrong
        return value

    @field_validator("mqtt_namespace")
    @classmethod
    def _mqtt_namespace(cls, value: str | None) -> str | None:
        return None if value is None else check_namespace(value)

    @property
    def deployment(self) -> str:
        """What identifies this deployment: its database, as every replica names it.

        Replicas of one deployment share the database, so they agree on it;
        credentials, options and the spelling of defaults are left out.
        """
        return database_identity(self.db_url)

    @property
    def deployment_id(self) -> str:
        """A stable, secret-free digest of :attr:`deployment` (published in the namespace claim)."""
        return hashlib.sha256(self.deployment.encode()).hexdigest()[:32]

    @property
    def namespace(self) -> str:
        """The MQTT topic namespace: as configured, or derived from :attr:`deployment`."""
        return self.mqtt_namespace or namespace_for(self.deployment)

    @property
    def repository_dir(self) -> Path:
        return self.data_dir / "repository"

    @property
    def director_dir(self) -> Path:
        return self.data_dir / "director"

    @property
    def director_keys_dir(self) -> Path:
        return self.data_dir / "director-keys"


def database_identity(db_url: str) -> str:
    """The database ``db_url`` names, without credentials or options: ``sqlite:/abs/path``
    for a file (resolved), ``postgresql://host:port/name`` for a server."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        return db_url
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        path = str(Path(database).resolve()) if database and database != ":memory:" else database
        return f"sqlite:{path}"
    host = (url.host or str(url.query.get("host") or "") or "localhost").lower()
    return f"{backend}://{host}:{url.port or _DEFAULT_DB_PORTS.get(backend, 0)}/{url.database}"


_DEFAULT_DB_PORTS = {"postgresql": 5432, "mysql": 3306}
