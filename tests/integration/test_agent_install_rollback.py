"""A bad install undone, with real agent processes, real files and the real runtime.

A crash loop during the trial and a model that answers NaN are rolled back,
with requests answered throughout; a bundle that fails its self-test is
refused. (Power cuts mid-install: ``test_agent_install.py``.)
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.fleet import AgentProcess, Fleet
from testbed.images import MODELS
from testbed.waiting import observe_for
from tests.support.install_fleet import (
    DEVICE,
    built,
    field_rows,
    fleet,
    install_v1,
    installed,
    keys,
)

pytestmark = pytest.mark.integration

__all__ = ["built", "fleet", "keys"]  # fixtures, used by name


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
    info = json.loads((agent.data_dir / "agent.json").read_text())
    # The API listened first; the parts behind it (telemetry, link) ran by the time it was written.
    assert 0 <= info["ready_after_s"] <= info["started_after_s"], info
    url = info["api"]
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
