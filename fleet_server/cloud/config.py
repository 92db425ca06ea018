"""The cloud endpoint's configuration, read once at start-up (flags of ``fleet-server cloud``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CloudConfig(BaseModel):
    """Where the endpoint finds its models, devices and quotas, and how it batches and admits.

    ``max_batch_size`` rows at most go into one interpreter call; a batch
    closes when it is full or ``max_batch_wait_s`` after its first request
    arrived. ``max_batch_size`` 1 turns dynamic batching off (one request per
    call). ``max_queue`` requests per model may wait; the next is answered 429
    (reason ``capacity``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    db_url: str = Field(description="sqlite:///PATH or postgresql://... (the fleet's database)")
    repository: str = Field(description="the image repository: http(s)://... or a directory")
    trusted_root: Path = Field(description="the image repository's root.json this endpoint trusts")
    metadata_dir: Path = Field(description="where the verified TUF metadata is kept")
    hardware_id: str = Field(default="cloud", min_length=1, max_length=128)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8090, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    model_refresh_s: float = Field(default=60.0, gt=0, description="how often releases are read")
    settings_refresh_s: float = Field(
        default=5.0, gt=0, description="how often quotas and capacity are read from the database"
    )
    auth_cache_s: float = Field(
        default=60.0, ge=0, description="how long a device's checked credential is trusted"
    )

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_batch_wait_s: float = Field(default=0.005, ge=0, le=10)
    max_queue: int = Field(default=256, ge=1)
    interpreter_threads: int = Field(default=1, ge=1, le=64)

    capacity: float = Field(
        default=100.0, gt=0, description="requests a second, when cloud_settings sets none"
    )
    default_quota_rate: float = Field(
        default=0.2, ge=0, description="requests a second of a device without a current plan"
    )
    default_quota_burst: int = Field(default=2, ge=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _tls_pair(self) -> CloudConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self
