"""The hybrid plan in the director metadata: followed only signed, for this device, unexpired.

Real TUF director metadata signed with real keys (the server's director
repository signs the targets; the plan target is built here as the contract
says: ``hybrid-plan/PLAN_ID.json``, the canonical JSON's length and sha256,
``custom = {"hybrid_plan": plan}``), read by the agent's own fetcher code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from agent.config import AgentConfig
from agent.ota.answers import Assigned, PlanRead
from agent.ota.director_client import (
    PLAN_DUPLICATE,
    PLAN_EXPIRED,
    PLAN_HASH_MISMATCH,
    PLAN_MALFORMED,
    PLAN_WRONG_DEVICE,
    DirectorClient,
)
from agent.ota.fetch_worker import resolve_shadow, run, run_plan, trust_dirs
from agent.ota.plan import PlanState, expire, follow
from fleet_server.director import DirectorRepository
from fleet_server.director.repository import DIRECTOR_EXPIRY
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository, ReleasedBundle
from protocol.director_marks import HYBRID_PLAN
from protocol.hybrid import HybridPlan
from testbed.images import HARDWARE

DEVICE = "pump-1"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def director_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return init_keys(tmp_path_factory.mktemp("director-keys") / "keys")


@pytest.fixture
def released(
    repo: ImageRepository, session_keys: KeyStore, bundles: dict[str, Path]
) -> dict[str, ReleasedBundle]:
    repo.add_bundle(bundles["v2"], session_keys)
    return {b.version: b for b in repo.bundles()}


@pytest.fixture
def director(tmp_path: Path, director_keys: KeyStore) -> DirectorRepository:
    d = DirectorRepository(tmp_path / "director")
    d.create(director_keys)
    return d


def agent_config(
    tmp_path: Path, repo: ImageRepository, director: DirectorRepository, device: str = DEVICE
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": device,
            "hardware_id": HARDWARE,
            "data_dir": str(tmp_path / f"device-{device}"),
            "image_repository": {"url": str(repo.path), "root": str(repo.trusted_root_path)},
            "director": {"url": str(director.path), "root": str(director.trusted_root_path)},
        }
    )


def make_plan(
    plan_id: str = "p-0123456789ab", device: str = DEVICE, ttl: timedelta = timedelta(hours=1)
) -> HybridPlan:
    return HybridPlan(
        plan_id=plan_id,
        device_id=device,
        mode="escalate",
        temperature=1.7,
        tau=0.82,
        quota_rate=2.0,
        quota_burst=4,
        audit_rate=0.05,
        cloud_model="pump-health-cloud",
        issued_at=NOW - timedelta(minutes=1),
        expires_at=NOW - timedelta(minutes=1) + ttl,
    )


def plan_target(plan: HybridPlan, custom: dict[str, Any] | None = None) -> TargetFile:
    """The plan's director target as the contract says (``custom`` replaces the plan's).

    The plan is signed as the text of its canonical JSON: TUF's canonical JSON has no floats.
    """
    body = plan.canonical_json()
    return TargetFile(
        length=len(body),
        hashes={"sha256": hashlib.sha256(body).hexdigest()},
        path=f"hybrid-plan/{plan.plan_id}.json",
        unrecognized_fields={
            "custom": custom if custom is not None else {HYBRID_PLAN: body.decode()}
        },
    )


def floats_as_strings(plan: HybridPlan) -> dict[str, Any]:
    """The plan as an object whose floats are strings (TUF's canonical JSON has no floats)."""
    return {
        k: str(v) if isinstance(v, float) else v for k, v in plan.model_dump(mode="json").items()
    }


def sign_with(
    director: DirectorRepository,
    keys: KeyStore,
    *plans: TargetFile,
    device: str = DEVICE,
    bundle: ReleasedBundle | None = None,
) -> None:
    """Sign ``device``'s director targets: its assignment (``bundle``, if any) and ``plans``."""
    if bundle is not None:
        director.assign(keys, device, HARDWARE, bundle)
    else:
        director.register(keys, device)
    repo = director.device(device)
    listed = {p: t for p, t in repo.targets().items() if HYBRID_PLAN not in (t.custom or {})}
    listed.update({t.path: t for t in plans})
    repo.sign(keys, listed, None)


def read(config: AgentConfig, now: datetime = NOW) -> PlanRead:
    answer = run_plan(config, now)
    assert isinstance(answer, PlanRead), answer
    return answer


def test_a_signed_plan_for_this_device_is_followed_beside_its_assignment(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    plan = make_plan()
    sign_with(director, director_keys, plan_target(plan), bundle=released["2.0.0"])
    config = agent_config(tmp_path, repo, director)
    answer = read(config)
    assert answer.plan == plan and answer.refusal is None and answer.refresh_failed is None
    assert answer.expires is not None and answer.expires > plan.expires_at
    # The plan target is no bundle: the assignment and the (absent) shadow read as before.
    check = run("check", config, 0)
    assert isinstance(check, Assigned) and check.target.version == "2.0.0"
    assert resolve_shadow(config, 0)[0] is None
    listing = DirectorClient(trust_dirs(config)[1], str(director.path), DEVICE).targets(NOW)
    assert listing.plan == plan and listing.assignment is not None
    # Through the keeper's rules: followed until the plan's own expiry.
    state = follow(PlanState(), answer)
    assert (state.plan, state.until, state.refusal) == (plan, plan.expires_at, None)


def test_tuf_cannot_sign_a_plan_object_with_floats_so_its_text_is_signed(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    from tuf.api.serialization import SerializationError

    plan = make_plan()
    with pytest.raises(SerializationError):
        as_object = {HYBRID_PLAN: plan.model_dump(mode="json")}
        sign_with(director, director_keys, plan_target(plan, as_object))
    # An object with its floats written as strings signs, and reads as the same plan.
    sign_with(director, director_keys, plan_target(plan, {HYBRID_PLAN: floats_as_strings(plan)}))
    assert read(agent_config(tmp_path, repo, director)).plan == plan


def test_a_new_plan_alone_applies_without_any_bundle(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    config = agent_config(tmp_path, repo, director)
    sign_with(director, director_keys)
    assert read(config).plan is None
    first, second = make_plan("p-aaaaaaaaaaaa"), make_plan("p-bbbbbbbbbbbb")
    sign_with(director, director_keys, plan_target(first))
    assert read(config).plan == first
    sign_with(director, director_keys, plan_target(second))
    assert read(config).plan == second
    sign_with(director, director_keys)  # withdrawn: local only, nothing refused
    answer = read(config)
    assert (answer.plan, answer.refusal) == (None, None)


def test_a_plan_whose_custom_was_changed_after_hashing_is_refused_and_the_assignment_kept(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    plan = make_plan()
    bolder = plan.model_copy(update={"tau": 0.99, "quota_rate": 50.0})
    # The length and sha256 are the signed plan's; the custom says another one.
    tampered = plan_target(plan, {HYBRID_PLAN: bolder.canonical_json().decode()})
    sign_with(director, director_keys, tampered, bundle=released["2.0.0"])
    config = agent_config(tmp_path, repo, director)
    answer = read(config)
    assert answer.plan is None and answer.refusal is not None
    assert answer.refusal.reason == PLAN_HASH_MISMATCH
    assert "p-0123456789ab" in answer.refusal.message
    assert "hybrid-plan/p-0123456789ab.json" in answer.refusal.message
    check = run("check", config, 0)
    assert isinstance(check, Assigned) and check.target.version == "2.0.0"


def test_a_plan_for_another_device_is_refused_by_name(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    sign_with(director, director_keys, plan_target(make_plan(device="pump-2")))
    answer = read(agent_config(tmp_path, repo, director))
    assert answer.plan is None and answer.refusal is not None
    assert answer.refusal.reason == PLAN_WRONG_DEVICE
    assert "for device pump-2, this is pump-1" in answer.refusal.message


def test_two_plans_are_both_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    released: dict[str, ReleasedBundle],
) -> None:
    one, two = make_plan("p-aaaaaaaaaaaa"), make_plan("p-bbbbbbbbbbbb")
    sign_with(director, director_keys, plan_target(one), plan_target(two), bundle=released["2.0.0"])
    config = agent_config(tmp_path, repo, director)
    answer = read(config)
    assert answer.plan is None and answer.refusal is not None
    assert answer.refusal.reason == PLAN_DUPLICATE
    assert "2 hybrid plans" in answer.refusal.message
    assert "p-aaaaaaaaaaaa" in answer.refusal.message and "p-bbbbbbbbbbbb" in answer.refusal.message
    check = run("check", config, 0)
    assert isinstance(check, Assigned) and check.target.version == "2.0.0"


@pytest.mark.parametrize(
    ("custom", "says"),
    [
        ({HYBRID_PLAN: {"plan_id": "p-1"}}, "not a hybrid plan"),
        ({HYBRID_PLAN: "escalate everything"}, "not a hybrid plan"),
        ({HYBRID_PLAN: '{"plan_id": "p-1"}'}, "not a hybrid plan"),
        ({HYBRID_PLAN: 17}, "not a hybrid plan"),
        ({HYBRID_PLAN: None, "device_id": DEVICE}, "carries device_id beside hybrid_plan"),
    ],
)
def test_a_malformed_plan_is_refused_by_name(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
    custom: dict[str, Any],
    says: str,
) -> None:
    sign_with(director, director_keys, plan_target(make_plan(), custom))
    answer = read(agent_config(tmp_path, repo, director))
    assert answer.plan is None and answer.refusal is not None
    assert answer.refusal.reason == PLAN_MALFORMED and says in answer.refusal.message


def test_a_plan_under_another_path_is_refused(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    plan = make_plan()
    target = plan_target(plan)
    target.path = "hybrid-plan/p-someone-else.json"
    sign_with(director, director_keys, target)
    answer = read(agent_config(tmp_path, repo, director))
    assert answer.refusal is not None and answer.refusal.reason == PLAN_MALFORMED
    assert "listed as hybrid-plan/p-someone-else.json" in answer.refusal.message


def test_an_expired_plan_is_refused_and_the_device_serves_locally(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    plan = make_plan(ttl=timedelta(minutes=10))
    sign_with(director, director_keys, plan_target(plan))
    config = agent_config(tmp_path, repo, director)
    assert read(config).plan == plan
    later = read(config, NOW + timedelta(minutes=20))
    assert later.plan is None and later.refusal is not None
    assert later.refusal.reason == PLAN_EXPIRED
    assert "p-0123456789ab expired" in later.refusal.message
    # The keeper drops a plan it follows at its expiry, without asking again.
    state = follow(PlanState(), read(config))
    assert expire(state, NOW).plan == plan
    dropped = expire(state, plan.expires_at)
    assert dropped.plan is None and dropped.refusal is not None
    assert dropped.refusal.reason == PLAN_EXPIRED


def test_director_metadata_signed_by_another_key_gives_no_plan(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    thief = init_keys(tmp_path / "thief")
    forged = DirectorRepository(tmp_path / "forged")
    forged.create(thief)
    sign_with(forged, thief, plan_target(make_plan()))
    shutil.copytree(forged.device(DEVICE).path, director.device(DEVICE).path)
    answer = read(agent_config(tmp_path, repo, director))
    assert answer.plan is None and answer.refusal is None
    assert answer.refresh_failed is not None
    assert answer.refresh_failed.reason == "untrusted-metadata"
    assert follow(PlanState(), answer).plan is None


def test_a_trusted_plan_outlives_forged_metadata_only_until_its_own_expiry(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    plan = make_plan(ttl=timedelta(minutes=10))
    sign_with(director, director_keys, plan_target(plan))
    config = agent_config(tmp_path, repo, director)
    state = follow(PlanState(), read(config))
    assert state.plan == plan
    # Now the device is served forged metadata carrying a bolder plan.
    thief = init_keys(tmp_path / "thief")
    forged = DirectorRepository(tmp_path / "forged")
    forged.create(thief)
    bolder = make_plan("p-ffffffffffff", ttl=timedelta(days=30))
    sign_with(forged, thief, plan_target(bolder))
    shutil.rmtree(director.device(DEVICE).path)
    shutil.copytree(forged.device(DEVICE).path, director.device(DEVICE).path)
    answer = read(config)
    assert answer.refresh_failed is not None
    assert answer.refresh_failed.reason == "untrusted-metadata"
    assert answer.plan == plan, "the plan trusted before, never the forged one"
    state = follow(state, answer)
    assert (state.plan, state.until) == (plan, plan.expires_at)
    # Past the trusted plan's expiry nothing is followed, forged metadata or not.
    after = read(config, plan.expires_at + timedelta(seconds=1))
    assert after.plan is None and after.refusal is not None
    assert after.refusal.reason == PLAN_EXPIRED
    assert follow(state, after).plan is None
    assert expire(state, plan.expires_at).plan is None


def test_after_a_restart_the_plan_is_read_again_from_the_trusted_metadata(
    tmp_path: Path,
    repo: ImageRepository,
    director: DirectorRepository,
    director_keys: KeyStore,
) -> None:
    plan = make_plan()
    sign_with(director, director_keys, plan_target(plan))
    config = agent_config(tmp_path, repo, director)
    assert read(config).plan == plan
    # A restart while the director is unreachable: a new fetcher, only the trust store on disk.
    shutil.move(director.path, tmp_path / "director-gone")
    answer = read(config)
    assert answer.refresh_failed is not None
    assert answer.refresh_failed.reason == "repository-unavailable"
    assert answer.plan == plan and answer.refusal is None
    # The stored metadata is verified again: a changed byte in it means no plan.
    stored = trust_dirs(config)[1] / "targets.json"
    stored.write_bytes(stored.read_bytes().replace(b"0.82", b"0.12"))
    spoiled = read(config)
    assert spoiled.plan is None and spoiled.refresh_failed is not None
    assert "trusted before" in spoiled.refresh_failed.message
    # A plan followed until then is dropped, saying why.
    dropped = follow(PlanState(plan=plan, until=plan.expires_at), spoiled)
    assert dropped.plan is None and dropped.refusal is not None
    assert dropped.refusal.reason == "repository-unavailable"


def test_a_plan_lives_no_longer_than_the_director_metadata_that_carried_it(
    tmp_path: Path,
    repo: ImageRepository,
    director_keys: KeyStore,
) -> None:
    # Targets signed to expire well before the plan (an unusually short director policy).
    expiry = dataclasses.replace(DIRECTOR_EXPIRY, targets=timedelta(minutes=30))
    short = DirectorRepository(tmp_path / "director", expiry=expiry)
    short.create(director_keys)
    plan = make_plan(ttl=timedelta(hours=6))
    sign_with(short, director_keys, plan_target(plan))
    answer = read(agent_config(tmp_path, repo, short))
    assert answer.plan == plan and answer.expires is not None
    state = follow(PlanState(), answer)
    assert state.until == answer.expires and state.until < plan.expires_at
    dropped = expire(state, answer.expires)
    assert dropped.plan is None and dropped.refusal is not None
    assert dropped.refusal.reason == PLAN_EXPIRED
    assert "director metadata that carried it expired" in dropped.refusal.message
