"""The plan target in a device's director metadata: signed beside the assignment, kept on every
re-signing of it, replaced or removed only by a plan signing; its custom parses back to the
plan whose canonical JSON the target's length and sha256 describe."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleet_server.director import DirectorRepository
from fleet_server.director.repository import plan_target
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository, RepositoryError
from protocol.director_marks import HYBRID_PLAN
from protocol.hybrid import HybridPlan
from testbed.images import HARDWARE

NOW = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)


def plan(plan_id: str = "p-0123456789ab", device: str = "dev-1", **more: object) -> HybridPlan:
    values: dict[str, object] = {
        "mode": "escalate",
        "tau": 0.1 + 0.2,  # a float whose shortest text is long
        "temperature": 1.7,
        "quota_rate": 1e-5,
        "quota_burst": 2,
        "audit_rate": 0.02,
        **more,
    }
    return HybridPlan(
        plan_id=plan_id,
        device_id=device,
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=10),
        **values,  # type: ignore[arg-type]
    )


def targets(director: DirectorRepository, device: str) -> dict[str, dict[str, object]]:
    repo = director.device(device)
    version = repo.signed().version
    document = json.loads((repo.metadata_dir / f"{version}.targets.json").read_text())
    return dict(document["signed"]["targets"])


@pytest.fixture
def director(tmp_path: Path, session_keys: KeyStore) -> DirectorRepository:
    d = DirectorRepository(tmp_path / "director")
    d.create(session_keys)
    d.register(session_keys, "dev-1")
    return d


def test_the_custom_parses_back_to_the_plan_whose_bytes_are_signed() -> None:
    p = plan()
    target = plan_target(p)
    custom = target.unrecognized_fields["custom"][HYBRID_PLAN]
    assert custom == p.canonical_json().decode()  # text: TUF's canonical JSON has no floats
    again = HybridPlan.model_validate_json(custom)
    assert again == p and again.canonical_json() == p.canonical_json()
    assert target.path == "hybrid-plan/p-0123456789ab.json"
    assert target.length == len(p.canonical_json())
    assert target.hashes == {"sha256": hashlib.sha256(p.canonical_json()).hexdigest()}
    assert set(target.unrecognized_fields["custom"]) == {HYBRID_PLAN}


def test_an_assignment_re_signed_keeps_the_plan_and_a_plan_signing_keeps_the_assignment(
    director: DirectorRepository, session_keys: KeyStore, repo: ImageRepository
) -> None:
    bundle = repo.bundles()[0]
    director.assign(session_keys, "dev-1", HARDWARE, bundle)
    v = director.sign_plan(session_keys, "dev-1", plan())
    signed = director.signed("dev-1")
    assert signed.target_path == bundle.target_path and signed.plan_id == "p-0123456789ab"
    assert signed.version == v
    director.assign(session_keys, "dev-1", HARDWARE, bundle)  # re-signed: the plan stays
    assert set(targets(director, "dev-1")) == {
        bundle.target_path,
        "hybrid-plan/p-0123456789ab.json",
    }
    director.unassign(session_keys, "dev-1")  # withdrawn: the plan stays too
    assert director.signed("dev-1").plan_id == "p-0123456789ab"
    assert director.signed("dev-1").target_path is None
    director.sign_plan(session_keys, "dev-1", plan("p-000000000002"))  # replaced, never two
    assert list(targets(director, "dev-1")) == ["hybrid-plan/p-000000000002.json"]
    director.sign_plan(session_keys, "dev-1", None)  # dropped
    assert targets(director, "dev-1") == {} and director.signed("dev-1").plan_id is None


def test_a_plan_signing_at_a_version_not_newer_signs_nothing(
    director: DirectorRepository, session_keys: KeyStore
) -> None:
    v = director.sign_plan(session_keys, "dev-1", plan(), 5)
    assert v == 5
    assert director.sign_plan(session_keys, "dev-1", plan("p-000000000002"), 5) == 5
    assert director.signed("dev-1").plan_id == "p-0123456789ab"


def test_a_plan_for_another_device_is_refused(
    director: DirectorRepository, session_keys: KeyStore
) -> None:
    with pytest.raises(RepositoryError, match="is for dev-2, not dev-1"):
        director.sign_plan(session_keys, "dev-1", plan(device="dev-2"))


def test_a_plan_target_that_does_not_parse_never_hides_the_assignment(
    director: DirectorRepository, session_keys: KeyStore, repo: ImageRepository
) -> None:
    bundle = repo.bundles()[0]
    director.assign(session_keys, "dev-1", HARDWARE, bundle)
    bad = plan_target(plan())
    bad.unrecognized_fields["custom"] = {HYBRID_PLAN: "not a plan"}
    repo_ = director.device("dev-1")
    listed = {bundle.target_path: repo_.targets()[bundle.target_path], bad.path: bad}
    repo_.sign(session_keys, listed, None)
    signed = director.signed("dev-1")
    assert signed.target_path == bundle.target_path and signed.plan_id == "p-0123456789ab"
    director.sign_plan(session_keys, "dev-1", None)  # and it can be signed away
    assert set(targets(director, "dev-1")) == {bundle.target_path}
