"""A rollout's shadow stage on the device, with real agent processes, signatures and models.

The director lists, beside the device's assignment, a bundle marked as a
shadow: the agent installs it outside its slots, runs it on requests without
serving its answers and counts what it did in its window summaries; it drops
it when the director stops listing it, refuses a forged or tampered one with
the active model untouched, and a power cut mid-install leaves it serving
its active model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from agent.config import AgentConfig
from agent.ota.answers import NoShadow, Refused, ShadowDownloaded, ShadowKept
from agent.ota.fetch_worker import run_shadow, shadow_downloads_dir
from agent.status import collect_status, describe_status
from agent.telemetry.outbox import Outbox
from fleet_server.director.repository import assignment_custom
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle
from protocol.director_marks import SHADOW
from protocol.manifest import ResourceBudget
from protocol.window import WindowSummary, decode_window
from testbed.fleet import HARDWARE, AgentProcess, Fleet
from testbed.http_repo import Faults
from testbed.images import make_bundle

pytestmark = pytest.mark.integration

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


def test_an_identical_shadow_agrees_on_every_request_it_runs_and_changes_nothing_served(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    before = device_state(agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    installed_event = events(agent, "shadow-installed")[0]
    assert installed_event["bundle"] == "pump-health 1.0.1"
    assert installed_event["memory_mb"] is not None and installed_event["latency_p95_ms"] > 0
    assert device_state(agent) == before, "the shadow changed the slots or the journal"
    assert (agent.data_dir / "shadow" / "current" / "manifest.json").exists()
    status = collect_status(AgentConfig.load(agent.config))
    assert status["shadow"]["version"] == "1.0.1"
    assert "shadow: pump-health 1.0.1 (answers not served)" in describe_status(status)

    rows = field_rows(40, seed=3)
    served = answers(agent, url, rows)
    assert {(a["model_version"], a["parameters"]["stage"]) for a in served} == {("1.0.0", "active")}
    time.sleep(1.0)  # a run in a worker thread reports after its answer (microseconds)
    assert agent.stop() == 0  # the last window is stored on the way out

    shadowed = [w.shadow for w in windows(agent) if w.shadow is not None]
    assert shadowed, "no window carries a shadow section"
    assert {(s.bundle_id, s.model_version) for s in shadowed} == {
        (f"sha256:{released['v1-again'].sha256}", "1.0.1")
    }
    ran = sum(s.requests for s in shadowed)
    assert ran == len(rows)  # share 1.0 and room for every run: none skipped
    assert sum(s.agreements for s in shadowed) == ran
    assert sum(s.errors for s in shadowed) == 0
    assert sum(s.latency_ms.count for s in shadowed) == ran


def test_a_nan_producing_shadow_counts_errors_and_the_answers_served_stay_the_same(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    rows = field_rows(40, idle_share=0.5, seed=5)
    without = answers(agent, url, rows)
    list_targets(fleet, released["v1"], released["v3-bad"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    with_shadow = answers(agent, url, rows)
    assert [a["outputs"] for a in with_shadow] == [a["outputs"] for a in without]
    assert {a["parameters"]["stage"] for a in with_shadow} == {"active"}
    time.sleep(1.0)
    agent.stop()
    shadowed = [w.shadow for w in windows(agent) if w.shadow is not None]
    assert {s.model_version for s in shadowed} == {"3.0.0"}
    assert sum(s.requests for s in shadowed) == len(rows)
    errors = sum(s.errors for s in shadowed)
    assert 0 < errors < len(rows), "the NaN rows were not counted as the shadow's errors"
    # The served windows counted no error: the shadow's NaN never reached an answer.
    assert sum(w.errors for w in windows(agent)) == 0


def test_a_shadow_the_director_stops_listing_is_dropped(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    before = device_state(agent)
    fleet.assign(DEVICE, released["v1"])  # the assignment alone: no shadow listed
    agent.wait_for("the shadow dropped", lambda: events(agent, "shadow-dropped"))
    dropped = events(agent, "shadow-dropped")[0]
    assert dropped["reason"] == "unlisted" and dropped["bundle"] == "pump-health 1.0.1"
    assert not (agent.data_dir / "shadow" / "current").exists()
    assert device_state(agent) == before
    assert answers(agent, url, field_rows(1))[0]["model_version"] == "1.0.0"
    agent.stop()


def test_a_shadow_assigned_later_installs_through_the_slots_as_usual(
    fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, released["v1"], released["v1-again"])
    agent.wait_for("the shadow installed", lambda: events(agent, "shadow-installed"))
    fleet.assign(DEVICE, released["v1-again"])  # promoted: now the assignment, no shadow
    agent.wait_for("1.0.1 committed", lambda: installed(agent) == "1.0.1")
    agent.wait_for("the shadow dropped", lambda: events(agent, "shadow-dropped"))
    assert answers(agent, url, field_rows(1))[0]["model_version"] == "1.0.1"
    assert agent.journal()["installed_counter"] == released["v1-again"].release_counter
    agent.stop()


@pytest.mark.parametrize("forgery", ["director-mismatch", "tampered-bundle", "rollback-mark"])
def test_a_forged_or_tampered_shadow_is_refused_and_the_active_model_untouched(
    forgery: str, fleet: Fleet, built: dict[str, Path]
) -> None:
    agent, url = start(fleet)
    released = install_v1(fleet, built, agent)
    before = device_state(agent)
    shadow = released["v1-again"]
    if forgery == "director-mismatch":  # the director names hashes the release keys never signed
        list_targets(fleet, released["v1"], shadow, sha256="0" * 64)
        expected = "director-mismatch"
    elif forgery == "tampered-bundle":  # the bytes on the server differ from the signed ones
        stored = next((fleet.repo.targets_dir).rglob(f"*{Path(shadow.target_path).name}"))
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        list_targets(fleet, released["v1"], shadow)
        expected = "tampered-bundle"
    else:  # a shadow dressed as a fleet rollback
        list_targets(
            fleet, released["v1"], shadow, shadow_custom={"rollback_of": "sha256:" + "1" * 64}
        )
        expected = "untrusted-metadata"
    agent.wait_for("the shadow refused", lambda: events(agent, "shadow-refused"))
    refused = events(agent, "shadow-refused")[0]
    assert refused["reason"] == expected, refused
    assert not (agent.data_dir / "shadow" / "current").exists()
    assert not events(agent, "shadow-installed")
    assert device_state(agent) == before
    served = answers(agent, url, field_rows(3))
    assert {(a["model_version"], a["parameters"]["stage"]) for a in served} == {("1.0.0", "active")}
    time.sleep(1.0)  # more polls: the same refusal is reported once
    assert len(events(agent, "shadow-refused")) == 1
    agent.stop()


def test_two_shadows_are_refused_naming_both(fleet: Fleet, built: dict[str, Path]) -> None:
    agent, _ = start(fleet)
    released = install_v1(fleet, built, agent)
    list_targets(fleet, None, released["v1-again"], released["v3-bad"])
    agent.wait_for("the shadows refused", lambda: events(agent, "shadow-refused"))
    message = str(events(agent, "shadow-refused")[0]["message"])
    assert "2 shadow bundles" in message
    assert "pump-health-1.0.1" in message and "pump-health-3.0.0" in message
    assert installed(agent) == "1.0.0"
    agent.stop()


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
