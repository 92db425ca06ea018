"""Devices verify bundles through a real ``fleet-server`` process serving the repository."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from agent.ota.verify import verify_bundle
from fleet_server.release.repository import ImageRepository
from tests.conftest import HARDWARE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(repo: ImageRepository) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet_server.cli",
            "--repo",
            str(repo.path),
            "--http",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/repository"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_bundle_verifies_through_the_server(
    server: str, repo: ImageRepository, tmp_path: Path
) -> None:
    verified = verify_bundle(
        trusted_root=repo.trusted_root_path,
        repository=server,
        name="pump-health",
        hardware_id=HARDWARE,
        out_dir=tmp_path,
    )
    assert verified.manifest.version == "1.0.0"


def test_server_answers_range_requests(server: str, repo: ImageRepository) -> None:
    [target] = (repo.targets_dir / "pump-health").glob("*.bundle")
    url = f"{server}/targets/pump-health/{target.name}"
    response = urllib3.request("GET", url, headers={"Range": "bytes=100-"})
    assert response.status == 206
    assert response.data == target.read_bytes()[100:]


def test_server_refuses_a_directory_without_a_repository(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fleet_server.cli", "--repo", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "holds no image repository" in r.stderr
