"""A standalone device: ``edge-agent run`` with no director follows an image repository alone.

Real processes: the release engineer runs ``fleetctl keys init`` and ``fleetctl
release add``; the device is an ``edge-agent run`` process whose configuration
has no ``[director]`` and names the bundle it follows. It installs the newest
release of that name for its hardware, with the same checks as under a
director: never a lower release counter, and a bundle that fails its
self-test is refused once and never tried again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.manifest import ResourceBudget
from testbed.fleet import AgentProcess
from testbed.images import HARDWARE, make_bundle

pytestmark = pytest.mark.integration

FIELD_ROW = [1500.0, 10, 20, 40, 40, 1, 1, 1, 3, 3, 3, 0.5, 0.2, 0.1, 0.1, 60]


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    module = {"fleetctl": "fleet_server.fleetctl", "edge-agent": "agent.cli"}[tool]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def release(bundle: Path, repo: Path, keys: Path) -> None:
    r = run("fleetctl", "release", "add", str(bundle), "--repo", str(repo), "--keys", str(keys))
    assert r.returncode == 0, r.stderr


def standalone_config(home: Path, repo: Path, name: str = "pump-health") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "agent.toml"
    config.write_text(
        f'device_id = "pump-solo"\nhardware_id = "{HARDWARE}"\ndata_dir = "{home}"\n'
        f'[image_repository]\nurl = "{repo}"\nroot = "{repo / "metadata" / "1.root.json"}"\n'
        f'name = "{name}"\n'
        "[api]\nport = 0\n"
        "[update]\npoll_interval_s = 0.2\nhealth_period_s = 0.5\n"
    )
    return config


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def serving(agent: AgentProcess, url: str) -> dict[str, Any]:
    answer = agent.infer(url, [FIELD_ROW])
    assert answer.status == 200, answer.data
    return dict(json.loads(answer.data))


@pytest.fixture
def release_engineer(tmp_path: Path) -> tuple[Path, Path]:
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    r = run("fleetctl", "keys", "init", "--dir", str(keys))
    assert r.returncode == 0, r.stderr
    repo.mkdir()
    return keys, repo


def test_a_device_without_a_director_installs_the_newest_release_and_refuses_a_bad_one(
    tmp_path: Path, release_engineer: tuple[Path, Path], bundles: dict[str, Path]
) -> None:
    keys, repo = release_engineer
    release(bundles["v1"], repo, keys)
    config = standalone_config(tmp_path / "device", repo)
    agent = AgentProcess(config, "--verbose")
    url = agent.wait_ready()
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
    assert serving(agent, url)["model_version"] == "1.0.0"

    release(bundles["v2"], repo, keys)
    agent.wait_for("v2 committed", lambda: installed(agent) == "2.0.0")
    assert serving(agent, url)["model_version"] == "2.0.0"

    # Released after v2, with a lower release counter: never installed.
    release(make_bundle(tmp_path, "v1", "1.5.0"), repo, keys)
    # v3 cannot meet its latency budget of a nanosecond: its self-test fails.
    release(
        make_bundle(tmp_path, "v2", "3.0.0", budget=ResourceBudget(max_latency_ms=0.000001)),
        repo,
        keys,
    )
    agent.wait_for(
        "v3 refused",
        lambda: (agent.journal().get("last_outcome") or {}).get("result") == "refused",
    )
    outcome = agent.journal()["last_outcome"]
    assert outcome["target"]["version"] == "3.0.0"
    assert outcome["reason"] == "self-test-failed", outcome

    # Later polls see v3 as the newest release again and leave it alone.
    agent.wait_for(
        "three more polls",
        lambda: agent.tail().count("not retrying pump-health 3.0.0: rejected before") >= 3,
    )
    body = serving(agent, url)
    assert (body["model_version"], body["parameters"]["stage"]) == ("2.0.0", "active")
    started = [e.get("bundle") for e in agent.events() if e["event"] == "download-started"]
    assert started == ["pump-health 1.0.0", "pump-health 2.0.0", "pump-health 3.0.0"]
    v2_counter = agent.journal()["installed"]["release_counter"]
    assert agent.journal()["installed_counter"] == v2_counter
    assert agent.stop() == 0

    # A restart remembers the refusal: the rejected bundle is not downloaded again.
    agent = AgentProcess(config, "--verbose")
    url = agent.wait_ready()
    agent.wait_for(
        "a poll after the restart",
        lambda: agent.tail().count("not retrying pump-health 3.0.0") >= 4,
    )
    assert serving(agent, url)["model_version"] == "2.0.0"
    assert [e["event"] for e in agent.events()].count("download-started") == 3
    agent.stop()

    status = run("edge-agent", "status", "--config", str(config), "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["updates"] == {"from": "image-repository", "url": str(repo), "name": "pump-health"}
    active = shown["slots"][shown["active_slot"]]
    assert (active["name"], active["version"]) == ("pump-health", "2.0.0")
    assert list(shown["rejected"].values()) == [f"self-test-failed: {outcome['message']}"]
    human = run("edge-agent", "status", "--config", str(config))
    assert human.returncode == 0, human.stderr
    assert f"updates: the newest pump-health release in {repo} (standalone)" in human.stdout


def test_a_standalone_device_never_takes_a_release_below_the_installed_counter(
    tmp_path: Path, release_engineer: tuple[Path, Path], bundles: dict[str, Path]
) -> None:
    from agent.config import AgentConfig
    from agent.ota import fetch_worker
    from agent.ota.answers import Assigned, Refused
    from protocol.bundle import read_manifest

    keys, repo = release_engineer
    release(bundles["v1"], repo, keys)
    config = AgentConfig.load(standalone_config(tmp_path / "device", repo))
    with bundles["v2"].open("rb") as f:
        v2_counter = read_manifest(f).release_counter

    answer = fetch_worker.run("check", config, installed_counter=v2_counter)
    assert isinstance(answer, Refused) and answer.about == "assignment", answer
    assert answer.reason == "release-counter-downgrade", answer
    assert "below the installed" in answer.message
    assert not answer.condemns_bundle

    answer = fetch_worker.run("check", config, installed_counter=0)
    assert isinstance(answer, Assigned) and answer.target.version == "1.0.0", answer
    other = AgentConfig.load(standalone_config(tmp_path / "other", repo, name="no-such-model"))
    answer = fetch_worker.run("check", other, installed_counter=0)
    assert isinstance(answer, Refused) and answer.reason == "bundle-not-found", answer
