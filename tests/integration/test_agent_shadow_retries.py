"""A shadow whose install is cut off, refused or unreachable, with real agent processes.

A power cut mid-install leaves the device serving its active model and the
shadow installed whole at the next start; the fetcher checks a shadow as it
checks an assignment; a shadow whose download is refused or breaks off is
tried again with a backoff, not at every poll; one refused by its self-test
is not downloaded again after a restart. (The shadow's normal course is in
``test_agent_shadow.py``.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.ota.answers import NoShadow, Refused, ShadowDownloaded, ShadowKept
from agent.ota.fetch_worker import run_shadow, shadow_downloads_dir
from agent.status import collect_status, describe_status
from testbed.fleet import Fleet
from testbed.http_repo import Faults
from tests.support.shadow_fleet import (
    DEVICE,
    answers,
    built,
    device_state,
    events,
    field_rows,
    fleet,
    install_v1,
    installed,
    keys,
    list_targets,
    start,
)

pytestmark = pytest.mark.integration

__all__ = ["built", "fleet", "keys"]  # fixtures, used by name


def test_a_power_cut_mid_shadow_install_leaves_the_device_serving_its_active_model(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, _ = start(fleet)
    released = install_v1(fleet, built, agent)
    before = device_state(agent)
    agent.stop()
    agent, _ = start(fleet, faults={"hold_at": ["shadow-staging"]})
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow half written", lambda: agent.holding("shadow-staging"))
    agent.kill()
    shadow = agent.data_dir / "shadow"
    assert not (shadow / "current").exists(), "a half-written shadow is in place"
    assert (shadow / ".staging").exists()

    agent, url = start(fleet)
    served = answers(agent, url, field_rows(3))
    assert {(a["model_version"], a["parameters"]["stage"]) for a in served} == {("1.0.0", "active")}
    assert not (shadow / ".staging").exists()
    agent.wait_for("the shadow installed whole", lambda: events(agent, "shadow-installed"))
    manifest = json.loads((shadow / "current" / "manifest.json").read_text())
    assert manifest["version"] == "1.0.1"
    assert device_state(agent) == before
    agent.stop()


def test_the_fetcher_checks_a_shadow_like_an_assignment_release_counter_included(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    released = {k: fleet.release(v) for k, v in built.items()}
    list_targets(fleet, released["v1"], released["v1-again"])
    config = AgentConfig.load(fleet.agent_config(DEVICE))
    below = run_shadow(config, released["v3-bad"].release_counter)
    assert isinstance(below, Refused), below
    assert (below.reason, below.about) == ("release-counter-downgrade", "shadow")
    assert "1.0.1" in below.message
    assert not shadow_downloads_dir(config).exists()  # refused before any download

    got = run_shadow(config, released["v1"].release_counter)
    assert isinstance(got, ShadowDownloaded), got
    assert got.target.version == "1.0.1" and Path(got.path).parent == shadow_downloads_dir(config)
    kept = run_shadow(config, released["v1"].release_counter, [got.target.bundle_id])
    assert isinstance(kept, ShadowKept) and kept.target == got.target
    fleet.assign(DEVICE, released["v1"])
    assert isinstance(run_shadow(config, released["v1"].release_counter), NoShadow)


def requests_to(fleet: Fleet, since: int, part: str) -> int:
    """The requests the repository server answered after the first ``since``, for ``part``."""
    return sum(part in path for path, _ in fleet.server.faults.requests[since:])


def director_checks(fleet: Fleet, since: int) -> int:
    """The director refreshes since ``since``: the installer's check and the shadow's, per poll."""
    return requests_to(fleet, since, f"/director/devices/{DEVICE}/metadata/timestamp.json")


@pytest.mark.parametrize("fault", ["tampered-bundle", "unreachable"])
def test_a_shadow_download_refused_or_unreachable_is_retried_with_a_backoff_not_every_poll(
    fault: str, fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, _ = start(fleet)
    released = install_v1(fleet, built, agent)
    shadow = released["v1-again"]
    name = Path(shadow.target_path).name
    if fault == "tampered-bundle":  # the bytes on the server differ from the signed ones
        stored = next(fleet.repo.targets_dir.rglob(f"*{name}"))
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    else:  # every download of the shadow breaks off before its first byte
        fleet.server.faults = Faults(match=name, cut_after=0)
    since = len(fleet.server.faults.requests)
    started = time.monotonic()
    list_targets(fleet, released["v1"], shadow)
    # At least eight polls: each refreshes the director once or twice (check, shadow).
    agent.wait_for("eight polls", lambda: director_checks(fleet, since) >= 16, timeout=300)
    elapsed = time.monotonic() - started
    downloads = requests_to(fleet, since, name)
    interval = 0.2  # the poll interval of the test fleet's agents
    # The k-th try comes at least interval * (2**(k-1) - 1) after the first: a bound from
    # the time that passed, so a slow machine only loosens it. Every poll would be 8 or more.
    bound = math.floor(math.log2(elapsed / interval + 1)) + 1
    assert 2 <= downloads <= bound, (downloads, bound, elapsed)
    refused = events(agent, "shadow-refused")
    if fault == "tampered-bundle":
        assert [e["reason"] for e in refused] == ["tampered-bundle"]  # reported once
        assert refused[0]["bundle"] == "pump-health 1.0.1"
    else:
        assert refused == []  # unreachable is no refusal
    assert not events(agent, "shadow-installed")
    assert installed(agent) == "1.0.0"
    agent.stop()


def test_a_shadow_refused_by_its_self_test_is_not_tried_again_after_a_restart(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, _ = start(fleet)
    released = install_v1(fleet, built, agent)
    heavy = Path(released["v1-heavy"].target_path).name
    since = len(fleet.server.faults.requests)
    list_targets(fleet, released["v1"], released["v1-heavy"])
    agent.wait_for("the shadow refused", lambda: events(agent, "shadow-refused"))
    [refused] = events(agent, "shadow-refused")
    assert refused["reason"] == "self-test-failed" and refused["bundle"] == "pump-health 1.0.2"
    assert requests_to(fleet, since, heavy) == 1
    agent.stop()

    agent, _ = start(fleet)  # the same bundle still listed
    restarted = len(fleet.server.faults.requests)
    agent.wait_for("four polls", lambda: director_checks(fleet, restarted) >= 8, timeout=300)
    assert requests_to(fleet, since, heavy) == 1, "the refused shadow was downloaded again"
    assert len(events(agent, "shadow-refused")) == 1
    assert not events(agent, "shadow-installed")
    assert not (agent.data_dir / "shadow" / "current").exists()
    status = collect_status(AgentConfig.load(agent.config))
    assert status["shadow_refused"]["bundle"] == "pump-health 1.0.2"
    assert "shadow refused: pump-health 1.0.2 (self-test-failed)" in describe_status(status)

    list_targets(fleet, released["v1"], released["v1-again"])  # another bundle: tried as usual
    agent.wait_for("the other shadow installed", lambda: events(agent, "shadow-installed"))
    assert events(agent, "shadow-installed")[0]["bundle"] == "pump-health 1.0.1"
    assert not (agent.data_dir / "shadow" / "refused.json").exists()
    assert collect_status(AgentConfig.load(agent.config))["shadow_refused"] is None
    agent.stop()
