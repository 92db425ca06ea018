"""One device, a repository and a director, for the install tests with real agent processes.

The test modules import the fixtures ``keys``, ``built`` and ``fleet`` from here;
:func:`install_v1` releases the built bundles and installs v1, the start of
every story.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from testbed.fleet import AgentProcess, Fleet
from testbed.images import make_bundle

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
