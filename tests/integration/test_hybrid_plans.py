"""Hybrid plans against a real server (SQLite and PostgreSQL): windows folded into the hourly
hybrid stats by the server's own ingest, the planning step and each thing that makes it plan
again, plans signed into director metadata that python-tuf verifies as a device would, the
REST API over HTTP with its roles, and ``fleetctl plan``, ``cloud capacity``, ``devices set``.

The planning step is called with an injected ``now`` (the clock is the one thing not real).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import urllib3
from sqlalchemy import select
from tuf.ngclient import Updater
from tuf.ngclient._internal.proxy import ProxyEnvironment
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from agent.ota.director_client import DirectorClient
from agent.ota.transport import FetchConfig
from fleet_server.db.models import AlertRow, AuditEntry, CloudSettings, DeviceHybridStats
from fleet_server.fleetctl import main
from fleet_server.hybrid.service import PlanRun
from fleet_server.jobs import Job, run_jobs
from fleet_server.mqtt.ingest import Accepted, classify, write_batch
from fleet_server.server import FleetServer
from protocol.director_marks import HYBRID_PLAN
from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridPlan, HybridSummary, PlanMode
from protocol.messages import BundleRef, ReportedState
from protocol.summary import score_histogram
from protocol.topics import windows_topic
from protocol.versioning import default_release_counter
from protocol.window import WindowSummary, encode_window
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Fleetctl, one_line_error

pytestmark = pytest.mark.integration

CLASSES = ["normal", "imbalance", "bearing_wear", "overheating"]
NS = "hybrid-plans"
TTL = timedelta(minutes=10)


class DeviceFetcher(Urllib3Fetcher):
    """python-tuf's own fetcher, sending the device's HTTP Basic credentials as an agent does."""

    def __init__(self, device_id: str, password: str) -> None:
        super().__init__()
        self._proxy_env = ProxyEnvironment(
            headers=urllib3.util.make_headers(
                basic_auth=f"{device_id}:{password}", user_agent="edge-agent test"
            )
        )


class Fleet(Fleetctl):
    """``fleetctl``, the REST API and the planning step of a server with releases 1.0.0, 2.0.0."""

    clock: datetime
    passwords: dict[str, str]

    def register(self, device_id: str, *, version: str = "2.0.0") -> None:
        done = self.run("devices", "register", device_id, "--hardware", HARDWARE, "--json")
        assert done.code == 0, done.err
        self.passwords[device_id] = done.json()["password"]
        ref = BundleRef(
            name="pump-health", version=version, release_counter=default_release_counter(version)
        )
        state = ReportedState(
            device_id=device_id,
            message_id=uuid.uuid4().hex,
            sent_at=time.time(),
            agent_version="0.1.0",
            hardware_id=HARDWARE,
            active=ref,
            installed_counter=ref.release_counter,
            phase="idle",
        )
        self.ingest([Accepted(device_id, "state", state)])

    def ingest(self, batch: list[Accepted]) -> None:
        result = self.api.call(write_batch(self.api.server.db, batch, "test"))
        assert not result.dropped, result.dropped

    def window(
        self,
        device_id: str,
        *,
        requests: int = 120,
        seconds: float = 60.0,
        hybrid: HybridSummary | None = None,
        resend: WindowSummary | None = None,
    ) -> WindowSummary:
        """A window of the device ending at the clock, encoded as the agent sends it, through
        the server's own ingest gate and batch writer."""
        rng = np.random.default_rng(len(device_id) + requests)
        end = self.clock.timestamp()
        w = resend or WindowSummary(
            window_id=uuid.uuid4().hex,
            device_id=device_id,
            model_name="pump-health",
            model_version="2.0.0",
            baseline_id="b1",
            start=end - seconds,
            end=end,
            requests=requests,
            served={"active": requests},
            features=[],
            scores=score_histogram(rng.dirichlet([0.6] * 4, size=requests), CLASSES),
            latency_ms=record(ExponentialHistogram(), rng.lognormal(3.0, 0.3, size=requests)),
            hybrid=hybrid,
        )
        verdict = classify(windows_topic(NS, device_id), encode_window(w), 65536, namespace=NS)
        assert isinstance(verdict, Accepted) and verdict.message == w, verdict
        self.ingest([verdict])
        return w

    def step(self, forced: tuple[str, ...] = ()) -> PlanRun | None:
        server = self.api.server
        return self.api.call(server.plans.step(server.db, self.clock, forced=forced))

    def settle(self) -> None:
        """Step until nothing calls for a re-plan."""
        for _ in range(5):
            if self.step() is None:
                return
        raise AssertionError("the planner never settled")

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        answer = self.api.request(
            method, f"/api/v1{path}", token=token or self.api.admin_token, json=body
        )
        return answer.status, answer.json() if answer.data else None

    def plan(self, device_id: str) -> dict[str, Any]:
        status, shown = self.call("GET", f"/plans/{device_id}")
        assert status == 200, shown
        return dict(shown)

    def token(self, role: str) -> str:
        created = self.run("tokens", "create", "--name", f"h-{role}", "--role", role, "--json")
        assert created.code == 0, created.err
        return str(created.json()["token"])

    def audit(self, action: str) -> list[AuditEntry]:
        async def read() -> list[AuditEntry]:
            async with self.api.server.db.session() as session:
                query = select(AuditEntry).where(AuditEntry.action == action)
                return list((await session.scalars(query.order_by(AuditEntry.seq))).all())

        return self.api.call(read())

    def signed_targets(self, device_id: str) -> dict[str, Any]:
        director = self.api.server.assignments.director
        signed = director.device(device_id).signed()
        metadata = director.device(device_id).path / "metadata"
        document = json.loads((metadata / f"{signed.version}.targets.json").read_text())
        return dict(document["signed"]["targets"])

    def verified_plan(self, device_id: str, tmp: Path) -> HybridPlan | None:
        """The device's plan as a device reads it: python-tuf refreshes its director metadata
        over HTTP (HTTP Basic, its own credentials) from the director root, and the plan's
        canonical JSON is checked against the target's length and sha256."""
        folder = tmp / f"tuf-{device_id}-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        root = self.api.server.assignments.director.trusted_root_path
        (folder / "root.json").write_bytes(root.read_bytes())
        fetcher = DeviceFetcher(device_id, self.passwords[device_id])
        updater = Updater(
            metadata_dir=str(folder),
            metadata_base_url=f"{self.api.url}/director/devices/{device_id}/metadata/",
            target_base_url=f"{self.api.url}/unused/",
            fetcher=fetcher,
            bootstrap=None,  # the trusted root is the one in the folder, as on a device
        )
        updater.refresh()
        targets = json.loads((folder / "targets.json").read_text())["signed"]["targets"]
        plans = [p for p, t in targets.items() if HYBRID_PLAN in t.get("custom", {})]
        assert len(plans) <= 1, plans
        if not plans:
            return None
        info = updater.get_targetinfo(plans[0])
        assert info is not None
        plan = HybridPlan.model_validate_json(info.custom[HYBRID_PLAN])
        data = plan.canonical_json()
        info.verify_length_and_hashes(data)
        assert info.hashes == {"sha256": hashlib.sha256(data).hexdigest()}
        assert set(info.custom) == {HYBRID_PLAN}
        assert plans[0] == f"hybrid-plan/{plan.plan_id}.json"
        # And the agent's own director client follows it, refusing nothing.
        agent_dir = folder / "agent"
        agent_dir.mkdir()
        (agent_dir / "root.json").write_bytes(root.read_bytes())
        client = DirectorClient(
            agent_dir,
            f"{self.api.url}/director",
            device_id,
            FetchConfig(auth=(device_id, self.passwords[device_id])),
        )
        listing = client.plan(now=plan.issued_at)
        assert listing.plan_refusal is None and listing.plan == plan
        return plan


@pytest.fixture(scope="module", params=DATABASES)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"hybrid-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(
            tmp / "server", url, hybrid_plan_ttl_s=TTL.total_seconds(), hybrid_cloud_model="big"
        )
        try:
            fleet = Fleet(api, tmp)
            fleet.clock = datetime.now(UTC).replace(microsecond=0)
            fleet.passwords = {}
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
    served.clock += timedelta(seconds=30)
    if served.passwords and _has_capacity(served):
        served.settle()  # what an earlier test left to re-plan is planned first
    return served


def _has_capacity(fleet: Fleet) -> bool:
    status, shown = fleet.call("GET", "/cloud/capacity")
    return status == 200 and shown["source"] == "operator"


def hybrid(
    plan_id: str, *, escalated: int = 0, local: int, mode: PlanMode = "escalate", **more: Any
) -> HybridSummary:
    confidence = [0] * CONFIDENCE_BINS
    confidence[5] = escalated
    confidence[45] = local
    return HybridSummary(
        plan_id=plan_id,
        mode=mode,
        local=local,
        escalated=escalated,
        cloud_answered=more.pop("cloud_answered", escalated),
        cloud_latency_ms=record(ExponentialHistogram(), np.full(max(escalated, 1), 50.0)),
        confidence=confidence,
        **more,
    )


def stats(fleet: Fleet, device_id: str) -> list[DeviceHybridStats]:
    async def read() -> list[DeviceHybridStats]:
        async with fleet.api.server.db.session() as session:
            query = select(DeviceHybridStats).where(DeviceHybridStats.device_id == device_id)
            return list((await session.scalars(query.order_by(DeviceHybridStats.plan_id))).all())

    return fleet.api.call(read())


# -- ingest ---------------------------------------------------------------------------------


def test_windows_fold_into_hourly_hybrid_stats_once_however_often_sent(fleet: Fleet) -> None:
    fleet.register("stats-1")
    w = fleet.window("stats-1", requests=120, seconds=60)
    fleet.window("stats-1", resend=w)  # delivered twice: counted once
    fleet.window(
        "stats-1",
        hybrid=hybrid(
            "p-aaaaaaaaaaaa",
            escalated=20,
            local=100,
            audits=3,
            audit_compared=3,
            audit_agreements=2,
            audit_confidence_sum=2.7,
            cloud_errors={"timeout": 2},
            cloud_answered=18,
        ),
    )
    rows = {r.plan_id: r for r in stats(fleet, "stats-1")}
    assert set(rows) == {"", "p-aaaaaaaaaaaa"}
    plain, planned = rows[""], rows["p-aaaaaaaaaaaa"]
    assert (plain.windows, plain.requests, plain.seconds) == (1, 120, 60.0)
    assert plain.score_classes == 4 and sum(plain.scores) == 120 and sum(plain.confidence) == 0
    assert (planned.escalated, planned.cloud_answered, planned.audits) == (20, 18, 3)
    assert planned.cloud_errors == {"timeout": 2} and planned.audit_confidence_sum == 2.7
    assert sum(planned.confidence) == 120 and sum(c for _, c in planned.cloud_latency) == 20


# -- planning -------------------------------------------------------------------------------


def test_without_a_capacity_nothing_is_planned_or_signed(fleet: Fleet) -> None:
    fleet.register("quiet-1")
    fleet.window("quiet-1")
    assert fleet.step() is None
    status, listed = fleet.call("GET", "/plans")
    assert status == 200 and listed["plans"] == []
    assert fleet.verified_plan("quiet-1", fleet.tmp) is None
    status, shown = fleet.call("GET", "/plans/quiet-1")
    assert status == 404 and "no hybrid plan" in shown["error"]


def test_setting_the_capacity_plans_every_device_signed_for_it(fleet: Fleet) -> None:
    for d in ("plan-1", "plan-2", "plan-3"):
        fleet.register(d)
        fleet.window(d, requests=600)  # 10 requests a second each
    viewer = fleet.token("viewer")
    status, refused = fleet.call("PUT", "/cloud/capacity", viewer, {"capacity": 6})
    assert status == 403, refused
    status, refused = fleet.call("PUT", "/cloud/capacity", None, {"capacity": -1})
    assert status == 422 and "capacity" in refused["error"]
    status, capacity = fleet.call("PUT", "/cloud/capacity", None, {"capacity": 6, "headroom": 0.5})
    assert status == 200, capacity
    assert capacity["capacity"] == 6 and capacity["headroom"] == 0.5
    assert capacity["source"] == "operator" and capacity["updated_by"]
    assert fleet.call("GET", "/cloud/capacity", viewer)[1] == capacity
    status, listed = fleet.call("GET", "/plans", viewer)
    assert status == 200
    plans = {p["device_id"]: p for p in listed["plans"]}
    assert {"plan-1", "plan-2", "plan-3"} <= set(plans)
    for d in ("plan-1", "plan-2", "plan-3"):
        p = plans[d]
        assert p["plan_id"].startswith("p-") and len(p["plan_id"]) == 14
        assert p["mode"] == "escalate" and 0 < p["tau"] <= 1
        assert p["share"] == pytest.approx(p["inputs"]["share"]) and p["share"] > 0
        assert p["inputs"]["capacity"] == 6 and p["inputs"]["headroom"] == 0.5
        assert p["inputs"]["rate"] == pytest.approx(10.0)
        assert p["inputs"]["confidence_source"] == "scores"
        assert p["inputs"]["temperature_from"] == "pump-health 2.0.0"
        assert "capacity set to 6/s" in " ".join(p["issued_for"])
        assert p["plan"]["cloud_model"] == "big"
        issued = datetime.fromisoformat(p["plan"]["issued_at"])
        assert datetime.fromisoformat(p["plan"]["expires_at"]) - issued == TTL
        verified = fleet.verified_plan(d, fleet.tmp)
        assert verified is not None and verified.plan_id == p["plan_id"]
        assert verified.device_id == d
    # The weighted max-min split hands out at most C(1 - headroom).
    assert sum(p["share"] for p in plans.values()) <= 3.0 + 1e-9
    assert [e.details["capacity"] for e in fleet.audit("cloud.capacity")][-1] == 6
    last = fleet.audit("hybrid.plan")[-1]
    assert last.actor == "hybrid-planner" and "capacity set to 6/s" in last.details["reasons"][0]
    # One device reads only its own plan.
    other = fleet.api.request(
        "GET",
        "/director/devices/plan-2/metadata/timestamp.json",
        headers=urllib3.util.make_headers(basic_auth=f"plan-1:{fleet.passwords['plan-1']}"),
    )
    assert other.status == 403


def test_an_assignment_signed_after_the_plan_keeps_the_plan_target(fleet: Fleet) -> None:
    before = fleet.plan("plan-1")
    done = fleet.run("assign", "pump-health@2.0.0", "--device", "plan-1", "--json")
    assert done.code == 0, done.err
    targets = fleet.signed_targets("plan-1")
    assert any(p.endswith("pump-health-2.0.0.bundle") for p in targets)
    assert f"hybrid-plan/{before['plan_id']}.json" in targets
    verified = fleet.verified_plan("plan-1", fleet.tmp)
    assert verified is not None and verified.plan_id == before["plan_id"]


def test_plans_near_expiry_are_renewed_and_keep_their_stats(fleet: Fleet) -> None:
    before = fleet.plan("plan-2")
    fleet.clock = datetime.fromisoformat(before["expires_at"]) - timedelta(minutes=1)
    run = fleet.step()
    assert run is not None and "plan-2" in run.issued
    after = fleet.plan("plan-2")
    assert after["plan_id"] != before["plan_id"]
    assert any("plan expires" in r for r in after["issued_for"])
    assert before["plan_id"] in after["inputs"]["continues"]
    assert fleet.verified_plan("plan-2", fleet.tmp).plan_id == after["plan_id"]  # type: ignore[union-attr]
    fleet.settle()


def test_observed_offload_outside_its_interval_re_plans_the_device(fleet: Fleet) -> None:
    p = fleet.plan("plan-3")
    expected = p["expected_offload"]
    assert expected is not None
    # Far from what was expected: every request escalated, or none.
    escalated = 0 if expected > 0.5 else 120
    fleet.window(
        "plan-3",
        hybrid=hybrid(p["plan_id"], escalated=escalated, local=120 - escalated, cloud_answered=0),
    )
    shown = fleet.plan("plan-3")
    interval = shown["observed"]["interval"]
    assert shown["observed"]["requests"] == 120 and shown["observed"]["offloaded"] == escalated
    assert not interval["low"] <= expected <= interval["high"]
    run = fleet.step()
    assert run is not None and "plan-3" in run.issued
    assert any("observed offload" in r for r in run.device_reasons["plan-3"])
    again = fleet.plan("plan-3")
    assert again["plan_id"] != p["plan_id"]
    assert any("observed offload" in r for r in again["issued_for"])
    assert again["observed"]["requests"] == 0  # the new plan is watched afresh
    fleet.settle()


def test_audit_agreement_below_what_calibration_promised_re_plans(fleet: Fleet) -> None:
    p = fleet.plan("plan-3")
    share = p["expected_offload"]
    escalated = round(120 * share)
    fleet.window(
        "plan-3",
        hybrid=hybrid(
            p["plan_id"],
            escalated=escalated,
            local=120 - escalated,
            audits=40,
            audit_compared=40,
            audit_agreements=10,
            audit_confidence_sum=38.0,
        ),
        requests=120,
    )
    shown = fleet.plan("plan-3")
    assert shown["observed"]["audit_agreement"] == 0.25
    assert shown["observed"]["agreement_promised"] == 0.95
    run = fleet.step()
    assert run is not None
    assert any("calibration promised" in r for r in run.device_reasons["plan-3"])
    fleet.settle()


def test_endpoint_load_above_the_capacity_re_plans_the_fleet(fleet: Fleet) -> None:
    p = fleet.plan("plan-1")
    # 600 cloud answers in a minute: 10 a second against a capacity of 6.
    fleet.window(
        "plan-1",
        requests=600,
        hybrid=hybrid(p["plan_id"], escalated=600, local=0, cloud_answered=600),
    )
    run = fleet.step()
    assert run is not None
    assert any("endpoint load" in r and "exceeds the capacity 6.00/s" in r for r in run.reasons)
    assert any("against its quota" in r for r in run.device_reasons["plan-1"])
    assert fleet.plan("plan-1")["plan_id"] != p["plan_id"]  # watched afresh
    assert fleet.step() is None  # the same windows do not call for it again


def test_drift_flagged_for_a_device_re_plans_it_once(fleet: Fleet) -> None:
    async def open_alert() -> int:
        async with fleet.api.server.db.session() as session:
            row = AlertRow(
                kind="drift",
                scope="device",
                scope_value="plan-2",
                model_name="pump-health",
                model_version="2.0.0",
                state="open",
                open_key=f"test-{uuid.uuid4().hex}",
                opened_at=fleet.clock,
                last_seen_at=fleet.clock,
                evidence={},
            )
            session.add(row)
            await session.flush()
            return row.id

    alert = fleet.api.call(open_alert())
    run = fleet.step()
    assert run is not None
    assert any(f"drift flagged (alert {alert})" in r for r in run.device_reasons["plan-2"])
    assert alert in fleet.plan("plan-2")["inputs"]["drift_alerts"]
    fleet.settle()  # planned with the alert: it does not re-plan again


def test_a_capacity_changed_elsewhere_re_plans_and_a_cut_shrinks_shares(fleet: Fleet) -> None:
    before = sum(p["share"] for p in fleet.call("GET", "/plans")[1]["plans"])

    async def halve() -> None:  # another replica's operator
        async with fleet.api.server.db.session() as session:
            row = await session.get(CloudSettings, 1)
            assert row is not None
            row.capacity = 3.0

    fleet.api.call(halve())
    run = fleet.step()
    assert run is not None and "capacity changed from 6.0 to 3.0" in run.reasons
    after = sum(p["share"] for p in fleet.call("GET", "/plans")[1]["plans"])
    assert after <= 1.5 + 1e-9 and after < before
    fleet.settle()


def test_a_device_joining_is_planned(fleet: Fleet) -> None:
    fleet.register("joiner-1")
    fleet.window("joiner-1")
    run = fleet.step()
    assert run is not None and "joiner-1" in run.issued
    assert any("joined: joiner-1" in r for r in run.reasons)
    assert fleet.verified_plan("joiner-1", fleet.tmp) is not None


def test_a_device_planned_before_it_served_any_request_is_planned_again_once_it_does(
    fleet: Fleet,
) -> None:
    fleet.register("starter-1")
    run = fleet.step()
    assert run is not None and "starter-1" in run.issued
    first = fleet.plan("starter-1")
    assert first["mode"] == "local" and first["inputs"]["planner_reason"] == "no_requests"
    quiet = fleet.step()
    assert quiet is None or "starter-1" not in quiet.issued  # nothing new to plan it for yet
    # It starts serving: its windows under the local plan show requests.
    fleet.window("starter-1", hybrid=hybrid(first["plan_id"], mode="local", local=120))
    run = fleet.step()
    assert run is not None and "starter-1" in run.issued
    assert any("requests seen since" in r for r in run.device_reasons["starter-1"])
    again = fleet.plan("starter-1")
    assert again["plan_id"] != first["plan_id"] and again["mode"] == "escalate"
    fleet.settle()


def test_an_opted_out_device_is_local_only_and_weight_is_settable(fleet: Fleet) -> None:
    done = fleet.run("devices", "set", "plan-2", "--offload-opt-out", "--json")
    assert done.code == 0, done.err
    assert done.json() == {"device_id": "plan-2", "weight": 1.0, "offload_opt_out": True}
    shown = fleet.plan("plan-2")
    assert shown["mode"] == "local" and shown["quota_rate"] == 0 and shown["share"] == 0
    assert shown["why"] == "the device opted out of offloading: local only"
    verified = fleet.verified_plan("plan-2", fleet.tmp)
    assert verified is not None and verified.mode == "local"
    done = fleet.run("devices", "set", "plan-1", "--weight", "3", "--no-offload-opt-out")
    assert done.code == 0 and "weight 3" in done.out
    assert fleet.plan("plan-1")["inputs"]["weight"] == 3.0
    assert one_line_error(fleet.run("devices", "set", "plan-1")).startswith("fleetctl: give")
    refused = fleet.run("devices", "set", "nobody", "--weight", "2")
    assert "404" in one_line_error(refused)
    status, _ = fleet.call("PATCH", "/devices/plan-1/hybrid", fleet.token("viewer"), {"weight": 2})
    assert status == 403
    assert fleet.audit("device.hybrid")[-1].subject == "plan-1"


def test_a_decommissioned_devices_plan_is_removed_from_its_metadata(fleet: Fleet) -> None:
    fleet.register("leaver-1")
    fleet.window("leaver-1")
    fleet.settle()
    assert fleet.verified_plan("leaver-1", fleet.tmp) is not None
    done = fleet.run("devices", "decommission", "leaver-1", "--reason", "gone")
    assert done.code == 0, done.err
    run = fleet.step()
    assert run is not None and run.dropped == ["leaver-1"]
    assert any("left: leaver-1" in r for r in run.reasons)
    assert fleet.call("GET", "/plans/leaver-1")[0] == 404
    assert not any(p.startswith("hybrid-plan/") for p in fleet.signed_targets("leaver-1"))


def test_fleetctl_plan_and_cloud_commands(fleet: Fleet) -> None:
    shown = fleet.run("plan", "show", "plan-3")
    assert shown.code == 0, shown.err
    for words in ("plan-3: plan p-", "expected offload", "observed offload", "tau", "why:"):
        assert words in shown.out
    as_json = fleet.run("plan", "show", "plan-3", "--json").json()
    assert as_json["device_id"] == "plan-3" and "inputs" in as_json
    listed = fleet.run("plan", "list", "--json").json()
    assert "plan-3" in {p["device_id"] for p in listed["plans"]}
    one = fleet.run("plan", "list", "--device", "plan-3", "--json").json()
    assert [p["device_id"] for p in one["plans"]] == ["plan-3"]
    table = fleet.run("plan", "list")
    assert table.code == 0 and table.out.startswith("DEVICE")
    capacity = fleet.run("cloud", "capacity", "--json").json()
    assert capacity["source"] == "operator"
    done = fleet.run("cloud", "capacity", "8", "--headroom", "0.25")
    assert done.code == 0 and "8 requests/s, headroom 25.0%" in done.out
    assert fleet.plan("plan-3")["inputs"]["capacity"] == 8
    assert "404" in one_line_error(fleet.run("plan", "show", "nobody"))
    assert one_line_error(fleet.run("cloud", "capacity", "--headroom", "0.2"))


def test_the_planning_job_plans_a_device_that_joins_on_its_own(
    served: Fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    served.capsys = capsys
    server = served.api.server
    config = server.config.model_copy(update={"hybrid_interval_s": 0.2})
    jobs = [j for j in FleetServer(config).jobs() if j.name == "hybrid planning"]
    assert len(jobs) == 1 and jobs[0].interval_s == 0.2
    job = Job("hybrid planning", 0.2, lambda: server.plans.step(server.db))
    stop = asyncio.Event()
    running = asyncio.run_coroutine_threadsafe(run_jobs([job], stop), served.api.loop)
    try:
        served.register("by-job-1")
        served.window("by-job-1")
        deadline = time.monotonic() + 60
        while served.call("GET", "/plans/by-job-1")[0] != 200:
            assert time.monotonic() < deadline, "the planning job never planned by-job-1"
            time.sleep(0.2)
    finally:
        served.api.loop.call_soon_threadsafe(stop.set)
        running.result(30)
    assert any("joined: by-job-1" in r for r in served.plan("by-job-1")["issued_for"])
