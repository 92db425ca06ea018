"""The agent's configuration: one TOML file, validated once at start-up.

A wrong file is refused with a message naming the field and what is wrong
with it; nothing else in the agent reads files or the environment for settings.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.versioning import HARDWARE_ID_PATTERN

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RepositoryConfig(_Section):
    """Where a TUF repository is and the root this device trusts for it."""

    url: str = Field(min_length=1, description="http(s) URL or a directory")
    root: Path = Field(description="trusted root.json provisioned with the device")


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8500, ge=0, le=65535)


class CloudConfig(_Section):
    url: str | None = Field(default=None, description="Open Inference Protocol endpoint")
    model: str | None = Field(default=None, description="model name at the endpoint")
    timeout_s: float = Field(default=1.0, gt=0)


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


class UpdateConfig(_Section):
    poll_interval_s: float = Field(default=60.0, gt=0)
    health_period_s: float = Field(default=300.0, ge=0)
    max_trial_boots: int = Field(default=2, ge=1)
    watchdog: WatchdogConfig = WatchdogConfig()
    fetch: FetchSettings = FetchSettings()


class CredentialsConfig(_Section):
    username: str | None = None
    password_file: Path | None = None


class ServerConfig(_Section):
    url: str | None = None
    broker: str | None = None


class FaultsConfig(_Section):
    """Fault injection for crash tests; empty in production."""

    hold_at: list[str] = []


class AgentConfig(_Section):
    """Everything the agent needs to know, from ``agent.toml``."""

    device_id: str = Field(pattern=_ID)
    hardware_id: str
    data_dir: Path
    image_repository: RepositoryConfig
    director: RepositoryConfig
    server: ServerConfig = ServerConfig()
    credentials: CredentialsConfig = CredentialsConfig()
    api: ApiConfig = ApiConfig()
    cloud: CloudConfig = CloudConfig()
    update: UpdateConfig = UpdateConfig()
    faults: FaultsConfig = FaultsConfig()

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
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise ConfigError(f"{path}: {where}: {err['msg']}") from None
        return config.resolved(path.parent)

    def resolved(self, base: Path) -> AgentConfig:
        """Relative paths made absolute against ``base``."""

        def absolute(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        def repo(r: RepositoryConfig) -> RepositoryConfig:
            url = r.url
            if "://" not in url:
                url = str(absolute(Path(url)))
            return r.model_copy(update={"root": absolute(r.root), "url": url})

        return self.model_copy(
            update={
                "data_dir": absolute(self.data_dir),
                "image_repository": repo(self.image_repository),
                "director": repo(self.director),
            }
        )
