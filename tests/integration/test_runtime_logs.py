"""The TFLite runtime's INFO lines stay off the tools' output unless asked for.

The runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
on stderr with the first interpreter of a process. Building a bundle,
verifying one and running the agent (which loads its model at start) print
no such line; ``edge-agent run --verbose`` shows it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet_server.release.keys import KeyStore, init_keys
from testbed.fleet import AgentProcess, Fleet
from testbed.images import HARDWARE, MODELS

pytestmark = pytest.mark.integration

XNNPACK = "XNNPACK"
ROW = [[float(v) for v in np.load(MODELS / "baseline.npy")[0]]]
DEVICE = "quiet-1"


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    keys: tuple[KeyStore, KeyStore] = (
        init_keys(tmp_path / "keys" / "release"),
        init_keys(tmp_path / "keys" / "director"),
    )
    f = Fleet(tmp_path / "fleet", *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def test_building_and_verifying_a_bundle_print_no_runtime_info(
    tmp_path: Path, fleet: Fleet
) -> None:
    built = run(
        "fleet_server.fleetctl",
        "bundle",
        "build",
        str(MODELS / "v2.tflite"),
        "--name",
        "pump-health",
        "--version",
        "2.0.0",
        "--hardware",
        HARDWARE,
        "--baseline",
        str(MODELS / "baseline.npy"),
        "--features",
        str(MODELS / "features.json"),
        "--out",
        str(tmp_path),
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("Built ")
    assert XNNPACK not in built.stderr + built.stdout, built.stderr

    fleet.release(tmp_path / "pump-health-2.0.0.bundle")
    verified = run(
        "agent.cli",
        "verify",
        "--root",
        str(fleet.repo.trusted_root_path),
        "--repo",
        str(fleet.repo.path),
        "--name",
        "pump-health",
        "--hardware",
        HARDWARE,
        "--out",
        str(tmp_path / "verified"),
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == ""


def test_a_running_agent_prints_runtime_info_only_when_verbose(
    tmp_path: Path, fleet: Fleet, bundles: dict[str, Path]
) -> None:
    config = fleet.agent_config(DEVICE, update={"health_period_s": 0.3})
    agent = AgentProcess(config)
    url = agent.wait_ready()
    fleet.assign(DEVICE, fleet.release(bundles["v1"]))
    agent.wait_for(
        "v1 committed",
        lambda: (agent.journal().get("installed") or {}).get("version") == "1.0.0",
    )
    answer = agent.infer(url, ROW)
    assert answer.status == 200, answer.data
    assert agent.stop() == 0
    log = agent.tail()
    assert "install: committed" in log  # the log was written, and holds the install
    assert XNNPACK not in log, log

    # Restarted with --verbose, the agent loads v1 at start: the runtime's line is shown.
    (agent.data_dir / "agent.log").unlink()
    agent = AgentProcess(config, "--verbose")
    url = agent.wait_ready()
    assert json.loads(agent.infer(url, ROW).data)["model_version"] == "1.0.0"
    assert agent.stop() == 0
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in agent.tail()
