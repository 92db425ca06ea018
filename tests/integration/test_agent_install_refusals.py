"""A refusal blames only what it refused: forged director answers never block a genuine bundle.

Real image repository and director (release tooling, real signatures) over a
real HTTP server, the real fetcher process, real slots and the real runtime.
The agent runs either as a real ``edge-agent run`` process (power cuts) or as
its :class:`Installer` in this process, with a fake clock, when a test must act
at an exact point between two of its steps (the director changing its mind
between the check and the download).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.ota.answers import FetchAnswer
from agent.ota.installer import Installer
from agent.ota.journal import Phase
from agent.ota.parts import Fetcher
from agent.status import collect_status, describe_status
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from model_runtime import default_runtime
from testbed.fleet import AgentProcess, Fleet
from testbed.images import make_bundle

pytestmark = pytest.mark.integration

DEVICE = "face-1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, KeyStore]:
    tmp = tmp_path_factory.mktemp("keys")
    return init_keys(tmp / "release"), init_keys(tmp / "director")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("built")
    return {"v1": make_bundle(tmp, "v1", "1.0.0"), "v3": make_bundle(tmp, "v2", "3.0.0")}


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[KeyStore, KeyStore]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def forged(genuine: ReleasedBundle) -> ReleasedBundle:
    """What a compromised (or confused) director names: a target the release keys never signed."""
    return dataclasses.replace(
        genuine,
        target_path="face/face-6.6.6.bundle",
        name="face",
        version="6.6.6",
        release_counter=6_006_006_999,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def config_for(fleet: Fleet) -> tuple[AgentConfig, Path]:
    path = fleet.agent_config(DEVICE, update={"health_period_s": 10.0})
    return AgentConfig.load(path), path


def installer_for(fleet: Fleet, clock: Clock) -> Installer:
    config, path = config_for(fleet)
    return Installer.from_config(
        config, path, default_runtime(), lambda active, previous: None, clock
    )


async def commit_trial(installer: Installer, clock: Clock) -> None:
    assert installer.journal.phase is Phase.TRIAL, installer.journal
    clock.now += 11.0
    installer.tick()


def installed_version(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def events_of(installer: Installer, kind: str) -> list[dict[str, object]]:
    return [e for e in installer.store.events(100) if e["event"] == kind]


def test_a_forged_answer_racing_a_download_does_not_blacklist_the_genuine_bundle(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    v3 = fleet.release(built["v3"])
    clock = Clock()

    async def scenario() -> None:
        installer = installer_for(fleet, clock)
        await installer.recover()
        fleet.assign(DEVICE, v3)
        real_fetcher = installer.fetcher

        class DirectorChangesItsMindAfterTheCheck:
            async def check(self, installed_counter: int) -> FetchAnswer:
                answer = await real_fetcher.check(installed_counter)
                fleet.assign(DEVICE, forged(v3))
                return answer

            async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
                return await real_fetcher.download(installed_counter, expect)

        changing: Fetcher = DirectorChangesItsMindAfterTheCheck()
        installer.fetcher = changing
        result = await installer.poll()
        assert "face/face-6.6.6.bundle" in result and "never signed" in result

        journal = installer.journal
        assert journal.phase is Phase.IDLE and journal.rejected == {}
        assert journal.last_outcome is None, "no install outcome is blamed on 3.0.0"
        [refused] = events_of(installer, "assignment-refused")
        assert refused["reason"] == "bundle-not-found"
        assert "face/face-6.6.6.bundle" in str(refused["message"])
        assert refused["abandoned"] == "pump-health 3.0.0"
        assert refused["abandoned_id"] == f"sha256:{v3.sha256}"
        assert "bundle" not in refused, "the event is not about 3.0.0's merits"
        assert not events_of(installer, "refused")

        # The operator assigns 3.0.0 again: it installs.
        installer.fetcher = real_fetcher
        fleet.assign(DEVICE, v3)
        await installer.poll()
        await commit_trial(installer, clock)
        installed = installer.journal.installed
        assert installed is not None and installed.version == "3.0.0"

    asyncio.run(scenario())


def test_a_forged_answer_after_a_power_cut_mid_download_does_not_block_the_bundle(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    v3 = fleet.release(built["v3"])
    holding = fleet.agent_config(
        DEVICE, update={"health_period_s": 0.5}, faults={"hold_at": ["download"]}
    )
    agent = AgentProcess(holding)
    agent.wait_ready()
    fleet.assign(DEVICE, v3)
    agent.wait_for("the download to start", lambda: agent.holding("download"))
    agent.kill()  # power cut mid-download
    assert agent.journal()["phase"] == "downloading"

    fleet.assign(DEVICE, forged(v3))
    agent = AgentProcess(fleet.agent_config(DEVICE, update={"health_period_s": 0.5}))
    agent.wait_ready()
    agent.wait_for(
        "the forged assignment to be refused",
        lambda: any(e["event"] == "assignment-refused" for e in agent.events()),
    )
    journal = agent.journal()
    assert journal["rejected"] == {}, "the refusal of face-6.6.6 is not held against 3.0.0"
    [refused] = [e for e in agent.events() if e["event"] == "assignment-refused"]
    assert refused["reason"] == "bundle-not-found"
    assert "face/face-6.6.6.bundle" in refused["message"]
    assert refused["abandoned"] == "pump-health 3.0.0" and "bundle" not in refused

    fleet.assign(DEVICE, v3)
    agent.wait_for("3.0.0 committed", lambda: installed_version(agent) == "3.0.0")
    events = [e["event"] for e in agent.events()]
    assert "refused" not in events and "rolled-back" not in events
    agent.stop()


def test_garbled_bytes_on_the_wire_are_refused_without_condemning_the_bundle(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    v3 = fleet.release(built["v3"])
    stored = fleet.repo.targets_dir / "pump-health" / f"{v3.sha256}.pump-health-3.0.0.bundle"
    genuine = stored.read_bytes()
    clock = Clock()

    async def scenario() -> None:
        installer = installer_for(fleet, clock)
        await installer.recover()
        fleet.assign(DEVICE, v3)
        garbled = bytearray(genuine)
        garbled[len(garbled) // 2] ^= 0xFF
        stored.write_bytes(bytes(garbled))  # a man in the middle, or a broken mirror
        result = await installer.poll()
        assert result.startswith("refused: ")
        journal = installer.journal
        assert journal.last_outcome is not None
        assert journal.last_outcome.reason == "tampered-bundle"
        assert journal.rejected == {}
        [refused] = events_of(installer, "refused")
        assert refused["remembered"] is False

        # Retried, but not in a tight loop: after the poll interval, doubling per failure.
        assert (await installer.poll()).startswith("retrying pump-health 3.0.0 in ")
        assert installer.journal.phase is Phase.IDLE
        clock.now += installer.policy.poll_interval_s
        stored.write_bytes(genuine)
        await installer.poll()
        await commit_trial(installer, clock)
        installed = installer.journal.installed
        assert installed is not None and installed.version == "3.0.0"

    asyncio.run(scenario())


def test_a_bundle_whose_signed_bytes_contradict_its_signed_fields_is_never_retried(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    # A release-tooling mistake: the release keys signed fields (hardware ids) that the
    # manifest inside the signed bytes contradicts. The bundle itself is bad, whoever serves it.
    from tuf.api.metadata import TargetFile

    released = fleet.release(built["v3"])
    listed = fleet.repo.targets()
    entry = listed[released.target_path]
    custom = {**entry.unrecognized_fields["custom"], "hardware_ids": ["rpi4-arm64", "jetson"]}
    listed[released.target_path] = TargetFile(
        entry.length, entry.hashes, entry.path, {"custom": custom}
    )
    fleet.repo.set_targets(fleet.release_keys, listed)
    clock = Clock()

    async def scenario() -> None:
        installer = installer_for(fleet, clock)
        await installer.recover()
        fleet.assign(DEVICE, released)
        await installer.poll()
        journal = installer.journal
        assert journal.last_outcome is not None and journal.last_outcome.result == "refused"
        assert journal.last_outcome.reason == "manifest-mismatch"
        assert f"sha256:{released.sha256}" in journal.rejected
        assert (await installer.poll()).startswith("not retrying pump-health 3.0.0")

    asyncio.run(scenario())


def test_a_damaged_trusted_root_shows_in_the_running_agents_events_and_status(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    fleet.assign(DEVICE, fleet.release(built["v1"]))
    config, path = config_for(fleet)
    installer = Installer.from_config(
        config, path, default_runtime(), lambda active, previous: None, Clock()
    )
    root = config.data_dir / "trust" / "director" / "root.json"
    root.parent.mkdir(parents=True)
    root.write_text('{"signed": {}, "signatures": []}')

    async def two_polls() -> list[str]:
        return [await installer.poll(), await installer.poll()]

    results = asyncio.run(two_polls())
    assert all(r.startswith("refused: the trusted root ") for r in results)
    [event] = events_of(installer, "check-refused")  # recorded once, not on every poll
    assert event["reason"] == "untrusted-root" and str(root) in str(event["message"])
    status = collect_status(config)
    assert status["events"][-1]["reason"] == "untrusted-root"
    assert "untrusted-root" in describe_status(status)
