"""One device, a repository and a director, for the tests of a rollout's shadow stage.

The device runs a real agent process that sends every request through its
shadow; each test installs v1 first (:func:`install_v1`) and then lists
bundles as shadows beside its assignment (:func:`list_targets`). The test
modules import the fixtures ``keys``, ``built`` and ``fleet`` from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from agent.telemetry.outbox import Outbox
from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from protocol.director_marks import SHADOW
from protocol.manifest import ResourceBudget
from protocol.window import WindowSummary, decode_window
from testbed.fleet import HARDWARE, AgentProcess, Fleet
from testbed.images import make_bundle

DEVICE = "pump-7"
SHARE_ALL = {"share": 1.0, "max_in_flight": 64}
TRIAL = {"health_period_s": 0.5}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {
        "v1": make_bundle(tmp, "v1", "1.0.0"),
        # The same model as v1, released again: a shadow that must agree on every request.
        "v1-again": make_bundle(tmp, "v1", "1.0.1"),
        "v3-bad": make_bundle(tmp, "v3-bad", "3.0.0"),
        # v1 again, with a latency budget no model meets: refused by its self-test.
        "v1-heavy": make_bundle(
            tmp, "v1", "1.0.2", budget=ResourceBudget(max_latency_ms=1e-6, max_memory_mb=64)
        ),
    }


@pytest.fixture
def fleet(
    tmp_path: Path, keys: tuple[KeyStore, KeyStore], built: dict[str, Path]
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def _target(bundle: ReleasedBundle, custom: dict[str, object], **hashes: str) -> TargetFile:
    return TargetFile(
        length=bundle.length,
        hashes=hashes or {"sha256": bundle.sha256},
        path=bundle.target_path,
        unrecognized_fields={"custom": custom},
    )


def list_targets(
    fleet: Fleet,
    assigned: ReleasedBundle | None,
    *shadows: ReleasedBundle,
    shadow_custom: dict[str, object] | None = None,
    **shadow_hashes: str,
) -> None:
    """Sign the device's director targets: its assignment and the bundles marked as shadows."""
    targets = {}
    if assigned is not None:
        targets[assigned.target_path] = _target(
            assigned, assignment_custom(DEVICE, HARDWARE, assigned)
        )
    for shadow in shadows:
        custom = {
            **assignment_custom(DEVICE, HARDWARE, shadow),
            SHADOW: True,
            **(shadow_custom or {}),
        }
        targets[shadow.target_path] = _target(shadow, custom, **shadow_hashes)
    fleet.director.device(DEVICE).sign(fleet.director_keys, targets, None)


def field_rows(n: int, idle_share: float = 0.0, seed: int = 0) -> list[list[float]]:
    from firmware_images.datagen import FieldConditions, generate

    x, _ = generate(n, seed, FieldConditions(idle_share=idle_share))
    return [[float(v) for v in row] for row in x]


def start(fleet: Fleet, **overrides: object) -> tuple[AgentProcess, str]:
    """An agent running every request through its shadow, with a short trial.

    The trial of the v1 each test installs first is no part of what these tests
    are about: half a second of healthy answers commits it as surely as two.
    """
    sections: dict[str, object] = {"shadow": SHARE_ALL, "update": TRIAL, **overrides}
    agent = AgentProcess(fleet.agent_config(DEVICE, **sections))
    return agent, agent.wait_ready()


def install_v1(
    fleet: Fleet, built: dict[str, Path], agent: AgentProcess
) -> dict[str, ReleasedBundle]:
    released = {k: fleet.release(v) for k, v in built.items()}
    fleet.assign(DEVICE, released["v1"])
    agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0")
    return released


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def events(agent: AgentProcess, kind: str) -> list[dict[str, object]]:
    return [e for e in agent.events() if e["event"] == kind]


def device_state(agent: AgentProcess) -> tuple[object, ...]:
    """What a shadow must never change: the slots' pointer and the journal's install record."""
    journal = agent.journal()
    pointer = json.loads((agent.data_dir / "slots" / "current.json").read_text())
    return pointer, journal.get("installed"), journal.get("installed_counter"), journal.get("phase")


def windows(agent: AgentProcess) -> list[WindowSummary]:
    with Outbox(agent.data_dir / "outbox.db") as outbox:
        return [decode_window(payload) for _, payload in outbox.pending(limit=1000)]


def answers(agent: AgentProcess, url: str, rows: list[list[float]]) -> list[dict[str, object]]:
    out = []
    for row in rows:
        response = agent.infer(url, [row])
        assert response.status == 200, response.data
        out.append(json.loads(response.data))
    return out
