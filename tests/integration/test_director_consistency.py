"""The director's signed metadata follows the database, and stays small.

A device trusts its director metadata, so it must never name an assignment
the database does not hold: the assignment is committed first and signed
after, and what was committed but not signed is signed by the server's
director sync. Every assignment adds a snapshot and a targets version; only
what a device can still fetch is kept. The device side is the real agent's
code (python-tuf, both repositories, Uptane checks) reading the server's
files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, UOWTransaction

from agent.config import AgentConfig
from agent.ota.fetch_worker import resolve
from fleet_server.db.models import Assignment
from fleet_server.director import DirectorRepository, Signed
from fleet_server.director.repository import KEEP_VERSIONS
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository, TufRepository
from testbed.api_server import ServerThread, repository_files
from testbed.fleet import escalate_plan
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

V = "/api/v1"
DEVICE = "pump-7"


@dataclass
class Served:
    api: ServerThread
    repo: ImageRepository
    token: str
    paths: dict[str, str]  # version -> target path

    @property
    def director(self) -> DirectorRepository:
        return self.api.server.assignments.director

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        r = self.api.request(method, V + path, token=self.token, json=body)
        return r.status, json.loads(r.data) if r.data else None

    def assign(self, version: str) -> tuple[int, Any]:
        return self.call(
            "POST", "/assignments", {"release": f"pump-health@{version}", "devices": [DEVICE]}
        )

    def recorded(self) -> tuple[str, int]:
        status, device = self.call("GET", f"/devices/{DEVICE}")
        assert status == 200, device
        return device["assigned_target"], device["director_version"]

    def device_sees(self, data_dir: Path) -> str | None:
        """The version the real agent resolves from the director and image repository."""
        config = AgentConfig.model_validate(
            {
                "device_id": DEVICE,
                "hardware_id": HARDWARE,
                "data_dir": str(data_dir),
                "image_repository": {
                    "url": str(self.repo.path),
                    "root": str(self.repo.trusted_root_path),
                },
                "director": {
                    "url": str(self.director.path),
                    "root": str(self.director.trusted_root_path),
                },
            }
        )
        target, _ = resolve(config, 0)
        return None if target is None else target.version


@pytest.fixture(params=DATABASES)
def served(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[Served]:
    with database_url(request.param, tmp_path) as url:
        api = ServerThread(tmp_path / "server", url)
        try:
            repo = ImageRepository(tmp_path / "repo")
            repo.create(session_keys)
            for name in ("v1", "v2"):
                repo.add_bundle(bundles[name], session_keys)
            files = repository_files(repo.path)
            served = Served(
                api, repo, api.admin_token, {b.version: b.target_path for b in repo.bundles()}
            )
            status, body = served.call("POST", "/releases", {"files": files})
            assert status == 201, body
            status, body = served.call(
                "POST", "/devices", {"device_id": DEVICE, "hardware_id": HARDWARE}
            )
            assert status == 201, body
            yield served
        finally:
            api.close()


@contextmanager
def assignment_commits_fail() -> Iterator[None]:
    """Every commit of a transaction that records an assignment fails, as a lost database would."""

    def note(session: Session, _flush: UOWTransaction, _instances: object) -> None:
        if any(isinstance(o, Assignment) for o in session.new):
            session.info["assigning"] = True

    def fail(session: Session) -> None:
        assigning = session.info.pop("assigning", False)
        if assigning or any(isinstance(o, Assignment) for o in session.new):
            raise OperationalError("COMMIT", {}, ConnectionError("injected: connection lost"))

    event.listen(Session, "before_flush", note)
    event.listen(Session, "before_commit", fail)
    try:
        yield
    finally:
        event.remove(Session, "before_commit", fail)
        event.remove(Session, "before_flush", note)


def test_an_assignment_whose_commit_fails_is_never_signed_and_a_retry_converges(
    served: Served, tmp_path: Path
) -> None:
    status, body = served.assign("1.0.0")
    assert status == 201, body
    v1 = served.recorded()
    assert served.director.signed(DEVICE) == Signed(*v1)
    assert served.device_sees(tmp_path / "device") == "1.0.0"

    with assignment_commits_fail():
        status, body = served.assign("2.0.0")
    assert status == 500 and "internal error" in body["error"], body

    # The database kept 1.0.0, and so did the metadata the device trusts.
    assert served.recorded() == v1
    assert served.director.signed(DEVICE) == Signed(*v1)
    assert served.device_sees(tmp_path / "device") == "1.0.0"

    status, body = served.assign("2.0.0")
    assert status == 201, body
    target, version = served.recorded()
    assert target == served.paths["2.0.0"] and version > v1[1]
    assert body["assignments"][0]["director_version"] == version
    assert served.director.signed(DEVICE) == Signed(target, version)
    assert served.device_sees(tmp_path / "device") == "2.0.0"


def test_an_assignment_committed_but_not_signed_is_signed_by_the_director_sync(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = served.assign("1.0.0")
    assert status == 201, body
    v1 = served.recorded()

    def disk_full(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(served.director, "assign", disk_full)
        status, body = served.assign("2.0.0")
    # Recorded (the operator's decision stands), not yet signed: the device still runs 1.0.0.
    assert status == 201, body
    target, version = served.recorded()
    assert target == served.paths["2.0.0"]
    assert served.director.signed(DEVICE) == Signed(*v1)
    assert served.device_sees(tmp_path / "device") == "1.0.0"
    assert DEVICE in served.api.server.assignments.unsigned

    # What the server runs at start, hourly, and every 30 s for the unsigned ones.
    signed = served.api.call(served.api.server.assignments.sync(served.api.server.db))
    assert signed == 1
    assert served.director.signed(DEVICE) == Signed(target, version)
    assert served.device_sees(tmp_path / "device") == "2.0.0"
    assert not served.api.server.assignments.unsigned
    # A second sync finds nothing to do.
    assert served.api.call(served.api.server.assignments.sync(served.api.server.db)) == 0


def test_metadata_signed_ahead_of_the_database_is_brought_back_to_it(
    served: Served, tmp_path: Path, session_keys: KeyStore
) -> None:
    """A folder left by a commit that failed after signing (as before signing followed it)."""
    status, body = served.assign("1.0.0")
    assert status == 201, body
    v1_path, v1_version = served.recorded()
    released = {b.version: b for b in served.repo.bundles()}
    keys = served.api.server.assignments.keys
    served.director.assign(keys, DEVICE, HARDWARE, released["2.0.0"])  # never committed
    assert served.director.signed(DEVICE) == Signed(served.paths["2.0.0"], v1_version + 1)

    assert served.api.call(served.api.server.assignments.sync(served.api.server.db)) == 1
    assert served.recorded() == (v1_path, v1_version + 2)
    assert served.director.signed(DEVICE) == Signed(v1_path, v1_version + 2)
    assert served.device_sees(tmp_path / "device") == "1.0.0"


def test_a_sync_racing_a_new_assignment_never_signs_the_one_it_replaced(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync reads the database, then an assignment commits and signs, then it looks.

    What it read is stale, and the metadata it then sees names another target at
    a later version, which is what metadata ahead of the database looks like too.
    """
    status, body = served.assign("1.0.0")
    assert status == 201, body
    real = DirectorRepository.signed
    raced: list[tuple[int, Any]] = []

    def signed(self: DirectorRepository, device_id: str) -> Signed:
        if not raced:
            raced.append((0, None))  # the assignment below calls this too
            raced[0] = served.assign("2.0.0")
        return real(self, device_id)

    monkeypatch.setattr(DirectorRepository, "signed", signed)
    served.api.call(served.api.server.assignments.sync(served.api.server.db))
    monkeypatch.undo()
    assert raced and raced[0][0] == 201, raced
    recorded_path, recorded_version = served.recorded()
    assert recorded_path == served.paths["2.0.0"]
    assert served.director.signed(DEVICE) == Signed(served.paths["2.0.0"], recorded_version)
    assert served.device_sees(tmp_path / "device") == "2.0.0"


@pytest.mark.parametrize("ahead", [1, 2], ids=["same-version", "later-version"])
def test_an_assignment_overtaken_while_it_is_signed_is_signed_again_above(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: int
) -> None:
    """Between the sync's look at the metadata and its signing, the hybrid planner signs
    a plan beside the bundle the metadata names: at the version the assignment recorded
    (both read the same recorded version: SQLite has no row locks) or at a later one (its
    version recorded after the assignment's). That signing leaves the assignment out, and
    the assignment's own then signs nothing. It is signed again above the plan, which stays.
    """
    status, body = served.assign("1.0.0")
    assert status == 201, body
    _, v1_version = served.recorded()
    keys = served.api.server.assignments.keys
    real = DirectorRepository.assign
    overtaken: list[int] = []

    def assign(self: DirectorRepository, keys_: KeyStore, device_id: str, *a: Any, **kw: Any):  # type: ignore[no-untyped-def]
        if not overtaken:
            plan = escalate_plan(DEVICE, "p-1")
            overtaken.append(self.sign_plan(keys, device_id, plan, v1_version + ahead))
        return real(self, keys_, device_id, *a, **kw)

    monkeypatch.setattr(DirectorRepository, "assign", assign)
    status, body = served.assign("2.0.0")
    monkeypatch.undo()
    assert status == 201, body
    assert overtaken == [v1_version + ahead]
    target, version = served.recorded()
    assert target == served.paths["2.0.0"] and version == v1_version + ahead + 1
    assert served.director.signed(DEVICE) == Signed(target, version, None, "p-1")
    assert served.device_sees(tmp_path / "device") == "2.0.0"
    assert not served.api.server.assignments.unsigned


def metadata_files(director: DirectorRepository) -> list[str]:
    return sorted(p.name for p in director.device(DEVICE).metadata_dir.glob("*.json"))


def test_many_assignments_leave_a_bounded_folder_the_device_still_verifies(
    served: Served, tmp_path: Path
) -> None:
    early = tmp_path / "early-device"  # refreshed once, long ago
    status, body = served.assign("1.0.0")
    assert status == 201, body
    assert served.device_sees(early) == "1.0.0"

    for i in range(40):
        status, body = served.assign("2.0.0" if i % 2 == 0 else "1.0.0")
        assert status == 201, body
    target, version = served.recorded()
    assert target == served.paths["1.0.0"] and version >= 42
    assert served.director.signed(DEVICE) == Signed(target, version)

    # The root, the timestamp, and the current and previous snapshot and targets.
    previous = served.director.device(DEVICE).metadata_dir
    snapshot = json.loads((previous / "timestamp.json").read_bytes())["signed"]["meta"]
    current_snapshot = snapshot["snapshot.json"]["version"]
    assert metadata_files(served.director) == sorted(
        [
            "1.root.json",
            "timestamp.json",
            *(f"{current_snapshot - k}.snapshot.json" for k in range(KEEP_VERSIONS)),
            *(f"{version - k}.targets.json" for k in range(KEEP_VERSIONS)),
        ]
    )
    # A device that last refreshed 40 assignments ago, and a new one, both verify it.
    assert served.device_sees(early) == "1.0.0"
    assert served.device_sees(tmp_path / "new-device") == "1.0.0"


def test_folders_grown_before_pruning_are_pruned_by_the_maintenance_job(
    served: Served, session_keys: KeyStore, tmp_path: Path
) -> None:
    status, body = served.assign("1.0.0")
    assert status == 201, body
    keys = served.api.server.assignments.keys
    # Signed the way every assignment was before: a new version, nothing deleted.
    grown = TufRepository(served.director.device(DEVICE).path)
    listed = grown.targets()
    for _ in range(10):
        grown.set_targets(keys, listed)
    assert len(metadata_files(served.director)) == 2 + 2 * 12

    assert served.director.prune_all() == 2 * (12 - KEEP_VERSIONS)
    assert len(metadata_files(served.director)) == 2 + 2 * KEEP_VERSIONS
    assert served.device_sees(tmp_path / "device") == "1.0.0"


def test_a_yank_committed_but_not_signed_is_signed_empty_by_the_director_sync(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = served.assign("2.0.0")
    assert status == 201, body
    _, assigned_version = served.recorded()
    assert served.device_sees(tmp_path / "device") == "2.0.0"

    def disk_full(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(served.director, "unassign", disk_full)
        status, body = served.call(
            "POST", "/releases/yank", {"release": "pump-health@2.0.0", "reason": "bad batch"}
        )
    # The yank stands (recorded, audited); the metadata still names 2.0.0 until signed.
    assert status == 200, body
    assert body["withdrawn"] == [DEVICE]
    target, version = served.recorded()
    assert target is None and version > assigned_version
    assert served.director.signed(DEVICE).target_path == served.paths["2.0.0"]
    assert DEVICE in served.api.server.assignments.unsigned

    assert served.api.call(served.api.server.assignments.sync(served.api.server.db)) == 1
    assert served.director.signed(DEVICE) == Signed(None, version)
    assert served.device_sees(tmp_path / "device") is None
    assert served.api.call(served.api.server.assignments.sync(served.api.server.db)) == 0
