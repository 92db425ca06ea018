"""A small real fleet: image repository, director and agent processes.

The repository and the director are served over HTTP by :class:`RepositoryServer`;
agents run as real ``edge-agent run`` processes with their own data folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import urllib3

from fleet_server.director import DirectorRepository
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from protocol.hybrid import HybridPlan
from testbed.http_repo import RepositoryServer
from testbed.images import HARDWARE

__all__ = ["HARDWARE", "AgentProcess", "Fleet", "escalate_plan", "reap_agents", "running_agents"]


def escalate_plan(device_id: str, plan_id: str, ttl: timedelta = timedelta(hours=1)) -> HybridPlan:
    """A hybrid plan for ``device_id``, issued now: escalate below tau 0.8, quota 1/s burst 2."""
    now = datetime.now(UTC)
    return HybridPlan(
        plan_id=plan_id,
        device_id=device_id,
        mode="escalate",
        temperature=1.5,
        tau=0.8,
        quota_rate=1.0,
        quota_burst=2,
        audit_rate=0.05,
        issued_at=now,
        expires_at=now + ttl,
    )


@dataclass
class Fleet:
    """Release keys, an image repository, a director, served from one HTTP server."""

    root: Path
    release_keys: KeyStore
    director_keys: KeyStore
    repo: ImageRepository = field(init=False)
    director: DirectorRepository = field(init=False)
    server: RepositoryServer = field(init=False)

    def __post_init__(self) -> None:
        self.repo = ImageRepository(self.root / "repo")
        self.repo.create(self.release_keys)
        self.director = DirectorRepository(self.root / "director")
        self.director.create(self.director_keys)
        self.server = RepositoryServer(self.root)

    def release(self, bundle: Path) -> ReleasedBundle:
        return self.repo.add_bundle(bundle, self.release_keys)

    def assign(self, device_id: str, bundle: ReleasedBundle) -> None:
        self.director.assign(self.director_keys, device_id, HARDWARE, bundle)

    def agent_config(self, device_id: str, **overrides: Any) -> Path:
        """Write an ``agent.toml`` for ``device_id`` and return its path."""
        data_dir = self.root / "devices" / device_id
        data_dir.mkdir(parents=True, exist_ok=True)
        update = {"poll_interval_s": 0.2, "health_period_s": 2.0}
        update.update(overrides.pop("update", {}))
        lines = [
            f'device_id = "{device_id}"',
            f'hardware_id = "{HARDWARE}"',
            f'data_dir = "{data_dir}"',
            "[image_repository]",
            f'url = "{self.server.url}/repo"',
            f'root = "{self.repo.trusted_root_path}"',
            "[director]",
            f'url = "{self.server.url}/director"',
            f'root = "{self.director.trusted_root_path}"',
            "[api]",
            'host = "127.0.0.1"',
            "port = 0",
            "[update]",
            *(f"{k} = {json.dumps(v)}" for k, v in update.items()),
        ]
        for section, values in overrides.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        path = data_dir / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def close(self) -> None:
        self.server.close()


_RUNNING: set[AgentProcess] = set()
# How long a SIGTERMed agent has to stop cleanly (close its window into the outbox, leave
# the broker) before it is killed; a loaded machine must not turn a slow stop into a kill.
STOP_GRACE_S = 60.0


def running_agents() -> set[AgentProcess]:
    """The agents started and not stopped yet."""
    return set(_RUNNING)


def reap_agents(keep: Collection[AgentProcess] = ()) -> None:
    """Kill every agent started and not stopped (a failed assertion), except ``keep``."""
    for agent in [a for a in _RUNNING if a not in keep]:
        agent.kill()
        agent.log.close()


class AgentProcess:
    """A real ``edge-agent run`` process."""

    def __init__(
        self,
        config: Path,
        *options: str,
        command: Sequence[str] = (sys.executable, "-m", "agent.cli"),
    ) -> None:
        """Start ``edge-agent run --config CONFIG`` with ``options`` (e.g. ``--verbose``).

        ``command`` runs the agent: by default this interpreter's ``agent.cli``.
        """
        self.config = config
        self.data_dir = config.parent
        (self.data_dir / "agent.json").unlink(missing_ok=True)
        self.log = (self.data_dir / "agent.log").open("ab")
        self.proc = subprocess.Popen(
            [*command, "run", "--config", str(config), *options],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING.add(self)
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5, 5))

    def wait_ready(self, timeout: float = 30) -> str:
        """The base URL of the local API once the agent listens."""
        info = self.data_dir / "agent.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info.exists():
                try:
                    return str(json.loads(info.read_text())["api"])
                except (json.JSONDecodeError, KeyError):
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"agent not ready in {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return (self.data_dir / "agent.log").read_text(errors="replace")[-3000:]

    def journal(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.data_dir / "journal.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.data_dir / "events.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.endswith("}")]

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited while waiting for {what}: {self.tail()}")
            time.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {what}; journal {self.journal()}: {self.tail()}"
        )

    def holding(self, step: str) -> bool:
        return (
            f"edgefleet-fault: holding at {step}".encode()
            in (self.data_dir / "agent.log").read_bytes()
        )

    def infer(self, url: str, rows: list[list[float]], model: str = "pump-health") -> Any:
        body = {
            "inputs": [
                {
                    "name": "features",
                    "shape": [len(rows), len(rows[0])],
                    "datatype": "FP32",
                    "data": [v for r in rows for v in r],
                }
            ]
        }
        return self._http.request("POST", f"{url}/v2/models/{model}/infer", json=body)

    def kill(self) -> None:
        """Power cut: SIGKILL the agent and its children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        _RUNNING.discard(self)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL only if it has not stopped within :data:`STOP_GRACE_S`."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        _RUNNING.discard(self)
        self.log.close()
        return self.proc.returncode
