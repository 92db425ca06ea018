"""The device side end to end, with real agent processes, real files and the real runtime.

Power is cut (SIGKILL) at every step of an install; the watchdog rolls back a
model that answers NaN; requests keep being answered throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from testbed.fleet import AgentProcess, Fleet
from testbed.images import MODELS, make_bundle
from testbed.waiting import observe_for

pytestmark = pytest.mark.integration

DEVICE = "pump-1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {
        "v1": make_bundle(tmp, "v1", "1.0.0"),
        "v2": make_bundle(tmp, "v2", "2.0.0"),
        "v3-bad": make_bundle(tmp, "v3-bad", "3.0.0"),
    }


@pytest.fixture
def fleet(
    tmp_path: Path, keys: tuple[KeyStore, KeyStore], built: dict[str, Path]
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def field_rows(n: int, idle_share: float = 0.0, seed: int = 0) -> list[list[float]]:
    from firmware_images.datagen import FieldConditions, generate

    x, _ = generate(n, seed, FieldConditions(idle_share=idle_share))
    return [[float(v) for v in row] for row in x]


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def install_v1(
    fleet: Fleet, built: dict[str, Path], agent: AgentProcess
) -> dict[str, ReleasedBundle]:
    released = {k: fleet.release(v) for k, v in built.items()}
    fleet.assign(DEVICE, released["v1"])
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
    return released


def assert_slots_intact(data_dir: Path) -> None:
    """The active slot holds a complete bundle: every file matches its manifest."""
    slots = data_dir / "slots"
    pointer = json.loads((slots / "current.json").read_text())
    manifest = json.loads((slots / pointer["active"] / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (slots / pointer["active"] / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} is torn"


STEPS = ["download", "verified", "staging", "staged", "trial"]


@pytest.mark.parametrize("step", STEPS)
def test_power_cut_at_every_install_step_leaves_a_working_model(
    step: str, fleet: Fleet, built: dict[str, Path]
) -> None:
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    released = install_v1(fleet, built, agent)
    agent.stop()

    # The same device, now set to hold (as if the power were about to go) at `step`.
    agent = AgentProcess(
        fleet.agent_config(DEVICE, update={"health_period_s": 0.5}, faults={"hold_at": [step]})
    )
    agent.wait_ready()
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for(f"the agent to reach {step}", lambda: agent.holding(step))
    agent.kill()
    assert_slots_intact(agent.data_dir)

    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    url = agent.wait_ready()
    answer = agent.infer(url, field_rows(1))
    assert answer.status == 200, answer.data
    body = json.loads(answer.data)
    assert body["parameters"]["stage"] in ("active", "previous")
    assert body["model_version"] in ("1.0.0", "2.0.0")
    agent.wait_for("v2 committed after the restart", lambda: installed(agent) == "2.0.0")
    assert_slots_intact(agent.data_dir)
    assert json.loads(agent.infer(url, field_rows(1)).data)["model_version"] == "2.0.0"
    events = [e["event"] for e in agent.events()]
    assert events.count("committed") == 2
    assert "rolled-back" not in events and "refused" not in events
    agent.stop()


def test_a_stop_mid_download_does_not_wait_for_the_fetcher_and_the_install_resumes(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    released = install_v1(fleet, built, agent)
    agent.stop()
    agent = AgentProcess(
        fleet.agent_config(
            DEVICE, update={"health_period_s": 0.5}, faults={"hold_at": ["download"]}
        )
    )
    agent.wait_ready()
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for("the fetcher to hold mid-download", lambda: agent.holding("download"))
    fetchers = _fetchers_of(agent.proc.pid)
    assert fetchers, "no fetcher child while holding at download"

    # SIGTERM to the agent alone (as `kill PID` sends it), not to its process group.
    os.kill(agent.proc.pid, signal.SIGTERM)
    assert agent.proc.wait(timeout=15) == 0
    assert "update check interrupted by the stop" in agent.tail()
    for pid in fetchers:  # the fetcher went with the agent, not left behind
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"fetcher {pid} outlived"
    agent.stop()

    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    agent.wait_for("v2 committed after the restart", lambda: installed(agent) == "2.0.0")
    assert_slots_intact(agent.data_dir)
    agent.stop()


def _fetchers_of(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"agent.ota.fetch_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_crash_loop_during_the_health_period_rolls_back(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    config = {"update": {"health_period_s": 60.0, "max_trial_boots": 2}}
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    released = install_v1(fleet, built, agent)
    agent.stop()
    agent = AgentProcess(fleet.agent_config(DEVICE, **config))
    agent.wait_ready()
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for("trial", lambda: agent.journal().get("phase") == "trial")
    for _ in range(2):  # the new model "crashes the device" twice during its trial
        agent.kill()
        agent = AgentProcess(fleet.agent_config(DEVICE, **config))
        agent.wait_ready()
    agent.wait_for(
        "rollback",
        lambda: (agent.journal().get("last_outcome") or {}).get("result") == "rolled_back",
    )
    outcome = agent.journal()["last_outcome"]
    assert outcome["reason"] == "crash-loop" and "restarted 2 times" in outcome["message"]
    url = json.loads((agent.data_dir / "agent.json").read_text())["api"]
    assert json.loads(agent.infer(url, field_rows(1)).data)["model_version"] == "1.0.0"
    agent.stop()


def test_bad_model_is_rolled_back_by_the_watchdog_without_a_failed_request(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    url = agent.wait_ready()
    released = install_v1(fleet, built, agent)
    fleet.assign(DEVICE, released["v2"])
    agent.wait_for("v2 committed", lambda: installed(agent) == "2.0.0")
    agent.stop()
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 30.0}))
    url = agent.wait_ready()

    # A steady stream of field requests (a tenth from idle machines) while v3-bad
    # is assigned, installed, fails the watchdog and is rolled back.
    rows = field_rows(400, idle_share=0.1, seed=7)
    answers: list[tuple[int, dict[str, object]]] = []
    done = threading.Event()

    def stream() -> None:
        i = 0
        while not done.is_set():
            r = agent.infer(url, [rows[i % len(rows)]])
            answers.append((r.status, json.loads(r.data)))
            i += 1
            time.sleep(0.005)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        fleet.assign(DEVICE, released["v3-bad"])
        agent.wait_for(
            "rollback",
            lambda: (agent.journal().get("last_outcome") or {}).get("result") == "rolled_back",
        )
        seen = len(answers)
        agent.wait_for("requests answered after the rollback", lambda: len(answers) >= seen + 5)
    finally:
        done.set()
        sender.join()

    outcome = agent.journal()["last_outcome"]
    assert outcome["reason"] == "watchdog" and "NaN" in outcome["message"]
    assert outcome["target"]["version"] == "3.0.0"
    assert installed(agent) == "2.0.0"
    statuses = [s for s, _ in answers]
    assert len(answers) > 50 and set(statuses) == {200}, "every request gets an answer"
    served_by = {(b["parameters"]["stage"], b["model_version"]) for _, b in answers}  # type: ignore[index]
    assert ("active", "3.0.0") in served_by, "v3-bad did serve before it was rolled back"
    assert ("previous", "2.0.0") in served_by, "v2 answered what v3-bad could not"
    for _, body in answers:
        data = body["outputs"][0]["data"]  # type: ignore[index]
        assert np.all(np.isfinite(data)), "no NaN reaches an app"
    last = json.loads(agent.infer(url, field_rows(1, idle_share=1.0)).data)
    assert (last["parameters"]["stage"], last["model_version"]) == ("active", "2.0.0")
    # The bad bundle is not retried although the director still assigns it.
    observe_for(1.0, lambda: agent.journal().get("phase") not in (None, "idle"))
    assert installed(agent) == "2.0.0" and agent.journal()["phase"] == "idle"
    agent.stop()


def test_self_test_failure_is_refused_and_reported(
    fleet: Fleet, built: dict[str, Path], tmp_path: Path
) -> None:
    from fleet_server.release.bundle_builder import BundleSpec, build_bundle
    from protocol.manifest import ResourceBudget

    slow = build_bundle(
        (MODELS / "cloud.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name="pump-health",
            version="4.0.0",
            hardware_ids=["rpi4-arm64"],
            budget=ResourceBudget(max_latency_ms=1e-6),
        ),
    )
    slow.write(tmp_path / "slow.bundle")
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    url = agent.wait_ready()
    install_v1(fleet, built, agent)
    fleet.assign(DEVICE, fleet.release(tmp_path / "slow.bundle"))
    agent.wait_for(
        "refusal", lambda: (agent.journal().get("last_outcome") or {}).get("result") == "refused"
    )
    outcome = agent.journal()["last_outcome"]
    assert outcome["reason"] == "self-test-failed" and "latency" in outcome["message"]
    assert json.loads(agent.infer(url, field_rows(1)).data)["model_version"] == "1.0.0"
    agent.stop()
