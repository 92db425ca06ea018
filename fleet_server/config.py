"""The fleet server's configuration, read once at start-up (flags of ``fleet-server``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ServerConfig(BaseModel):
    """Where the server keeps its state and how it talks to the world."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(description="repository, director metadata and director keys")
    db_url: str = Field(description="sqlite:///PATH or postgresql://...")
    mqtt_url: str | None = Field(default=None, description="mqtt://host:port or mqtts://")
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_ca_file: Path | None = None
    shared_subscription: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
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
    drift_interval_s: float = Field(default=60.0, gt=0, description="how often alerts are updated")
    drift_range_s: float = Field(default=3600.0, gt=0, description="trailing windows tested")
    accuracy_max_drop: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="estimated accuracy this far below the calibration's opens an alert",
    )

    @property
    def repository_dir(self) -> Path:
        return self.data_dir / "repository"

    @property
    def director_dir(self) -> Path:
        return self.data_dir / "director"

    @property
    def director_keys_dir(self) -> Path:
        return self.data_dir / "director-keys"
