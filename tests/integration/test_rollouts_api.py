"""Rollouts against a real server (SQLite and PostgreSQL): the REST API with its roles,
refusals and audit entries, ``fleetctl rollout``, and the controller's tick over a small
fleet of registered devices whose reports go through the server's own ingest.

The tick is called with an injected ``now`` (the clock is the one thing not real); the
devices' side of a fleet rollback is read from the director metadata the server signed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from sqlalchemy import select, text

from fleet_server.db.models import AuditEntry, Device
from fleet_server.fleetctl import main
from fleet_server.mqtt.ingest import Accepted, classify, write_batch
from fleet_server.rollouts import service, store
from protocol.director_marks import SHADOW
from protocol.histogram import ExponentialHistogram, record
from protocol.messages import BundleRef, DeviceEvent, InstallOutcome, ReportedState
from protocol.summary import score_histogram
from protocol.topics import windows_topic
from protocol.versioning import default_release_counter
from protocol.window import WindowSummary, encode_window
from protocol.window.model import ShadowSummary
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Fleetctl, one_line_error

pytestmark = pytest.mark.integration

C1 = default_release_counter("1.0.0")
C2 = default_release_counter("2.0.0")
V1 = "pump-health/pump-health-1.0.0.bundle"
V2 = "pump-health/pump-health-2.0.0.bundle"
NS = "rollouts"
CLASSES = ["normal", "imbalance", "bearing_wear", "overheating"]  # the sample model's


class Fleet(Fleetctl):
    """``fleetctl`` and the REST API against a server holding releases 1.0.0 and 2.0.0."""

    def register(self, device_id: str, *tags: str, timezone: str | None = None) -> None:
        flags = [x for tag in tags for x in ("--tag", tag)]
        flags += ["--timezone", timezone] if timezone else []
        done = self.run("devices", "register", device_id, "--hardware", HARDWARE, *flags)
        assert done.code == 0, done.err

    def reports(
        self,
        device_id: str,
        version: str,
        counter: int,
        outcome: str | None = None,
        phase: str = "idle",
    ) -> None:
        """The device's retained state, through the server's own ingest."""
        ref = BundleRef(name="pump-health", version=version, release_counter=counter)
        state = ReportedState(
            device_id=device_id,
            message_id=uuid.uuid4().hex,
            sent_at=time.time(),
            agent_version="0.1.0",
            hardware_id=HARDWARE,
            active=ref,
            installed_counter=counter,
            phase=phase,  # type: ignore[arg-type]
            last_outcome=(
                InstallOutcome(result=outcome, bundle=ref, at=time.time())  # type: ignore[arg-type]
                if outcome
                else None
            ),
        )
        result = self.api.call(
            write_batch(self.api.server.db, [Accepted(device_id, "state", state)], "test")
        )
        assert not result.dropped, result.dropped

    def windows(self, version: str, end: float, *device_ids: str) -> None:
        """A window of each device on ``version``, through the server's own ingest."""
        batch = []
        for device_id in device_ids:
            rng = np.random.default_rng(len(batch))
            w = WindowSummary(
                window_id=uuid.uuid4().hex,
                device_id=device_id,
                model_name="pump-health",
                model_version=version,
                baseline_id="b1",
                start=end - 60,
                end=end,
                requests=60,
                errors=0,
                served={"active": 58, "previous": 2},
                features=[],
                scores=score_histogram(rng.dirichlet([1.0] * len(CLASSES), size=60), CLASSES),
                latency_ms=record(ExponentialHistogram(), rng.lognormal(3.5, 0.3, size=60)),
            )
            verdict = classify(windows_topic(NS, device_id), encode_window(w), 65536, namespace=NS)
            assert isinstance(verdict, Accepted), verdict
            batch.append(verdict)
        result = self.api.call(write_batch(self.api.server.db, batch, "test"))
        assert not result.dropped, result.dropped

    def shadow_windows(self, end: float, errors: int, *device_ids: str) -> None:
        """A window of each device on 1.0.0 with a shadow section of 2.0.0 (30 of its 60
        requests, ``errors`` of them failed), encoded as a device sends it, through the
        server's own ingest."""
        batch = []
        for n, device_id in enumerate(device_ids):
            rng = np.random.default_rng(1000 + n)
            shadow = ShadowSummary(
                bundle_id="sha256:" + "2" * 64,
                model_version="2.0.0",
                requests=30,
                agreements=28 - errors if errors < 28 else 0,
                errors=errors,
                latency_ms=record(ExponentialHistogram(), rng.lognormal(3.0, 0.3, size=30)),
            )
            w = WindowSummary(
                window_id=uuid.uuid4().hex,
                device_id=device_id,
                model_name="pump-health",
                model_version="1.0.0",
                baseline_id="b1",
                start=end - 60,
                end=end,
                requests=60,
                errors=0,
                served={"active": 60},
                features=[],
                latency_ms=record(ExponentialHistogram(), rng.lognormal(3.5, 0.3, size=60)),
                shadow=shadow,
            )
            verdict = classify(windows_topic(NS, device_id), encode_window(w), 65536, namespace=NS)
            assert isinstance(verdict, Accepted), verdict
            assert isinstance(verdict.message, WindowSummary) and verdict.message.shadow == shadow
            batch.append(verdict)
        result = self.api.call(write_batch(self.api.server.db, batch, "test"))
        assert not result.dropped, result.dropped

    def events(self, event: str, *device_ids: str, **details: Any) -> None:
        """An agent event of each device (``shadow-installed``, ``refused``, ...), through the
        server's own ingest."""
        batch: list[Accepted] = [
            Accepted(
                device_id,
                "events",
                DeviceEvent(
                    device_id=device_id,
                    message_id=uuid.uuid4().hex,
                    sent_at=time.time(),
                    event=event,
                    at=time.time(),
                    details=details,
                ),
            )
            for device_id in device_ids
        ]
        assert not self.api.call(write_batch(self.api.server.db, batch, "test")).dropped

    def seen_at(self, at: datetime, *device_ids: str) -> None:
        """The devices' latest report at ``at`` on the test's clock (the ingest stamps the
        real one): what a device reporting all along shows at a tick that far ahead."""

        async def write() -> None:
            async with self.api.server.db.session() as session:
                for device in (
                    await session.scalars(select(Device).where(Device.id.in_(device_ids)))
                ).all():
                    device.last_seen_at = at

        self.api.call(write())

    def signed_targets(self, device_id: str) -> dict[str, Any]:
        """The targets of the device's director metadata, as the server signed them."""
        director = self.api.server.assignments.director
        signed = director.device(device_id).signed()
        metadata = director.device(device_id).path / "metadata"
        document = json.loads((metadata / f"{signed.version}.targets.json").read_text())
        return dict(document["signed"]["targets"])

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        answer = self.api.request(
            method, f"/api/v1{path}", token=token or self.api.admin_token, json=body
        )
        return answer.status, answer.json() if answer.data else None

    def token(self, role: str) -> str:
        created = self.run("tokens", "create", "--name", f"ro-{role}", "--role", role, "--json")
        assert created.code == 0, created.err
        return str(created.json()["token"])

    def audit(self, action: str, subject: str) -> list[AuditEntry]:
        async def read() -> list[AuditEntry]:
            async with self.api.server.db.session() as session:
                query = select(AuditEntry).where(
                    AuditEntry.action == action, AuditEntry.subject == subject
                )
                return list((await session.scalars(query.order_by(AuditEntry.seq))).all())

        return self.api.call(read())

    def tick(self, now: datetime) -> int:
        server = self.api.server
        return self.api.call(
            service.tick(
                server.db, server.assignments, now, server.manifests, server.kept_aggregates
            )
        )

    def device(self, device_id: str) -> dict[str, Any]:
        status, shown = self.call("GET", f"/devices/{device_id}")
        assert status == 200, shown
        return dict(shown)


@pytest.fixture(scope="module", params=DATABASES)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"rollouts-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            fleet = Fleet(api, tmp)
            keys, repo = tmp / "keys", tmp / "repo"
            assert main(["keys", "init", "--dir", str(keys)]) == 0
            for name in ("v1", "v2"):
                add = ["release", "add", str(bundles[name]), "--repo", str(repo)]
                assert main([*add, "--keys", str(keys)]) == 0
            assert main(["release", "push", "--repo", str(repo), *fleet.flags()]) == 0
            yield fleet
        finally:
            api.close()


@pytest.fixture
def fleet(served: Fleet, capsys: pytest.CaptureFixture[str]) -> Fleet:
    served.capsys = capsys
    return served


def spec(tag: str, **more: Any) -> dict[str, Any]:
    return {
        "release": "pump-health@2.0.0",
        "select": f"tag={tag}",
        "waves": "25%,50%,100%",
        "bake": "30m",
        **more,
    }


def test_create_list_show_and_actions_with_roles_refusals_and_audit(fleet: Fleet) -> None:
    for n in range(4):
        fleet.register(f"api-{n}", "api-wave")
    status, created = fleet.call("POST", "/rollouts", body=spec("api-wave"))
    assert status == 201, created
    rollout_id = created["id"]
    assert created["phase"] == "pending" and created["matched"] == 4
    assert created["spec"]["waves"] == [25.0, 50.0, 100.0]
    assert [s["share"] for s in created["stages"]] == [25.0, 50.0, 95.0, 100.0]
    assert fleet.audit("rollout.create", rollout_id)[0].details["release"] == "pump-health@2.0.0"

    viewer = fleet.token("viewer")
    status, listed = fleet.call("GET", "/rollouts", token=viewer)
    assert status == 200 and rollout_id in [r["id"] for r in listed["rollouts"]]
    status, shown = fleet.call("GET", f"/rollouts/{rollout_id}", token=viewer)
    assert status == 200 and shown["phase"] == "pending"
    status, refused = fleet.call("POST", f"/rollouts/{rollout_id}/pause", token=viewer, body={})
    assert status == 403, refused
    status, refused = fleet.call("POST", "/rollouts", token=viewer, body=spec("api-wave"))
    assert status == 403, refused
    status, missing = fleet.call("GET", "/rollouts/ro-000000000000", token=viewer)
    assert status == 404 and "no rollout ro-000000000000" in missing["error"]

    # A bad spec is refused naming the field.
    status, refused = fleet.call("POST", "/rollouts", body=spec("api-wave", waves="50%,10%"))
    assert status == 422 and refused["error"].startswith("waves"), refused
    status, refused = fleet.call(
        "POST", "/rollouts", body=spec("api-wave", gates={"no_such_gate": {"margin": 0.1}})
    )
    assert status == 422 and "gates" in refused["error"] and "no_such_gate" in refused["error"]
    status, refused = fleet.call(
        "POST", "/rollouts", body=spec("api-wave", gates={"shadow_errors": {"margin": 0.01}})
    )
    assert status == 422 and "shadow_errors judges the shadow stage" in refused["error"]
    status, refused = fleet.call(
        "POST", "/rollouts", body={**spec("api-wave"), "release": "pump-health@9.9.9"}
    )
    assert status == 404, refused

    # One rollout per model and device at a time.
    fleet.register("api-other", "api-wave", "api-more")
    status, refused = fleet.call("POST", "/rollouts", body=spec("api-more"))
    assert status == 409, refused
    assert rollout_id in refused["error"] and "api-other" in refused["error"]

    # An action the controller refuses in the phase is a conflict naming the phase.
    status, refused = fleet.call("POST", f"/rollouts/{rollout_id}/pause", body={})
    assert status == 409 and "pending" in refused["error"], refused
    status, aborted = fleet.call(
        "POST", f"/rollouts/{rollout_id}/abort", body={"reason": "wrong selector"}
    )
    assert status == 200 and aborted["phase"] == "aborted", aborted
    assert aborted["decisions"][-1]["rule"] == "operator abort"
    assert "wrong selector" in aborted["reason"]
    entry = fleet.audit("rollout.abort", rollout_id)[0]
    assert entry.details["phase"] == "aborted" and "wrong selector" in entry.details["reason"]
    # Aborted, it no longer holds its devices.
    status, created = fleet.call("POST", "/rollouts", body=spec("api-more"))
    assert status == 201, created
    status, _ = fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})
    assert status == 200


def test_a_tick_assigns_wave_one_then_a_failing_gate_rolls_the_reached_devices_back(
    fleet: Fleet,
) -> None:
    ids = [f"tick-{n:02d}" for n in range(24)]
    for device_id in ids:
        fleet.register(device_id, "tick-wave")
        fleet.reports(device_id, "1.0.0", C1)
    fleet.windows("1.0.0", time.time() - 3600, *ids)  # each device's own baseline
    status, created = fleet.call("POST", "/rollouts", body=spec("tick-wave", on_failure="rollback"))
    assert status == 201, created
    rollout_id = created["id"]
    start = datetime.now(UTC)

    assert fleet.tick(start) >= 1
    status, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "baking" and shown["stage"] == 1, shown
    wave = [d for d in ids if fleet.device(d)["assigned_target"] == V2]
    assert len(wave) == shown["assigned"] == shown["stages"][0]["devices"] >= 3
    assert shown["decisions"][-1]["action"] == "start wave 1"
    # A tick assigns nothing twice; replayed, it does nothing at all.
    assert fleet.tick(start + timedelta(minutes=1)) == 1
    assert fleet.tick(start + timedelta(minutes=1)) == 0
    assert [d for d in ids if fleet.device(d)["assigned_target"] == V2] == wave

    # The wave installs 2.0.0, then goes silent: past the install timeout each counts as failed.
    for device_id in wave:
        fleet.reports(device_id, "2.0.0", C2, "committed")
    fleet.windows("2.0.0", time.time(), *wave)
    fleet.windows("1.0.0", time.time(), *[d for d in ids if d not in wave])
    fleet.tick(start + timedelta(hours=2))
    status, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "rolling_back", shown
    assert shown["decisions"][-1]["rule"] == "harm shown"
    gate = next(g for g in shown["evaluations"] if g["gate"] == "install_failures")
    assert gate["decision"] == "fail" and gate["n_devices"] == len(wave)
    fallbacks = next(g for g in shown["evaluations"] if g["gate"] == "fallback_rate")
    assert fallbacks["n_devices"] == len(wave), fallbacks
    assert fallbacks["n_control"] == len(ids) - len(wave), fallbacks
    assert fallbacks["n_requests"] == 60 * len(wave)
    # CBPE accuracy, each version by its own calibration, against each device's baseline.
    accuracy = next(g for g in shown["evaluations"] if g["gate"] == "accuracy_estimated")
    assert accuracy["n_devices"] == len(wave), accuracy
    assert accuracy["n_control"] == len(ids) - len(wave)
    assert accuracy["estimate"] is not None
    director = fleet.api.server.assignments.director
    for device_id in wave:
        assert fleet.device(device_id)["assigned_target"] == V1
        signed = director.device(device_id).signed()
        assert signed.target_path == V1
        metadata = director.device(device_id).path / "metadata"
        targets = json.loads((metadata / f"{signed.version}.targets.json").read_text())
        custom = targets["signed"]["targets"][V1]["custom"]
        assert custom["rollback_of"].startswith("sha256:"), custom
    assert fleet.audit("rollout.tick", rollout_id)[-1].details["action"] == "roll back"
    # Later ticks finish a rollback cut short, and leave alone the devices already sent back.
    versions = {d: director.device(d).signed().version for d in wave}
    fleet.tick(start + timedelta(hours=3))
    assert {d: director.device(d).signed().version for d in wave} == versions
    # Signed again (committed at a newer version, as after a crash before signing), the
    # standing rollback keeps its marker.
    first = wave[0]
    before = director.device(first).signed().version

    async def bump() -> None:
        async with fleet.api.server.db.session() as session:
            device = await session.get(Device, first)
            assert device is not None and device.assigned_rollback_of is not None
            device.director_version = before + 1

    fleet.api.call(bump())
    assert fleet.api.call(fleet.api.server.assignments.sync(fleet.api.server.db, [first])) == 1
    signed = director.device(first).signed()
    assert signed.version == before + 1 and signed.target_path == V1
    metadata = director.device(first).path / "metadata"
    targets = json.loads((metadata / f"{signed.version}.targets.json").read_text())
    assert targets["signed"]["targets"][V1]["custom"]["rollback_of"].startswith("sha256:")
    assert fleet.audit("assignment.rollback", rollout_id)


def test_fleetctl_rollout_commands(fleet: Fleet, tmp_path: Path) -> None:
    for n in range(6):
        fleet.register(f"cli-{n}", "cli-wave")
        fleet.reports(f"cli-{n}", "1.0.0", C1)
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"latency_p95": {"margin": 0.2}}))
    created = fleet.run(
        "rollout", "create", "pump-health@2.0.0", "--select", "tag=cli-wave",
        "--waves", "50%,100%", "--bake", "30m", "--rate", "10/min", "--rate-factor", "2",
        "--window", "daily 00:00-24:00 UTC", "--on-failure", "rollback", "--holdback", "0",
        "--gates", str(gates), "--json",
    )  # fmt: skip
    assert created.code == 0, created.err
    rollout_id = created.json()["id"]
    assert created.json()["spec"]["gates"]["latency_p95"]["margin"] == 0.2
    listed = fleet.run("rollout", "list", "--json")
    assert listed.code == 0 and rollout_id in [r["id"] for r in listed.json()]
    assert rollout_id in fleet.run("rollout", "list").out

    fleet.tick(datetime.now(UTC))
    fleet.tick(datetime.now(UTC) + timedelta(minutes=1))
    shown = fleet.run("rollout", "status", rollout_id)
    assert shown.code == 0, shown.err
    assert "phase baking, stage 1 of 2" in shown.out
    assert "install_failures" in shown.out and "inconclusive" in shown.out
    assert "start wave 1" in shown.out and "baking" in shown.out
    assert fleet.run("rollout", "status", rollout_id, "--json").json()["stage"] == 1

    promoted = fleet.run("rollout", "promote", rollout_id, "--reason", "override", "--json")
    assert promoted.code == 0 and promoted.json()["stage"] == 2, promoted.err
    assert promoted.json()["decisions"][-1]["rule"] == "operator override"
    assert promoted.json()["assigned"] == 6  # the ramp's first grant (10/min) covers them
    paused = fleet.run("rollout", "pause", rollout_id, "--reason", "ticket 4711")
    assert paused.code == 0 and "now paused" in paused.out, paused.err
    refused = fleet.process("rollout", "pause", rollout_id)
    assert refused.code != 0 and "409" in one_line_error(refused)
    assert "paused" in one_line_error(refused)
    resumed = fleet.run("rollout", "resume", rollout_id, "--json")
    assert resumed.code == 0 and resumed.json()["phase"] == "baking"
    aborted = fleet.run("rollout", "abort", rollout_id, "--reason", "done testing")
    assert aborted.code == 0 and "now aborted" in aborted.out
    assert fleet.audit("rollout.pause", rollout_id)[0].details["reason"].endswith("ticket 4711")
    assert fleet.audit("rollout.resume", rollout_id)
    assert fleet.run("rollout", "status", rollout_id, "--watch").code == 0  # ended: returns


def test_one_replica_ticks_at_a_time_on_postgresql(fleet: Fleet) -> None:
    db = fleet.api.server.db

    async def tick_while_another_holds_the_lock() -> int:
        async with db.session() as other:
            if other.bind is None or other.bind.dialect.name != "postgresql":
                pytest.skip("SQLite serves one node: no leader to elect")
            held = await other.scalar(
                text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": service.TICK_LOCK_ID}
            )
            assert held
            return await service.tick(db, fleet.api.server.assignments, datetime.now(UTC))

    fleet.register("leader-0", "leader-wave")
    status, created = fleet.call("POST", "/rollouts", body=spec("leader-wave"))
    assert status == 201, created
    assert fleet.api.call(tick_while_another_holds_the_lock()) == 0
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["phase"] == "pending"
    assert fleet.tick(datetime.now(UTC)) >= 1
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["phase"] == "baking"


def test_an_operators_action_racing_a_tick_lands_on_the_state_the_tick_saved(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fleet.api.server

    async def on_postgresql() -> bool:
        async with server.db.session() as session:
            return session.bind is not None and session.bind.dialect.name == "postgresql"

    if not fleet.api.call(on_postgresql()):
        pytest.skip("SQLite serves one node: a tick and an action do not write at once")
    for n in range(4):
        fleet.register(f"race-{n}", "race-wave")
        fleet.reports(f"race-{n}", "1.0.0", C1)
    status, created = fleet.call("POST", "/rollouts", body=spec("race-wave", bake="12h"))
    assert status == 201, created
    rollout_id = created["id"]
    fleet.tick(datetime.now(UTC))  # started
    # The fault: each of the action's first two saves finds that a tick (a real one, on its
    # own connection, as a replica that ignored the stepping locks would) saved the rollout
    # after the action read it.
    saves = store.save_state
    raced: list[int] = []

    async def racing_save(session: Any, rollout: str, **kwargs: Any) -> int:
        if rollout == rollout_id and kwargs["phase"] == "paused" and len(raced) < 2:
            raced.append(kwargs["read_revision"])
            # Another replica's tick, stepping past the locks an action takes (the fault).
            ticked = await service._tick_all(
                server.db, server.assignments, datetime.now(UTC), server.manifests, None
            )
            assert ticked >= 1
        return await saves(session, rollout, **kwargs)

    monkeypatch.setattr(store, "save_state", racing_save)
    status, paused = fleet.call("POST", f"/rollouts/{rollout_id}/pause", body={"reason": "race"})
    assert status == 200, paused
    assert paused["phase"] == "paused" and len(raced) == 2 and raced[0] < raced[1]
    events = [d["event"] for d in paused["decisions"]]
    assert events[-3:] == ["tick", "tick", "pause"]  # decided again after each tick
    monkeypatch.undo()
    assert fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})[0] == 200


def test_a_fleet_rollback_the_device_reports_is_listed_with_its_install_outcomes(
    fleet: Fleet,
) -> None:
    fleet.register("fleet-back-0", "fleet-back")
    event = DeviceEvent(
        device_id="fleet-back-0",
        message_id=uuid.uuid4().hex,
        sent_at=time.time(),
        event="fleet-rolled-back",
        at=time.time(),
        details={
            "reason": "fleet-rollback",
            "bundle": "pump-health 2.0.0",
            "to": "pump-health 1.0.0",
        },
    )
    batch = [Accepted("fleet-back-0", "events", event)]
    assert not fleet.api.call(write_batch(fleet.api.server.db, batch, "test")).dropped
    shown = fleet.device("fleet-back-0")
    [listed] = shown["refusals"]
    assert (listed["event"], listed["bundle"], listed["reason"]) == (
        "fleet-rolled-back",
        "pump-health 2.0.0",
        "fleet-rollback",
    )
    assert shown["assignment_warning"] is None  # it runs what the fleet sent it back to


def test_installs_start_only_while_the_maintenance_window_is_open(fleet: Fleet) -> None:
    ids = [f"win-{n}" for n in range(4)]
    for device_id in ids:
        fleet.register(device_id, "win-wave")
        fleet.reports(device_id, "1.0.0", C1)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    opens = now + timedelta(hours=6)
    window = f"daily {opens:%H}:00-{(opens + timedelta(hours=1)):%H}:00 UTC"
    status, created = fleet.call(
        "POST", "/rollouts", body=spec("win-wave", window=window, bake="12h")
    )
    assert status == 201, created
    fleet.tick(now)
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["stage"] == 1 and shown["stages"][0]["devices"] >= 1
    assert shown["assigned"] == 0
    assert all(fleet.device(d)["assigned_target"] is None for d in ids)
    fleet.tick(opens.replace(minute=0) + timedelta(minutes=5))  # the window is open
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["assigned"] == shown["stages"][0]["devices"], shown
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200


def local(zone: str, day: date, hour: int, minute: int) -> datetime:
    """The instant a clock in ``zone`` shows ``hour:minute`` on ``day``, in UTC."""
    return datetime.combine(day, dt_time(hour, minute), ZoneInfo(zone)).astimezone(UTC)


def test_each_device_installs_in_the_window_on_its_own_clock(fleet: Fleet) -> None:
    zones = {"tz-tokyo": "Asia/Tokyo", "tz-new-york": "America/New_York", "tz-none": None}
    for device_id, zone in zones.items():
        fleet.register(device_id, "tz-wave", timezone=zone)
        fleet.reports(device_id, "1.0.0", C1)
    assert fleet.device("tz-tokyo")["timezone"] == "Asia/Tokyo"
    assert fleet.device("tz-none")["timezone"] is None
    status, created = fleet.call(
        "POST",
        "/rollouts",
        body=spec("tz-wave", waves="100%", holdback=0, bake="72h",
                  window="daily 02:00-03:00 UTC"),
    )  # fmt: skip
    assert status == 201, created
    day = datetime.now(UTC).date() + timedelta(days=2)
    # 02:30 on each device's own clock (the window's zone, UTC, for the one without a zone).
    opens = sorted(
        (local(zone or "UTC", day, 2, 30), device_id) for device_id, zone in zones.items()
    )
    assigned: list[str] = []
    for at, device_id in opens:
        fleet.tick(at)
        assigned.append(device_id)
        now_assigned = [d for d in zones if fleet.device(d)["assigned_target"] == V2]
        assert sorted(now_assigned) == sorted(assigned), (at, device_id)
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200


def test_a_device_time_zone_is_an_iana_name_or_refused_naming_it(fleet: Fleet) -> None:
    refused = fleet.run(
        "devices", "register", "tz-bad", "--hardware", HARDWARE, "--timezone", "Mars/Olympus"
    )
    assert "Mars/Olympus" in one_line_error(refused) and "timezone" in refused.err
    status, answer = fleet.call(
        "POST", "/devices", body={"device_id": "tz-bad", "hardware_id": HARDWARE,
                                  "timezone": "UTC+2"},
    )  # fmt: skip
    assert status == 422 and "'UTC+2'" in answer["error"] and "timezone" in answer["error"]
    status, token = fleet.call("POST", "/provisioning-tokens", body={"uses": 2})
    assert status == 201, token
    status, enrolled = fleet.call(
        "POST", "/devices/enrol",
        body={"token": token["token"], "device_id": "tz-enrolled", "hardware_id": HARDWARE,
              "timezone": "Europe/Berlin"},
    )  # fmt: skip
    assert status == 201, enrolled
    assert enrolled["device"]["timezone"] == "Europe/Berlin"
    shown = fleet.run("devices", "show", "tz-enrolled")
    assert shown.code == 0 and "Europe/Berlin" in shown.out, shown.err


def test_installs_the_devices_refuse_stop_the_rollout(fleet: Fleet) -> None:
    ids = [f"ref-{n:02d}" for n in range(24)]
    for device_id in ids:
        fleet.register(device_id, "ref-wave")
        fleet.reports(device_id, "1.0.0", C1)
    status, created = fleet.call("POST", "/rollouts", body=spec("ref-wave"))
    assert status == 201, created
    start = datetime.now(UTC)
    fleet.tick(start)
    wave = [d for d in ids if fleet.device(d)["assigned_target"] == V2]
    assert len(wave) >= 3
    for device_id in wave:  # the installer's event, as the agent publishes it
        event = DeviceEvent(
            device_id=device_id,
            message_id=uuid.uuid4().hex,
            sent_at=time.time(),
            event="refused",
            at=time.time(),
            details={"phase": "idle", "bundle": "pump-health 2.0.0", "reason": "self-test"},
        )
        batch = [Accepted(device_id, "events", event)]
        assert not fleet.api.call(write_batch(fleet.api.server.db, batch, "test")).dropped
    fleet.tick(start + timedelta(minutes=5))
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["phase"] == "stopped", shown
    assert "install_failures shows harm" in shown["reason"]
    gate = next(g for g in shown["evaluations"] if g["gate"] == "install_failures")
    assert gate["decision"] == "fail" and gate["n_devices"] == len(wave)
    # Stopped, the devices keep what they have: nothing is sent back.
    assert all(fleet.device(d)["assigned_target"] == V2 for d in wave)
    refused = fleet.call("POST", f"/rollouts/{created['id']}/resume", body={})
    assert refused[0] == 409 and "stopped" in refused[1]["error"]
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200


def test_installs_start_no_faster_than_the_rate(fleet: Fleet) -> None:
    ids = [f"rate-{n:02d}" for n in range(24)]
    for device_id in ids:
        fleet.register(device_id, "rate-wave")
        fleet.reports(device_id, "1.0.0", C1)
    status, created = fleet.call("POST", "/rollouts", body=spec("rate-wave", rate="1/min"))
    assert status == 201, created
    start = datetime.now(UTC)

    def assigned() -> int:
        return int(fleet.call("GET", f"/rollouts/{created['id']}")[1]["assigned"])

    fleet.tick(start)
    assert assigned() == 1
    fleet.tick(start + timedelta(seconds=30))  # the minute's install has started
    assert assigned() == 1
    fleet.tick(start + timedelta(minutes=1))
    assert assigned() == 2
    fleet.tick(start + timedelta(minutes=3))
    assert assigned() == 4
    assert sum(fleet.device(d)["assigned_target"] == V2 for d in ids) == 4
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200


def test_a_stage_reaching_every_device_completes_after_its_bake(fleet: Fleet) -> None:
    ids = [f"all-{n}" for n in range(3)]
    for device_id in ids:
        fleet.register(device_id, "all-wave")
        fleet.reports(device_id, "1.0.0", C1)
    body = spec("all-wave", waves="100%", holdback="0%")
    status, created = fleet.call("POST", "/rollouts", body=body)
    assert status == 201, created
    start = datetime.now(UTC)
    fleet.tick(start)
    assert all(fleet.device(d)["assigned_target"] == V2 for d in ids)
    fleet.tick(start + timedelta(minutes=10))
    assert fleet.call("GET", f"/rollouts/{created['id']}")[1]["phase"] == "baking"
    fleet.tick(start + timedelta(minutes=31))
    status, shown = fleet.call("GET", f"/rollouts/{created['id']}")
    assert shown["phase"] == "completed", shown
    assert shown["decisions"][-1]["action"] == "complete"
    assert fleet.audit("rollout.tick", created["id"])[-1].details["phase"] == "completed"
    # Over: an action on it is refused, naming the phase.
    refused = fleet.call("POST", f"/rollouts/{created['id']}/pause", body={})
    assert refused[0] == 409 and "completed" in refused[1]["error"]


def test_a_device_still_in_its_trial_has_no_install_outcome_yet(fleet: Fleet) -> None:
    ids = [f"trial-{n:02d}" for n in range(12)]
    for device_id in ids:
        fleet.register(device_id, "trial-wave")
        fleet.reports(device_id, "1.0.0", C1)
    status, created = fleet.call("POST", "/rollouts", body=spec("trial-wave"))
    assert status == 201, created
    start = datetime.now(UTC)
    fleet.tick(start)
    wave = [d for d in ids if fleet.device(d)["assigned_target"] == V2]
    assert wave

    def installs(at: datetime) -> int:
        fleet.tick(at)
        shown = fleet.call("GET", f"/rollouts/{created['id']}")[1]
        gate = next(g for g in shown["evaluations"] if g["gate"] == "install_failures")
        return int(gate["n_devices"])

    # Switched to 2.0.0, its watchdog still judging: neither committed nor failed.
    for device_id in wave:
        fleet.reports(device_id, "2.0.0", C2, phase="trial")
    assert installs(start + timedelta(minutes=1)) == 0
    for device_id in wave:
        fleet.reports(device_id, "2.0.0", C2)
    assert installs(start + timedelta(minutes=2)) == len(wave)
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200


# Small waves in a small fleet: the shadow gates judge from few devices here.
SHADOW_GATES = {
    "shadow_errors": {"min_devices": 3, "min_requests": 100},
    "shadow_latency_p95": {"min_devices": 3, "min_requests": 100},
    "shadow_agreement": {"min_devices": 3, "min_requests": 100},
}


def _shadow_rollout(fleet: Fleet, tag: str, **more: Any) -> tuple[str, list[str], datetime]:
    ids = [f"{tag}-{n:02d}" for n in range(24)]
    for device_id in ids:
        fleet.register(device_id, tag)
        fleet.reports(device_id, "1.0.0", C1)
    status, created = fleet.call(
        "POST", "/rollouts", body=spec(tag, shadow="1h", gates=SHADOW_GATES, **more)
    )
    assert status == 201, created
    start = datetime.now(UTC)
    assert fleet.tick(start) >= 1
    return created["id"], ids, start


def test_a_shadow_stage_installs_beside_wave_1_then_wave_1_serves_it(fleet: Fleet) -> None:
    rollout_id, ids, start = _shadow_rollout(fleet, "shw")
    status, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert status == 200 and shown["phase"] == "shadow" and shown["stage"] == 0, shown
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert len(wave) == shown["stages"][0]["devices"] == shown["shadow"]["holding"] >= 3
    assert shown["assigned"] == 0  # nobody serves it yet
    for device_id in wave:
        device = fleet.device(device_id)
        assert device["assigned_target"] is None and device["shadow_rollout"] == rollout_id
        # The signed director metadata lists it marked as a shadow, and nothing else.
        targets = fleet.signed_targets(device_id)
        assert list(targets) == [V2] and targets[V2]["custom"][SHADOW] is True
    assert all(fleet.device(d)["shadow_target"] is None for d in ids if d not in wave)
    assert fleet.audit("assignment.shadow", rollout_id)[0].details["devices"] == wave
    # The shadow gates' settings, readable before any evidence; the device view names it.
    settings = {g["gate"]: g for g in shown["shadow"]["gates"]}
    assert settings["shadow_agreement"]["severity"] == "warn"
    assert settings["shadow_errors"]["min_devices"] == 3
    human = fleet.run("devices", "show", wave[0])
    assert human.code == 0 and f"{V2} (rollout {rollout_id})" in human.out, human.err

    # Windows with shadow sections: within the hour the gates pass but the shadow runs on.
    fleet.events("shadow-installed", *wave, bundle="pump-health 2.0.0")
    for minutes in range(5, 35, 5):
        fleet.shadow_windows(start.timestamp() + 60 * minutes, 0, *wave)
    fleet.seen_at(start + timedelta(minutes=40), *wave)
    fleet.tick(start + timedelta(minutes=40))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "shadow", shown
    gates = {g["gate"]: g for g in shown["evaluations"]}
    assert set(gates) == {
        "shadow_errors", "shadow_latency_p95", "shadow_agreement", "install_failures",
    }  # fmt: skip
    assert gates["shadow_errors"]["decision"] == "pass", gates
    assert gates["shadow_latency_p95"]["decision"] == "pass", gates
    assert gates["shadow_errors"]["n_devices"] == len(wave)
    assert gates["shadow_errors"]["n_requests"] == 6 * 30 * len(wave)
    # The shadow installs, judged by the install gate: every one installed and running.
    installs = gates["install_failures"]
    assert installs["decision"] != "fail" and installs["estimate"] == 0.0, installs
    assert installs["n_devices"] == len(wave)
    status_json = fleet.run("rollout", "status", rollout_id, "--json")
    assert status_json.code == 0 and status_json.json()["phase"] == "shadow"
    human = fleet.run("rollout", "status", rollout_id)
    assert "shadow stage: at least 1h" in human.out and "shadow_latency_p95" in human.out

    # After the hour wave 1 serves it: assigned normally, the shadow cleared, signed so.
    fleet.seen_at(start + timedelta(minutes=60), *wave)
    fleet.tick(start + timedelta(minutes=61))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "baking" and shown["stage"] == 1, shown
    assert shown["decisions"][-1]["action"] == "serve wave 1"
    assert shown["shadow"]["holding"] == 0
    for device_id in wave:
        device = fleet.device(device_id)
        assert device["assigned_target"] == V2 and device["shadow_target"] is None
        targets = fleet.signed_targets(device_id)
        assert list(targets) == [V2] and SHADOW not in targets[V2]["custom"]
    assert fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})[0] == 200


def test_a_shadow_failing_its_gates_is_dropped_from_every_device(fleet: Fleet) -> None:
    rollout_id, ids, start = _shadow_rollout(fleet, "shf", on_failure="rollback")
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert len(wave) >= 3
    fleet.shadow_windows(start.timestamp() + 600, 9, *wave)  # NaN on 30 % of its requests
    fleet.tick(start + timedelta(minutes=15))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "rolling_back", shown
    assert "shadow_errors shows harm" in shown["reason"]
    assert shown["shadow"]["holding"] == 0
    for device_id in wave:
        device = fleet.device(device_id)
        assert device["shadow_target"] is None and device["assigned_target"] is None
        assert fleet.signed_targets(device_id) == {}
    assert fleet.audit("assignment.shadow-drop", rollout_id)[0].details["devices"] == wave
    assert fleet.audit("rollout.tick", rollout_id)[-1].details["action"] == "roll back"


def test_an_abort_in_the_shadow_stage_drops_the_shadows(fleet: Fleet) -> None:
    rollout_id, ids, _ = _shadow_rollout(fleet, "sha")
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert wave
    status, aborted = fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})
    assert status == 200 and aborted["phase"] == "aborted"
    assert all(fleet.device(d)["shadow_target"] is None for d in wave)
    assert all(fleet.signed_targets(d) == {} for d in wave)


def test_a_shadow_stopped_by_its_gates_without_rollback_is_dropped_at_the_stop(
    fleet: Fleet,
) -> None:
    rollout_id, ids, start = _shadow_rollout(fleet, "shs")  # on_failure: pause
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert len(wave) >= 3
    fleet.shadow_windows(start.timestamp() + 600, 9, *wave)  # NaN on 30 % of its requests
    fleet.tick(start + timedelta(minutes=15))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "stopped" and shown["stage"] == 0, shown
    assert "shadow_errors shows harm" in shown["reason"]
    # Stopped, the rollout leads only to an abort: the shadows, serving nothing, go now.
    assert shown["shadow"]["holding"] == 0
    for device_id in wave:
        device = fleet.device(device_id)
        assert device["shadow_target"] is None and device["assigned_target"] is None
        assert fleet.signed_targets(device_id) == {}
    assert fleet.audit("assignment.shadow-drop", rollout_id)[0].details["devices"] == wave
    fleet.tick(start + timedelta(minutes=20))  # stopped: evidence recorded, nothing given back
    assert all(fleet.device(d)["shadow_target"] is None for d in wave)
    assert fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})[0] == 200


def test_shadows_install_only_while_the_window_is_open_and_no_faster_than_the_rate(
    fleet: Fleet,
) -> None:
    for tag in ("shp", "shr"):
        for n in range(24):
            fleet.register(f"{tag}-{n:02d}", tag)
            fleet.reports(f"{tag}-{n:02d}", "1.0.0", C1)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    opens = now + timedelta(hours=6)
    window = f"daily {opens:%H}:00-{(opens + timedelta(hours=1)):%H}:00 UTC"
    status, windowed = fleet.call(
        "POST", "/rollouts", body=spec("shp", shadow="12h", window=window)
    )
    assert status == 201, windowed
    status, paced = fleet.call("POST", "/rollouts", body=spec("shr", shadow="12h", rate="2/min"))
    assert status == 201, paced

    def holding(rollout_id: str) -> int:
        _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
        assert shown["phase"] == "shadow", shown
        return int(shown["shadow"]["holding"])

    fleet.tick(now)
    _, shown = fleet.call("GET", f"/rollouts/{windowed['id']}")
    wave = shown["stages"][0]["devices"]
    assert wave >= 3 and holding(windowed["id"]) == 0  # its window is closed
    assert holding(paced["id"]) == 2  # the ramp's first minute
    fleet.tick(now + timedelta(seconds=30))
    assert holding(paced["id"]) == 2
    fleet.tick(now + timedelta(seconds=61))
    assert holding(paced["id"]) == min(4, wave)
    # Hours on, the paced shadows installed and their devices reporting (a shadow with no
    # outcome that long would be a failed install).
    paced_holders = [f"shr-{n:02d}" for n in range(24)]
    paced_holders = [d for d in paced_holders if fleet.device(d)["shadow_target"] == V2]
    fleet.events("shadow-installed", *paced_holders, bundle="pump-health 2.0.0")
    fleet.seen_at(opens.replace(minute=0), *paced_holders)
    fleet.tick(opens.replace(minute=0) + timedelta(minutes=5))  # the window is open
    assert holding(windowed["id"]) == wave
    for rollout in (windowed, paced):
        holders = [d for d in fleet.call("GET", "/devices")[1]["devices"]
                   if d.get("shadow_rollout") == rollout["id"]]  # fmt: skip
        assert holders and all(d["assigned_target"] is None for d in holders)
        assert fleet.call("POST", f"/rollouts/{rollout['id']}/abort", body={})[0] == 200
        assert all(fleet.device(d["id"])["shadow_target"] is None for d in holders)


def test_a_shadow_refused_on_wave_1_fails_its_installs_and_the_stop_drops_the_shadows(
    fleet: Fleet,
) -> None:
    rollout_id, ids, start = _shadow_rollout(fleet, "shx")
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert len(wave) >= 3
    # Over the bundle's memory budget on every device: refused, so it never runs or reports.
    fleet.events(
        "shadow-refused", *wave, bundle="pump-health 2.0.0", reason="self-test",
        message="memory 900 MB is over the bundle's budget of 256 MB",
    )  # fmt: skip
    fleet.tick(start + timedelta(minutes=5))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    assert shown["phase"] == "stopped" and shown["stage"] == 0, shown
    assert "install_failures shows harm" in shown["reason"]
    gates = {g["gate"]: g for g in shown["evaluations"]}
    assert gates["install_failures"]["decision"] == "fail"
    assert gates["install_failures"]["n_devices"] == len(wave)
    assert gates["install_failures"]["estimate"] == 1.0
    # Absent evidence never passes: the shadow gates lack their requests.
    assert gates["shadow_errors"]["decision"] == "inconclusive"
    # Stopped (on_failure pause) in the shadow stage: the shadows, serving nothing, dropped.
    assert shown["shadow"]["holding"] == 0
    for device_id in wave:
        assert fleet.device(device_id)["shadow_target"] is None
        assert fleet.signed_targets(device_id) == {}
    assert fleet.audit("assignment.shadow-drop", rollout_id)[0].details["devices"] == wave
    # Ticks while stopped give none back; only an abort moves it on.
    fleet.tick(start + timedelta(minutes=10))
    assert all(fleet.device(d)["shadow_target"] is None for d in wave)
    assert fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})[0] == 200


def test_a_shadow_refused_by_one_device_of_many_counts_as_one_failed_install(
    fleet: Fleet,
) -> None:
    rollout_id, ids, start = _shadow_rollout(fleet, "sho")
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == V2]
    assert len(wave) >= 3
    fleet.events("shadow-installed", *wave[1:], bundle="pump-health 2.0.0")
    # A refusal of the director's answer names no bundle; it is this shadow's all the same.
    fleet.events("shadow-refused", wave[0], reason="verification", message="bad signature")
    # Another release's refusal is not this rollout's.
    fleet.events("shadow-refused", wave[1], bundle="pump-health 9.9.9", reason="self-test")
    fleet.shadow_windows(start.timestamp() + 300, 0, *wave[1:])
    fleet.tick(start + timedelta(minutes=6))
    _, shown = fleet.call("GET", f"/rollouts/{rollout_id}")
    gate = next(g for g in shown["evaluations"] if g["gate"] == "install_failures")
    assert (gate["n_devices"], gate["estimate"]) == (len(wave), 1 / len(wave)), gate
    assert shown["phase"] == "shadow", shown
    assert fleet.call("POST", f"/rollouts/{rollout_id}/abort", body={})[0] == 200


def test_a_yanked_release_is_dropped_from_every_device_holding_it_as_a_shadow(
    fleet: Fleet,
) -> None:
    # A release of its own to yank: the old model again, as 7.0.0.
    keys, repo = fleet.tmp / "keys", fleet.tmp / "repo"
    add = ["release", "add", "--re-release-of", "pump-health@1.0.0", "--version", "7.0.0"]
    assert fleet.local(*add, "--repo", str(repo), "--keys", str(keys)).code == 0
    assert fleet.run("release", "push", "--repo", str(repo)).code == 0
    v7 = "pump-health/pump-health-7.0.0.bundle"
    ids = [f"shy-{n:02d}" for n in range(24)]
    for device_id in ids:
        fleet.register(device_id, "shy")
        fleet.reports(device_id, "1.0.0", C1)
    assert fleet.run("assign", "pump-health@1.0.0", "--tag", "shy").code == 0
    status, created = fleet.call(
        "POST", "/rollouts", body=spec("shy", release="pump-health@7.0.0", shadow="1h")
    )
    assert status == 201, created
    start = datetime.now(UTC)
    fleet.tick(start)
    wave = [d for d in ids if fleet.device(d)["shadow_target"] == v7]
    assert len(wave) >= 3
    for device_id in wave:
        targets = fleet.signed_targets(device_id)
        assert sorted(targets) == [V1, v7] and targets[v7]["custom"][SHADOW] is True

    status, yanked = fleet.call(
        "POST", "/releases/yank", body={"release": "pump-health@7.0.0", "reason": "bad bearings"}
    )
    assert status == 200, yanked
    # Dropped from every holder, signed so; each keeps its assignment.
    for device_id in ids:
        device = fleet.device(device_id)
        assert device["shadow_target"] is None and device["assigned_target"] == V1
        targets = fleet.signed_targets(device_id)
        assert list(targets) == [V1] and SHADOW not in targets[V1]["custom"]
    [entry] = fleet.audit("release.yank", v7)
    assert entry.details["shadows_dropped"] == wave
    # The rollout's next ticks give the yanked release to nobody again.
    fleet.tick(start + timedelta(minutes=5))
    assert all(fleet.device(d)["shadow_target"] is None for d in ids)
    assert all(list(fleet.signed_targets(d)) == [V1] for d in wave)
    assert fleet.call("POST", f"/rollouts/{created['id']}/abort", body={})[0] == 200
