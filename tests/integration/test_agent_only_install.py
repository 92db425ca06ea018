"""The agent-only install: ``edgefleet[agent]`` in a fresh virtual environment runs a device.

The environment is built from the working tree as a device would install it (no
server extra, pip's cache reused) and is then used as the device uses it: its own
``edge-agent`` verifies a real signed bundle, and its own ``edge-agent run``
installs a release and answers an inference. Nothing the fleet server needs is in it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet_server.release.repository import ImageRepository
from testbed.fleet import AgentProcess
from testbed.images import HARDWARE
from tools import agent_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIELD_ROW = [1500.0, 10, 20, 40, 40, 1, 1, 1, 3, 3, 3, 0.5, 0.2, 0.1, 0.1, 60]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agent-only") / "venv"
    agent_env.create(path, "agent", compile=False)
    return path


def test_the_agent_only_install_has_no_server_package(venv: Path) -> None:
    installed = {name.lower() for name in agent_env.sizes(venv)}
    assert "edgefleet" in installed and "tflite-runtime" in installed, installed
    assert installed.isdisjoint(agent_env.SERVER_ONLY), installed & set(agent_env.SERVER_ONLY)
    probe = (
        "import importlib.util as u, json, sys;"
        "print(json.dumps([u.find_spec(m) is not None for m in sys.argv[1:]]))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe, *agent_env.SERVER_ONLY],
        capture_output=True,
        text=True,
        check=True,
    )
    found = dict(zip(agent_env.SERVER_ONLY, json.loads(done.stdout), strict=True))
    assert found == dict.fromkeys(agent_env.SERVER_ONLY, False)


def verify(venv: Path, repo: ImageRepository, hardware: str, out: Path) -> Any:
    """``edge-agent verify`` of the installed environment, as a device runs it."""
    command = [str(venv / "bin" / "edge-agent"), "verify", "--root", str(repo.trusted_root_path)]
    command += ["--repo", str(repo.path), "--name", "pump-health", "--hardware", hardware]
    command += ["--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_agent_only_install_verifies_a_signed_bundle(
    venv: Path, repo: ImageRepository, tmp_path: Path
) -> None:
    out = tmp_path / "verified"
    done = verify(venv, repo, HARDWARE, out)
    assert done.returncode == 0, done.stderr
    assert "Verified pump-health 1.0.0" in done.stdout
    assert [p.name for p in out.glob("*.bundle")] != []

    refused = verify(venv, repo, "some-other-board", tmp_path / "other")
    assert refused.returncode == 3, refused.stderr
    assert "refused pump-health for some-other-board" in refused.stderr


def test_the_agent_only_install_runs_a_release_and_answers(
    venv: Path, repo: ImageRepository, tmp_path: Path
) -> None:
    home = tmp_path / "device"
    home.mkdir()
    config = home / "agent.toml"
    config.write_text(
        f'device_id = "pump-lean"\nhardware_id = "{HARDWARE}"\ndata_dir = "{home}"\n'
        f'[image_repository]\nurl = "{repo.path}"\nroot = "{repo.trusted_root_path}"\n'
        'name = "pump-health"\n'
        "[api]\nport = 0\n"
        "[update]\npoll_interval_s = 0.2\nhealth_period_s = 0.5\n"
    )
    agent = AgentProcess(config, command=[str(venv / "bin" / "edge-agent")])
    url = agent.wait_ready(timeout=60)
    agent.wait_for(
        "1.0.0 committed",
        lambda: (agent.journal().get("installed") or {}).get("version") == "1.0.0",
        timeout=120,
    )
    answer = agent.infer(url, [FIELD_ROW])
    assert answer.status == 200, answer.data
    body = json.loads(answer.data)
    assert (body["model_version"], body["parameters"]["stage"]) == ("1.0.0", "active")
    assert len(body["outputs"][0]["data"]) > 0
    assert agent.stop() == 0
