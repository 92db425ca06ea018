"""Assignments against a real server: counters checked up front, tag rules, listing, cancelling.

The server is real (its HTTP API on a port, SQLite and PostgreSQL); ``fleetctl``
runs as a separate process where its exit status and one-line refusals are the
point, and in this process elsewhere (faster). What a device reports (its state,
its refusals) goes through the server's own ingest (:func:`write_batch`), as an
MQTT message would. The device side of every "does it get it" check is the real
agent's code (python-tuf on both repositories, the Uptane checks) reading the
metadata the server signed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agent.config import AgentConfig
from agent.ota.errors import ReleaseCounterDowngrade
from agent.ota.fetch_worker import resolve
from agent.ota.image_repository import BundleTarget
from fleet_server.db.models import AuditEntry
from fleet_server.fleetctl import main
from fleet_server.mqtt.ingest import Accepted, write_batch
from protocol.bundle import read_bundle
from protocol.messages import BundleRef, DeviceEvent, ReportedState
from protocol.versioning import default_release_counter
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Fleetctl, one_line_error

pytestmark = pytest.mark.integration

C1 = default_release_counter("1.0.0")
C2 = default_release_counter("2.0.0")


class Fleet(Fleetctl):
    """``fleetctl`` against a server holding releases v1 and v2, with what a device sees of it."""

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    @property
    def repo(self) -> Path:
        return self.tmp / "repo"

    def device(self, device_id: str) -> dict[str, Any]:
        shown = self.run("devices", "show", device_id, "--json")
        assert shown.code == 0, shown.err
        return dict(shown.json())

    def register(self, device_id: str, *tags: str) -> None:
        flags = [x for tag in tags for x in ("--tag", tag)]
        done = self.run("devices", "register", device_id, "--hardware", HARDWARE, *flags)
        assert done.code == 0, done.err

    def path_of(self, version: str) -> str:
        return f"pump-health/pump-health-{version}.bundle"

    def ingest(self, device_id: str, *messages: ReportedState | DeviceEvent) -> None:
        """Store what the device published, through the server's own ingest."""
        channel = {"state": "state", "event": "events"}
        batch = [Accepted(device_id, channel[m.kind], m) for m in messages]
        result = self.api.call(write_batch(self.api.server.db, batch, "test"))
        assert not result.dropped, result.dropped

    def reports_running(self, device_id: str, version: str, counter: int) -> None:
        ref = BundleRef(name="pump-health", version=version, release_counter=counter)
        self.ingest(
            device_id,
            ReportedState(
                device_id=device_id,
                message_id=uuid.uuid4().hex,
                sent_at=time.time(),
                agent_version="0.1.0",
                hardware_id=HARDWARE,
                active=ref,
                installed_counter=counter,
                phase="idle",
            ),
        )

    def device_sees(self, device_id: str, installed_counter: int = 0) -> BundleTarget | None:
        """What the real agent resolves from the server's director and image repository."""
        director = self.api.server.assignments.director
        image = self.api.server.releases.repository
        config = AgentConfig.model_validate(
            {
                "device_id": device_id,
                "hardware_id": HARDWARE,
                "data_dir": str(self.tmp / "devices" / device_id),
                "image_repository": {"url": str(image.path), "root": str(image.trusted_root_path)},
                "director": {"url": str(director.path), "root": str(director.trusted_root_path)},
            }
        )
        target, _ = resolve(config, installed_counter)
        return target

    def audit(self, action: str) -> list[AuditEntry]:
        async def read() -> list[AuditEntry]:
            async with self.api.server.db.session() as session:
                return list(
                    (
                        await session.scalars(
                            select(AuditEntry)
                            .where(AuditEntry.action == action)
                            .order_by(AuditEntry.seq)
                        )
                    ).all()
                )

        return self.api.call(read())

    def token(self, role: str) -> Path:
        created = self.run("tokens", "create", "--name", f"t-{role}", "--role", role, "--json")
        assert created.code == 0, created.err
        path = self.tmp / f"{role}.token"
        path.write_text(created.json()["token"] + "\n")
        return path


@pytest.fixture(scope="module", params=DATABASES)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"assign-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            fleet = Fleet(api, tmp)
            assert main(["keys", "init", "--dir", str(fleet.keys)]) == 0
            for name in ("v1", "v2"):
                add = ["release", "add", str(bundles[name]), "--repo", str(fleet.repo)]
                assert main([*add, "--keys", str(fleet.keys)]) == 0
            push = ["release", "push", "--repo", str(fleet.repo), *fleet.flags()]
            assert main(push) == 0
            yield fleet
        finally:
            api.close()


@pytest.fixture
def fleet(served: Fleet, capsys: pytest.CaptureFixture[str]) -> Fleet:
    served.capsys = capsys
    return served


# -- item: a release below what a device runs ------------------------------------


def test_an_assignment_below_the_counter_a_device_runs_is_refused_naming_both(
    fleet: Fleet,
) -> None:
    fleet.register("low-1", "low-wave")
    fleet.reports_running("low-1", "2.0.0", C2)
    refused = one_line_error(fleet.process("assign", "pump-health@1.0.0", "--device", "low-1"))
    assert "409" in refused
    assert f"pump-health 1.0.0 (release counter {C1})" in refused
    assert f"low-1 runs pump-health 2.0.0 (release counter {C2})" in refused
    assert "--re-release-of pump-health@1.0.0" in refused
    assert fleet.device("low-1")["assigned_target"] is None

    # A tag: how many of its devices, a few of them named.
    for n in range(2, 6):
        fleet.register(f"low-{n}", "low-wave")
        fleet.reports_running(f"low-{n}", "2.0.0", C2)
    fleet.register("low-6", "low-wave")  # reports nothing yet: counter 0
    refused = one_line_error(fleet.run("assign", "pump-health@1.0.0", "--tag", "low-wave"))
    assert "5 of the 6 devices it matches (tag low-wave)" in refused
    assert "low-1 runs" in refused and "low-3 runs" in refused and "and 2 more" in refused
    assert "low-6" not in refused
    assert all(fleet.device(f"low-{n}")["assigned_target"] is None for n in range(1, 7))
    assert not [e for e in fleet.audit("assignment.create") if "low-1" in e.details["devices"]]
    # Not below: the same release and a newer one are assigned as before.
    assert fleet.run("assign", "pump-health@2.0.0", "--tag", "low-wave").code == 0


def test_an_old_model_re_released_above_the_counter_reaches_a_device_running_a_newer_one(
    fleet: Fleet, bundles: dict[str, Path]
) -> None:
    fleet.register("rb-1")
    fleet.reports_running("rb-1", "2.0.0", C2)
    released = fleet.process(
        "release",
        "add",
        "--re-release-of",
        "pump-health@1.0.0",
        "--repo",
        str(fleet.repo),
        "--keys",
        str(fleet.keys),
        remote=False,
    )
    assert released.code == 0, released.err
    assert "Re-released pump-health 1.0.0 as pump-health 2.0.1" in released.out
    assert f"fleetctl release push --repo {fleet.repo}" in released.out
    # The same model bytes, a new version and a counter above every earlier one.
    [renewed] = (fleet.repo / "targets" / "pump-health").glob("*.pump-health-2.0.1.bundle")
    with renewed.open("rb") as f:
        manifest, members = read_bundle(f)
    with bundles["v1"].open("rb") as f:
        _, old_members = read_bundle(f)
    assert members["model.tflite"] == old_members["model.tflite"]
    assert manifest.release_counter > C2 and "re-release of pump-health 1.0.0" in (
        manifest.description
    )
    again = fleet.local(
        "release",
        "add",
        "--re-release-of",
        "pump-health@0.9.0",
        "--repo",
        str(fleet.repo),
        "--keys",
        str(fleet.keys),
    )
    assert "no pump-health 0.9.0" in one_line_error(again)
    lower = ["--re-release-of", "pump-health@1.0.0", "--version", "1.5.0"]
    lower += ["--repo", str(fleet.repo), "--keys", str(fleet.keys)]
    refused = one_line_error(fleet.local("release", "add", *lower))
    assert f"version 1.5.0 has release counter {default_release_counter('1.5.0')}" in refused
    assert "not above" in refused and "pump-health 2.0.1" in refused

    pushed = fleet.run("release", "push", "--repo", str(fleet.repo), "--json")
    assert [r["version"] for r in pushed.json()["published"]] == ["2.0.1"]
    [published] = [e for e in fleet.audit("release.publish") if "2.0.1" in e.subject]
    assert published.details["re_release_of"] == "1.0.0"

    assigned = fleet.process("assign", "pump-health@2.0.1", "--device", "rb-1")
    assert assigned.code == 0, assigned.err
    target = fleet.device_sees("rb-1", installed_counter=C2)
    assert target is not None and target.version == "2.0.1" and target.release_counter > C2


def test_devices_show_lists_refusals_and_warns_when_the_assigned_bundle_was_refused(
    fleet: Fleet,
) -> None:
    fleet.register("rf-1")
    # The server has no report of what rf-1 runs, so it cannot know better than to assign.
    assert fleet.run("assign", "pump-health@1.0.0", "--device", "rf-1").code == 0
    # The real agent, running 2.0.0, refuses it; its event is what it would publish.
    with pytest.raises(ReleaseCounterDowngrade) as refusal:
        fleet.device_sees("rf-1", installed_counter=C2)
    event = DeviceEvent(
        device_id="rf-1",
        message_id=uuid.uuid4().hex,
        sent_at=time.time(),
        event="check-refused",
        at=time.time(),
        details={"reason": refusal.value.reason, "message": refusal.value.detail},
    )
    fleet.ingest("rf-1", event)

    shown = fleet.run("devices", "show", "rf-1")
    assert shown.code == 0, shown.err
    assert "WARNING: rf-1 refused the assigned pump-health 1.0.0" in shown.out
    assert "release-counter-downgrade" in shown.out
    assert "recent refusals:" in shown.out
    view = fleet.device("rf-1")
    assert view["refusals"][0]["event"] == "check-refused"
    assert view["refusals"][0]["reason"] == "release-counter-downgrade"
    assert "below the installed" in view["refusals"][0]["message"]

    # A newer assignment: the refusal stays listed, the warning goes.
    assert fleet.run("assign", "pump-health@2.0.0", "--device", "rf-1").code == 0
    shown = fleet.run("devices", "show", "rf-1")
    assert "WARNING" not in shown.out and "recent refusals:" in shown.out
    assert fleet.device("rf-1")["assignment_warning"] is None


# -- item: tag assignments are rules ---------------------------------------------


def test_a_tag_rule_assigns_devices_that_gain_the_tag_later(fleet: Fleet) -> None:
    fleet.register("tr-1", "tr-canary")
    made = fleet.run("assign", "pump-health@1.0.0", "--tag", "tr-canary", "--json")
    assert made.code == 0, made.err
    rule = made.json()["rule"]
    assert rule.startswith("tag-")
    v1 = fleet.path_of("1.0.0")

    # Registered with the tag (fleetctl as its own process).
    registered = fleet.process(
        "devices", "register", "tr-2", "--hardware", HARDWARE, "--tag", "tr-canary"
    )
    assert registered.code == 0, registered.err
    assert fleet.device("tr-2")["assigned_target"] == v1
    seen = fleet.device_sees("tr-2")
    assert seen is not None and seen.version == "1.0.0"

    # Tagged later.
    fleet.register("tr-3")
    assert fleet.device_sees("tr-3") is None
    assert fleet.run("devices", "tag", "tr-3", "--add", "tr-canary").code == 0
    assert fleet.device("tr-3")["assigned_target"] == v1
    seen = fleet.device_sees("tr-3")
    assert seen is not None and seen.version == "1.0.0"

    # Enrolled with a provisioning token that tags.
    token = fleet.run("provisioning-token", "create", "--tag", "tr-canary", "--json")
    r = fleet.api.request(
        "POST",
        "/api/v1/devices/enrol",
        json={"token": token.json()["token"], "device_id": "tr-4", "hardware_id": HARDWARE},
    )
    assert r.status == 201, r.data
    assert fleet.device("tr-4")["assigned_target"] == v1
    seen = fleet.device_sees("tr-4")
    assert seen is not None and seen.version == "1.0.0"

    applied = {e.details["device"]: e for e in fleet.audit("assignment.apply")}
    assert {"tr-2", "tr-3", "tr-4"} <= set(applied)
    assert applied["tr-4"].actor == "device:tr-4" and applied["tr-3"].details["rule"] == rule
    assert applied["tr-2"].actor.startswith("token:") and applied["tr-2"].actor.endswith("admin")

    # Losing the tag keeps what the device was assigned.
    assert fleet.run("devices", "tag", "tr-3", "--remove", "tr-canary").code == 0
    assert fleet.device("tr-3")["assigned_target"] == v1


def test_rule_precedence_by_name_over_tag_and_the_newest_rule_first(fleet: Fleet) -> None:
    v1, v2 = fleet.path_of("1.0.0"), fleet.path_of("2.0.0")
    fleet.register("pr-old", "pr-a")
    assert fleet.run("assign", "pump-health@1.0.0", "--tag", "pr-a").code == 0
    fleet.register("pr-new", "pr-b")
    assert fleet.run("assign", "pump-health@2.0.0", "--tag", "pr-b").code == 0

    # Two rules match: the newer one (pr-b's) wins, whichever tag came first.
    fleet.register("pr-both", "pr-a", "pr-b")
    assert fleet.device("pr-both")["assigned_target"] == v2
    fleet.register("pr-late", "pr-b")
    assert fleet.run("devices", "tag", "pr-late", "--add", "pr-a").code == 0
    assert fleet.device("pr-late")["assigned_target"] == v2

    # Assigned by name: gaining a tag with a rule does not override it.
    fleet.register("pr-named")
    assert fleet.run("assign", "pump-health@2.0.0", "--device", "pr-named").code == 0
    assert fleet.run("devices", "tag", "pr-named", "--add", "pr-a").code == 0
    assert fleet.device("pr-named")["assigned_target"] == v2

    # A device running a higher counter than the rule's release is left alone, and audited.
    fleet.register("pr-ahead")
    fleet.reports_running("pr-ahead", "2.0.0", C2)
    assert fleet.run("devices", "tag", "pr-ahead", "--add", "pr-a").code == 0
    assert fleet.device("pr-ahead")["assigned_target"] is None
    [skip] = [e for e in fleet.audit("assignment.rule-skip") if e.details["device"] == "pr-ahead"]
    assert "pr-ahead runs pump-health 2.0.0" in skip.details["why"]
    assert fleet.device("pr-old")["assigned_target"] == v1


# -- item: listing and cancelling ------------------------------------------------


def test_assignments_are_listed_by_viewers_and_cancelled_by_operators(fleet: Fleet) -> None:
    viewer, operator = fleet.token("viewer"), fleet.token("operator")
    fleet.register("cx-1", "cx-wave")
    fleet.register("cx-2", "cx-wave")
    made = fleet.run("assign", "pump-health@1.0.0", "--tag", "cx-wave", "--json").json()
    rule = made["rule"]
    fleet.register("cx-solo")
    solo = fleet.run("assign", "pump-health@2.0.0", "--device", "cx-solo", "--json").json()
    assert solo["rule"] is None

    listed = fleet.run("assignments", "list", "--tag", "cx-wave", "--json", token_file=viewer)
    assert listed.code == 0, listed.err
    by_id = {a["id"]: a for a in listed.json()}
    assert by_id[rule]["kind"] == "tag" and by_id[rule]["devices"] == 2
    devices = [a for a in listed.json() if a["kind"] == "device"]
    assert sorted(a["device_id"] for a in devices) == ["cx-1", "cx-2"]
    assert all(a["rule"] == rule and a["version"] == "1.0.0" for a in devices)
    table = fleet.process("assignments", "list", "--device", "cx-solo", token_file=viewer)
    assert table.code == 0, table.err
    assert table.out.split()[:3] == ["ID", "APPLIES", "TO"]
    assert "cx-solo" in table.out and "pump-health 2.0.0" in table.out and "active" in table.out
    assert fleet.run("assignments", "list", "--name", "nope", "--json").json() == []
    assert "403" in one_line_error(fleet.run("assignments", "cancel", rule, token_file=viewer))

    # Cancelling the rule: its devices keep what they run, and their metadata names nothing.
    cancelled = fleet.process("assignments", "cancel", rule, token_file=operator)
    assert cancelled.code == 0, cancelled.err
    assert f"Cancelled {rule}" in cancelled.out and "cx-1, cx-2 keep what they run" in cancelled.out
    for device in ("cx-1", "cx-2"):
        assert fleet.device(device)["assigned_target"] is None
        assert fleet.api.server.assignments.director.signed(device).target_path is None
        assert fleet.device_sees(device) is None
    fleet.register("cx-3", "cx-wave")  # the rule no longer applies
    assert fleet.device("cx-3")["assigned_target"] is None
    assert "already cancelled" in one_line_error(fleet.run("assignments", "cancel", rule))
    assert fleet.run("assignments", "list", "--tag", "cx-wave", "--json").json() == []
    history = fleet.run("assignments", "list", "--tag", "cx-wave", "--cancelled", "--json").json()
    assert {a["id"] for a in history} >= {rule} and all(a["cancelled_by"] for a in history)

    # One device's assignment: a superseded one cannot be cancelled, the current one can.
    old = solo["assignments"][0]
    first = fleet.run("assignments", "list", "--device", "cx-solo", "--json").json()[0]["id"]
    again = fleet.run("assign", "pump-health@2.0.0", "--device", "cx-solo")
    assert again.code == 0 and old["device_id"] == "cx-solo"
    assert "no longer the assignment of cx-solo" in one_line_error(
        fleet.run("assignments", "cancel", first)
    )
    unassigned = fleet.process("unassign", "--device", "cx-solo", token_file=operator)
    assert unassigned.code == 0, unassigned.err
    assert "cx-solo keeps what it runs" in unassigned.out
    assert fleet.device("cx-solo")["assigned_target"] is None
    assert fleet.device_sees("cx-solo") is None
    assert "no current assignment" in one_line_error(fleet.run("unassign", "--device", "cx-solo"))
    assert "no assignment tag-999999" in one_line_error(
        fleet.run("assignments", "cancel", "tag-999999")
    )
    assert "give dev-N" in one_line_error(fleet.run("assignments", "cancel", "nonsense"))
    r = fleet.api.request("DELETE", "/api/v1/assignments/nonsense", token=fleet.api.admin_token)
    assert r.status == 404

    # Cancelled assignments are audited with who did it.
    cancels = {e.subject: e for e in fleet.audit("assignment.cancel")}
    assert cancels[rule].details["devices"] == ["cx-1", "cx-2"]
    assert cancels[rule].actor != cancels[rule].details.get("tag")

    # A new assignment after a cancel is signed as usual.
    assert fleet.run("assign", "pump-health@1.0.0", "--device", "cx-1").code == 0
    seen = fleet.device_sees("cx-1")
    assert seen is not None and seen.version == "1.0.0"


def test_unassign_by_tag_cancels_its_rules(fleet: Fleet) -> None:
    fleet.register("ut-1", "ut-wave")
    assert fleet.run("assign", "pump-health@1.0.0", "--tag", "ut-wave").code == 0
    done = fleet.run("unassign", "--tag", "ut-wave")
    assert done.code == 0, done.err
    assert "ut-1 keeps what it runs" in done.out
    assert fleet.device("ut-1")["assigned_target"] is None
    assert "no tag rule for ut-wave" in one_line_error(fleet.run("unassign", "--tag", "ut-wave"))
    assert "give --device ID or --tag TAG" in one_line_error(fleet.run("unassign"))


# -- a yank and the tag rules that name the release --------------------------------


def test_a_yank_cancels_the_tag_rules_of_the_release_so_later_devices_do_not_get_it(
    fleet: Fleet,
) -> None:
    # A release of its own to yank: the old model again, as 7.0.0.
    add = ["release", "add", "--re-release-of", "pump-health@1.0.0", "--version", "7.0.0"]
    assert fleet.local(*add, "--repo", str(fleet.repo), "--keys", str(fleet.keys)).code == 0
    assert fleet.run("release", "push", "--repo", str(fleet.repo)).code == 0
    fleet.register("yk-1", "yank-wave")
    assert fleet.run("assign", "pump-health@7.0.0", "--tag", "yank-wave").code == 0
    seen = fleet.device_sees("yk-1")
    assert seen is not None and seen.version == "7.0.0"
    listed = fleet.run("assignments", "list", "--tag", "yank-wave", "--json").json()
    [rule] = [a for a in listed if a["kind"] == "tag"]
    assert rule["cancelled_at"] is None and rule["devices"] == 1

    yanked = fleet.process("release", "yank", "pump-health@7.0.0", "--reason", "bad bearings")
    assert yanked.code == 0, yanked.err
    assert f"tag rules cancelled: {rule['id']}" in yanked.out
    assert "withdrawn from 1 device(s) not running it" in yanked.out

    # The rule and yk-1's assignment are listed as cancelled by the yank, not as active.
    listed = fleet.run("assignments", "list", "--tag", "yank-wave", "--cancelled", "--json")
    by_id = {a["id"]: a for a in listed.json()}
    assert by_id[rule["id"]]["cancelled_at"] is not None
    [held] = [a for a in by_id.values() if a.get("device_id") == "yk-1"]
    assert held["cancelled_at"] is not None
    assert fleet.run("assignments", "list", "--tag", "yank-wave", "--json").json() == []
    assert fleet.device_sees("yk-1") is None

    # A device gaining the tag later gets nothing from the cancelled rule.
    fleet.register("yk-2", "yank-wave")
    assert fleet.device("yk-2")["assigned_target"] is None
    assert fleet.device_sees("yk-2") is None
    [entry] = [e for e in fleet.audit("release.yank") if "7.0.0" in e.subject]
    assert entry.details["rules_cancelled"] == [rule["id"]]
    assert entry.details["withdrawn"] == ["yk-1"]
