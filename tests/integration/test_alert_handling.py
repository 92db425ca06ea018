"""Grouped alerts, their filters, acknowledgements and silences, over the REST API and fleetctl."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.db.models import AlertRow
from fleet_server.drift import Scope, drift_of, evaluate_alerts
from fleet_server.drift.silences import active_silences
from fleet_server.drift.store import load_open_alerts
from fleet_server.fleetctl import main
from fleet_server.release.keys import KeyStore
from tests.support.databases import DATABASES
from tests.support.drift_fleet import HOUR, DriftFleet, drift_fleet, listed_tests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=DATABASES)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[DriftFleet]:
    yield from drift_fleet(request, tmp_path_factory, session_keys, bundles)


class Notified:
    """The alert changes a pass hands to the notifier."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, int]] = []

    def __call__(self, change: str, row: AlertRow) -> None:
        self.changes.append((change, row.id))


def shifted(fleet: DriftFleet, n: int, seed: int, features: range) -> npt.NDArray[np.float64]:
    data = fleet.in_distribution(n, seed)
    for j in features:
        data[:, j] += 2.0 * fleet.rows[:, j].std()
    return data


def device_alert(fleet: DriftFleet, device_id: str, kind: str = "drift") -> AlertRow:
    """The device's newest alert of ``kind``."""
    return fleet.alerts(device_id, kind)[-1]


def audit_entries(fleet: DriftFleet, action: str) -> list[dict[str, Any]]:
    status, page = fleet.get("/audit", action=action, limit=1000)
    assert status == 200, page
    entries: list[dict[str, Any]] = page["entries"]
    return entries


def test_many_drifting_features_open_one_alert_per_scope_with_one_log_line_each(
    fleet: DriftFleet, caplog: pytest.LogCaptureFixture
) -> None:
    t0 = datetime(2032, 1, 1, 12, tzinfo=UTC)
    fleet.register("many-1", "many-tag")
    fleet.upload("many-1", shifted(fleet, 1000, seed=101, features=range(4)), t0)
    caplog.set_level(logging.INFO, logger="fleet_server.drift.service")
    evaluation = fleet.run_pass(t0)
    opened = [row for change, row in evaluation.changes if change == "opened"]
    scopes = [(row.scope, row.scope_value) for row in opened if row.kind == "drift"]
    assert len(scopes) == len(set(scopes))  # one per scope and model version
    assert ("device", "many-1") in scopes and ("tag", "many-tag") in scopes
    alert = device_alert(fleet, "many-1")
    names = [f.name for f in fleet.manifest.features[:4]]
    assert set(names) <= set(listed_tests(alert)) and alert.state == "open"
    # One line per alert opened (not per feature), naming the alert's features.
    lines = [r.getMessage() for r in caplog.records if " opened: " in r.getMessage()]
    assert len(lines) == len(opened)
    (line,) = [x for x in lines if "device:many-1 " in x]
    assert line.startswith(f"drift alert {alert.id} opened: device:many-1 pump-health@1.0.0")
    assert all(name in line for name in names)
    # The gauges count grouped alerts, and the features of the open fleet-wide one.
    gauges = {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(
            fleet.api.request("GET", "/metrics").data.decode()
        )
        for s in family.samples
    }
    status, listed = fleet.get("/alerts", state="open", kind="drift", limit=1000)
    assert status == 200, listed
    assert gauges["edgefleet_drift_alerts_open[]"] == len(listed["alerts"])
    (fleet_wide,) = [a for a in listed["alerts"] if a["scope"] == "fleet"]
    key = "edgefleet_drift_features_drifting[('model', 'pump-health'), ('version', '1.0.0')]"
    assert gauges[key] == len(fleet_wide["features"]) >= 4

    # Only the first feature still drifts: the same alert stays open with that feature alone.
    caplog.clear()
    t1 = t0 + 2 * HOUR
    fleet.upload("many-1", shifted(fleet, 1000, seed=102, features=range(1)), t1)
    fleet.run_pass(t1)
    again = device_alert(fleet, "many-1")
    assert again.id == alert.id and again.state == "open"
    assert list(listed_tests(again)) == [names[0]]
    assert not [r for r in caplog.records if "device:many-1 " in r.getMessage()]

    # Nothing drifts any more: it closes, with one line.
    t2 = t0 + 4 * HOUR
    fleet.upload("many-1", fleet.in_distribution(1000, seed=103), t2)
    fleet.run_pass(t2)
    closed = device_alert(fleet, "many-1")
    assert closed.id == alert.id and closed.state == "closed"
    lines = [r.getMessage() for r in caplog.records if "device:many-1 " in r.getMessage()]
    assert lines == [
        f"drift alert {alert.id} closed: device:many-1 pump-health@1.0.0, "
        f"features {names[0]} (distribution, new-range)"
    ]


def test_alerts_are_filtered_by_kind_scope_device_model_and_state(fleet: DriftFleet) -> None:
    t0 = datetime(2032, 2, 1, 12, tzinfo=UTC)
    fleet.register("filter-1", "filter-tag")
    fleet.register("filter-2")
    fleet.upload("filter-1", shifted(fleet, 1000, seed=111, features=range(1)), t0)
    fleet.upload("filter-2", shifted(fleet, 1000, seed=112, features=range(2, 3)), t0)
    fleet.run_pass(t0)

    def listed(**params: Any) -> list[dict[str, Any]]:
        status, body = fleet.get("/alerts", **params)
        assert status == 200, (params, body)
        alerts: list[dict[str, Any]] = body["alerts"]
        return alerts

    (mine,) = listed(device="filter-1")
    assert (mine["scope"], mine["scope_value"], mine["kind"]) == ("device", "filter-1", "drift")
    assert listed(scope="device:filter-1") == [mine]
    assert listed(device="filter-1", kind="accuracy") == []
    assert listed(device="filter-1", state="closed") == []
    assert listed(device="filter-1", version="1.0.0", model="pump-health") == [mine]
    assert listed(device="filter-1", version="9.9.9") == []
    (cohort,) = listed(scope="tag:filter-tag")
    assert cohort["scope"] == "tag" and cohort["scope_value"] == "filter-tag"
    tags = listed(scope="tag")
    assert tags and {a["scope"] for a in tags} == {"tag"}
    devices = {a["scope_value"] for a in listed(scope="device", state="open")}
    assert {"filter-1", "filter-2"} <= devices
    assert all(a["scope"] == "fleet" for a in listed(scope="fleet"))
    for bad in ({"scope": "planet:mars"}, {"scope": "fleet:x"}, {"state": "snoozed"}):
        status, body = fleet.get("/alerts", **bad)
        assert status == 422 and "query" in body["error"], (bad, body)


def test_an_acknowledged_alert_is_not_notified_and_still_closes(fleet: DriftFleet) -> None:
    t0 = datetime(2032, 3, 1, 12, tzinfo=UTC)
    fleet.register("ack-1")
    fleet.upload("ack-1", shifted(fleet, 1000, seed=121, features=range(1)), t0)
    notified = Notified()
    fleet.run_pass(t0, notified)
    alert = device_alert(fleet, "ack-1")
    assert ("opened", alert.id) in notified.changes

    viewer = fleet.token("ack-viewer", "viewer")
    operator = fleet.token("ack-operator", "operator")
    status, body = fleet.send("POST", f"/alerts/{alert.id}/ack", {}, token=viewer)
    assert status == 403, body
    assert fleet.send("GET", f"/alerts/{alert.id}", token=viewer)[0] == 200

    status, acked = fleet.send(
        "POST", f"/alerts/{alert.id}/ack", {"comment": "pump swap at 14:00"}, token=operator
    )
    assert status == 200, acked
    assert acked["acknowledged"]["comment"] == "pump swap at 14:00"
    assert acked["acknowledged"]["by"] and acked["state"] == "open"
    status, again = fleet.send("POST", f"/alerts/{alert.id}/ack", {}, token=operator)
    assert status == 409 and "already acknowledged" in again["error"]
    (entry,) = [
        e for e in audit_entries(fleet, "alert.acknowledge") if e["subject"] == str(alert.id)
    ]
    assert entry["details"]["comment"] == "pump swap at 14:00"
    assert entry["details"]["scope_value"] == "ack-1"
    status, listed = fleet.get("/alerts", state="acknowledged", device="ack-1")
    assert [a["id"] for a in listed["alerts"]] == [alert.id]
    status, listed = fleet.get("/alerts", state="open", device="ack-1")
    assert [a["id"] for a in listed["alerts"]] == [alert.id]

    # The drift clears: the acknowledged alert closes, and its closing is not notified.
    t1 = t0 + 2 * HOUR
    fleet.upload("ack-1", fleet.in_distribution(1000, seed=122), t1)
    notified = Notified()
    fleet.run_pass(t1, notified)
    assert device_alert(fleet, "ack-1").state == "closed"
    assert all(alert_id != alert.id for _, alert_id in notified.changes)
    status, body = fleet.send("POST", f"/alerts/{alert.id}/ack", {}, token=operator)
    assert status == 409 and f"alert {alert.id} is closed" in body["error"]
    assert fleet.send("POST", "/alerts/99999999/ack", {})[0] == 404
    assert fleet.send("POST", "/alerts/abc/ack", {})[0] == 404


def test_a_silence_withholds_notifications_of_the_alerts_it_matches_until_it_ends(
    fleet: DriftFleet,
) -> None:
    t0 = datetime(2032, 4, 1, 12, tzinfo=UTC)
    fleet.register("silenced-1")
    fleet.register("loud-1")
    operator = fleet.token("silence-operator", "operator")
    viewer = fleet.token("silence-viewer", "viewer")
    request = {
        "scope": "device",
        "scope_value": "silenced-1",
        "duration_s": 7200,
        "reason": "maintenance",
    }
    assert fleet.send("POST", "/silences", request, token=viewer)[0] == 403
    for bad, named in (
        ({k: v for k, v in request.items() if k != "reason"}, "reason"),
        ({"duration_s": 60, "reason": "x"}, "give alert_id or scope"),
        (request | {"alert_id": 1}, "alert_id alone"),
        (request | {"duration_s": 0}, "duration_s"),
        (request | {"scope": "fleet"}, "no value"),
    ):
        status, body = fleet.send("POST", "/silences", bad, token=operator)
        assert status == 422 and named in body["error"], (bad, body)
    status, silence = fleet.send("POST", "/silences", request, token=operator)
    assert status == 201, silence
    assert silence["active"] and silence["matching"] == 0 and silence["reason"] == "maintenance"

    fleet.upload("silenced-1", shifted(fleet, 1000, seed=131, features=range(1)), t0)
    fleet.upload("loud-1", shifted(fleet, 1000, seed=132, features=range(1)), t0)
    notified = Notified()
    fleet.run_pass(t0, notified)
    quiet, loud = device_alert(fleet, "silenced-1"), device_alert(fleet, "loud-1")
    assert quiet.state == "open" and ("opened", loud.id) in notified.changes
    assert all(alert_id != quiet.id for _, alert_id in notified.changes)
    status, shown = fleet.send("GET", f"/alerts/{quiet.id}")
    assert shown["silenced_by"] == [silence["id"]]
    status, listed = fleet.get("/alerts", state="silenced")
    assert [a["id"] for a in listed["alerts"]] == [quiet.id]
    status, listed = fleet.get("/silences")
    (mine,) = [s for s in listed["silences"] if s["id"] == silence["id"]]
    assert mine["matching"] == 1

    # A silence ends on its own at ends_at.
    ends = datetime.fromisoformat(silence["ends_at"])

    async def active_at(at: datetime) -> list[int]:
        async with fleet.api.server.db.session() as session:
            return [s.id for s in await active_silences(session, at)]

    assert silence["id"] in fleet.api.call(active_at(ends - timedelta(seconds=1)))
    assert silence["id"] not in fleet.api.call(active_at(ends))

    # Ended early: no longer active, listed as expired, and the alert is not silenced.
    status, ended = fleet.send("DELETE", f"/silences/{silence['id']}", token=operator)
    assert status == 200 and not ended["active"] and ended["expired_by"]
    status, body = fleet.send("DELETE", f"/silences/{silence['id']}", token=operator)
    assert status == 409 and "already ended" in body["error"]
    assert fleet.send("DELETE", "/silences/99999999", token=operator)[0] == 404
    assert silence["id"] not in [s["id"] for s in fleet.get("/silences")[1]["silences"]]
    assert silence["id"] in [
        s["id"] for s in fleet.get("/silences", state="expired")[1]["silences"]
    ]
    assert fleet.send("GET", f"/alerts/{quiet.id}")[1]["silenced_by"] == []

    # Made from an alert: its kind, scope and model version.
    status, from_alert = fleet.send(
        "POST", "/silences", {"alert_id": loud.id, "duration_s": 60, "reason": "known"}
    )
    assert status == 201, from_alert
    assert (from_alert["kind"], from_alert["scope"], from_alert["scope_value"]) == (
        "drift",
        "device",
        "loud-1",
    )
    assert (from_alert["model"], from_alert["version"], from_alert["alert_id"]) == (
        "pump-health",
        "1.0.0",
        loud.id,
    )
    assert from_alert["matching"] == 1
    assert (
        fleet.send("POST", "/silences", {"alert_id": 99999999, "duration_s": 60, "reason": "x"})[0]
        == 404
    )
    created = [e["subject"] for e in audit_entries(fleet, "silence.create")]
    assert str(silence["id"]) in created and str(from_alert["id"]) in created
    expired = audit_entries(fleet, "silence.expire")
    assert [e["subject"] for e in expired] == [str(silence["id"])]


def test_alerts_stored_per_feature_before_grouping_are_still_shown(
    fleet: DriftFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    at = datetime(2030, 6, 1, 12, tzinfo=UTC)
    evidence = {
        "reason": "new-range",
        "verdict": "no_drift",
        "min": 1.0,
        "max": 2.0,
        "baseline_min": 0.5,
        "baseline_max": 2.5,
        "p_value": 0.4,
        "windows": 3,
        "window_ids": ["a", "b", "c"],
    }

    async def store() -> int:
        async with fleet.api.server.db.session() as session:
            row = AlertRow(
                kind="drift",
                scope="device",
                scope_value="legacy-1",
                model_name="pump-health",
                model_version="1.0.0",
                feature=0,
                feature_name="shaft_rpm",
                reason="new-range",
                state="closed",
                open_key=None,
                opened_at=at,
                last_seen_at=at,
                closed_at=at + HOUR,
                evidence=evidence,
            )
            session.add(row)
            await session.flush()
            return row.id

    alert_id = fleet.api.call(store())
    status, listed = fleet.get("/alerts", device="legacy-1")
    assert status == 200, listed
    (view,) = listed["alerts"]
    assert (view["id"], view["feature"], view["reason"]) == (alert_id, 0, "new-range")
    assert view["features"] == [
        {
            "feature": 0,
            "name": "shaft_rpm",
            "reasons": ["new-range"],
            "tests": {"new-range": evidence},
        }
    ]
    remote = ["--server", fleet.api.url, "--token-file", str(fleet.api.admin_token_file)]
    capsys.readouterr()
    assert main(["alerts", "--device", "legacy-1", *remote]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith(str(alert_id))]
    assert "shaft_rpm(new-range)" in row and "new-range: 1.0000..2.0000" in row


def test_fleetctl_filters_acknowledges_and_silences(
    fleet: DriftFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = datetime(2032, 5, 1, 12, tzinfo=UTC)
    fleet.register("cli-alert-1", "cli-line")
    fleet.upload("cli-alert-1", shifted(fleet, 1000, seed=141, features=range(2)), t0)
    fleet.run_pass(t0)
    alert = device_alert(fleet, "cli-alert-1")
    remote = ["--server", fleet.api.url, "--token-file", str(fleet.api.admin_token_file)]
    capsys.readouterr()

    assert main(["alerts", "--device", "cli-alert-1", "--state", "open", *remote]) == 0
    out = capsys.readouterr().out
    assert "FEATURES" in out
    (row,) = [line for line in out.splitlines() if line.startswith(str(alert.id))]
    names = [f.name for f in fleet.manifest.features[:2]]
    assert "device:cli-alert-1" in row and all(f"{n}(" in row for n in names)

    assert main(["alerts", "ack", str(alert.id), "--comment", "on it", *remote]) == 0
    assert f"Acknowledged alert {alert.id}" in capsys.readouterr().out
    assert main(["alerts", "ack", str(alert.id), *remote]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fleetctl: ") and "already acknowledged" in line

    code = main(
        [
            "alerts",
            "silence",
            "--scope",
            "tag:cli-line",
            "--for",
            "2h",
            "--reason",
            "moving",
            *remote,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Silence ") and "scope tag:cli-line" in out and "matches 1 open" in out
    silence_id = int(out.split()[1])
    assert (
        main(["alerts", "--state", "silenced", "--scope", "tag:cli-line", "--json", *remote]) == 0
    )
    (silenced,) = json.loads(capsys.readouterr().out)
    assert silenced["scope_value"] == "cli-line" and silenced["silenced_by"] == [silence_id]
    assert main(["alerts", "--device", "cli-alert-1", *remote]) == 0
    assert "open (acked)" in capsys.readouterr().out

    assert main(["alerts", "silences", *remote]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith(f"{silence_id} ") and "moving" in line for line in out.splitlines())
    assert main(["alerts", "unsilence", str(silence_id), *remote]) == 0
    assert f"Silence {silence_id} ended" in capsys.readouterr().out
    assert main(["alerts", "silences", "--state", "expired", "--json", *remote]) == 0
    assert silence_id in [s["id"] for s in json.loads(capsys.readouterr().out)]

    for argv, named in (
        (["alerts", "silence", "--for", "2h", "--reason", "r"], "give an alert ID or --scope"),
        (["alerts", "silence", "--scope", "planet:x", "--for", "1h", "--reason", "r"], "--scope"),
        (
            [
                "alerts",
                "silence",
                str(alert.id),
                "--scope",
                "fleet",
                "--for",
                "1h",
                "--reason",
                "r",
            ],
            "an alert ID or --scope",
        ),
        (["alerts", "--scope", "planet"], "query scope"),
    ):
        assert main([*argv, *remote]) == 1, argv
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("fleetctl: ") and named in line, (argv, line)


def _scores_with_top(top: float, rows: int, seed: int) -> npt.NDArray[np.float64]:
    """Class probabilities whose top score is ``top``, predicted classes spread evenly."""
    rng = np.random.default_rng(seed)
    scores = np.full((rows, 4), (1.0 - top) / 3)
    scores[np.arange(rows), rng.integers(0, 4, rows)] = top
    return scores


def test_accuracy_alerts_are_silenced_and_acknowledged_alike(fleet: DriftFleet) -> None:
    t0 = datetime(2032, 6, 1, 12, tzinfo=UTC)
    fleet.register("unsure-ack-1")
    status, silence = fleet.send(
        "POST",
        "/silences",
        {
            "kind": "accuracy",
            "scope": "device",
            "scope_value": "unsure-ack-1",
            "duration_s": 3600,
            "reason": "new sensor batch",
        },
    )
    assert status == 201, silence
    fleet.upload(
        "unsure-ack-1",
        fleet.in_distribution(1000, seed=151),
        t0,
        scores=_scores_with_top(0.4, 1000, 151),
    )
    notified = Notified()
    fleet.run_pass(t0, notified)
    alert = device_alert(fleet, "unsure-ack-1", "accuracy")
    assert alert.state == "open" and alert.evidence["verdict"] == "below"
    assert all(alert_id != alert.id for _, alert_id in notified.changes)
    status, listed = fleet.get("/alerts", state="silenced", kind="accuracy")
    assert [a["id"] for a in listed["alerts"]] == [alert.id]
    status, acked = fleet.send("POST", f"/alerts/{alert.id}/ack", {"comment": "known"})
    assert status == 200 and acked["acknowledged"]["comment"] == "known"
    assert acked["silenced_by"] == [silence["id"]]

    t1 = t0 + 2 * HOUR
    fleet.upload(
        "unsure-ack-1",
        fleet.in_distribution(1000, seed=152),
        t1,
        scores=_scores_with_top(0.97, 1000, 152),
    )
    notified = Notified()
    fleet.run_pass(t1, notified)
    assert device_alert(fleet, "unsure-ack-1", "accuracy").state == "closed"
    assert all(alert_id != alert.id for _, alert_id in notified.changes)


def test_only_one_replica_closes_an_alert(fleet: DriftFleet) -> None:
    t0 = datetime(2032, 7, 1, 12, tzinfo=UTC)
    fleet.register("race-1")
    fleet.upload("race-1", shifted(fleet, 1000, seed=161, features=range(1)), t0)
    fleet.run_pass(t0)
    alert = device_alert(fleet, "race-1")
    t1 = t0 + 2 * HOUR
    fleet.upload("race-1", fleet.in_distribution(1000, seed=162), t1)
    server = fleet.api.server

    async def load() -> dict[str, AlertRow]:
        async with server.db.session() as session:
            return await load_open_alerts(session)

    # Another replica read the open alerts before this one closed it ...
    stale = fleet.api.call(load())
    first = fleet.run_pass(t1)
    assert ("closed", alert.id) in [(c, r.id) for c, r in first.changes]
    closed_at = device_alert(fleet, "race-1").closed_at

    # ... and then evaluates the same windows: it neither closes (nor notifies) it again.
    async def late() -> list[tuple[str, int]]:
        scope = Scope("device", "race-1")
        async with server.db.session() as session:
            results = await drift_of(session, server.manifests, scope, t1 - HOUR, t1)
            changes = await evaluate_alerts(session, scope, results, stale, t1 + HOUR)
            return [(c, r.id) for c, r in changes]

    assert fleet.api.call(late()) == []
    again = device_alert(fleet, "race-1")
    assert again.state == "closed" and again.closed_at == closed_at
