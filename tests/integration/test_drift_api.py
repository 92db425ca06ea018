"""Drift of stored windows over the REST API and fleetctl, and the alerts it opens and closes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import select

from firmware_images.datagen import tilted
from fleet_server.db.models import AlertRow, WindowRow
from fleet_server.fleetctl import main
from fleet_server.release.keys import KeyStore
from model_runtime import TFLiteRuntime
from testbed.images import HARDWARE
from tests.support.databases import DATABASES
from tests.support.drift_fleet import (
    HOUR,
    MODELS,
    DriftFleet,
    V,
    drift_fleet,
    figures,
    listed_tests,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=DATABASES)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[DriftFleet]:
    yield from drift_fleet(request, tmp_path_factory, session_keys, bundles)


def _verdicts(report: dict[str, Any]) -> dict[str, str]:
    (model,) = report["models"]
    return {f["name"]: f["verdict"] for f in model["features"]}


def test_in_distribution_windows_show_no_drift(fleet: DriftFleet) -> None:
    end = datetime(2031, 1, 1, 12, tzinfo=UTC)
    fleet.register("calm-1")
    ids = fleet.upload("calm-1", fleet.in_distribution(1000, seed=1), end)
    status, report = fleet.get(
        "/drift", device="calm-1", since=(end - HOUR).isoformat(), until=end.isoformat()
    )
    assert status == 200, report
    assert set(_verdicts(report).values()) == {"no_drift"}
    (model,) = report["models"]
    assert model["windows"] == 5 and sorted(model["window_ids"]) == sorted(ids)
    assert model["version"] == "1.0.0" and model["baseline_id"] == fleet.manifest.baseline.id
    assert all(f["n"] == 1000 and f["threshold"] > 0 for f in model["features"])
    assert model["requests"] == model["summarised_requests"] == 1000


def test_a_shifted_feature_drifts_and_the_others_do_not(fleet: DriftFleet) -> None:
    end = datetime(2031, 1, 2, 12, tzinfo=UTC)
    fleet.register("shifted-1")
    fleet.upload("shifted-1", fleet.shifted(1000, seed=2, feature=0), end)
    status, report = fleet.get(
        "/drift", device="shifted-1", since=(end - HOUR).isoformat(), until=end.isoformat()
    )
    assert status == 200, report
    verdicts = _verdicts(report)
    assert verdicts.pop("shaft_rpm") == "drift"
    assert set(verdicts.values()) == {"no_drift"}
    shaft = report["models"][0]["features"][0]
    assert shaft["statistic"] > shaft["threshold"] and shaft["psi"] > shaft["psi_threshold"]


def test_few_rows_are_not_enough_data(fleet: DriftFleet) -> None:
    end = datetime(2031, 1, 3, 12, tzinfo=UTC)
    fleet.register("quiet-1")
    fleet.upload("quiet-1", fleet.shifted(200, seed=3), end, rows_per_window=100)
    status, report = fleet.get(
        "/drift", device="quiet-1", since=(end - HOUR).isoformat(), until=end.isoformat()
    )
    assert status == 200, report
    assert set(_verdicts(report).values()) == {"not_enough_data"}


def test_a_cohort_merges_the_windows_of_its_devices(fleet: DriftFleet) -> None:
    end = datetime(2031, 1, 4, 12, tzinfo=UTC)
    fleet.register("cohort-1", "line-7", region="eu-west")
    fleet.register("cohort-2", "line-7", region="eu-west")
    fleet.upload("cohort-1", fleet.in_distribution(400, seed=4), end)
    fleet.upload("cohort-2", fleet.in_distribution(400, seed=5), end)
    window = {"since": (end - HOUR).isoformat(), "until": end.isoformat()}
    # Each device alone has too few values; together they have enough.
    _, alone = fleet.get("/drift", device="cohort-1", **window)
    assert set(_verdicts(alone).values()) == {"not_enough_data"}
    for scope in ({"tag": "line-7"}, {"region": "eu-west"}, {"fleet": "true"}):
        status, report = fleet.get("/drift", **scope, **window)
        assert status == 200, report
        assert report["models"][0]["windows"] == 4
        assert set(_verdicts(report).values()) == {"no_drift"}


def test_the_query_needs_exactly_one_scope_and_a_known_device(fleet: DriftFleet) -> None:
    assert fleet.get("/drift")[0] == 422
    assert fleet.get("/drift", device="calm-1", tag="line-7")[0] == 422
    assert fleet.get("/drift", device="calm-1", fleet="true")[0] == 422
    assert fleet.get("/drift", device="nobody-here")[0] == 404


def test_an_unknown_tag_hardware_region_model_or_version_is_a_404_naming_it(
    fleet: DriftFleet,
) -> None:
    fleet.register("known-scope-1", "known-tag", region="known-region")
    for params, named in (
        ({"tag": "no-such-tag"}, "tag 'no-such-tag'"),
        ({"hardware_id": "no-such-hw"}, "hardware id 'no-such-hw'"),
        ({"region": "no-such-region"}, "region 'no-such-region'"),
        ({"fleet": "true", "model": "no-such-model"}, "model 'no-such-model'"),
        ({"fleet": "true", "version": "9.9.9"}, "model version '9.9.9'"),
        (
            {"tag": "known-tag", "model": "pump-health", "version": "9.9.9"},
            "'9.9.9' of pump-health",
        ),
    ):
        status, body = fleet.get("/drift", **params)
        assert status == 404, (params, body)
        assert named in json.dumps(body), (params, body)
    # A known scope, model and version with no windows yet is an empty report, not an error.
    for params in (
        {"tag": "known-tag"},
        {"region": "known-region"},
        {"hardware_id": HARDWARE},
        {"tag": "known-tag", "model": "pump-health", "version": "1.0.0"},
    ):
        status, report = fleet.get("/drift", **params)
        assert status == 200 and report["models"] == [], (params, report)


def test_fleetctl_drift_of_an_unknown_tag_is_one_line_and_a_failure(
    fleet: DriftFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = ["--server", fleet.api.url, "--token-file", str(fleet.api.admin_token_file)]
    capsys.readouterr()
    code = main(["drift", "--tag", "nosuch", *remote])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("fleetctl: ") and "tag 'nosuch'" in line


def test_an_alert_opens_once_stays_open_and_closes_when_drift_clears(fleet: DriftFleet) -> None:
    t0 = datetime(2031, 2, 1, 12, tzinfo=UTC)
    fleet.register("alarm-1")
    fleet.upload("alarm-1", fleet.shifted(1000, seed=6, feature=0), t0)
    fleet.evaluate(t0)
    fleet.evaluate(t0 + timedelta(minutes=1))  # the same drift: no second alert
    # Two standard deviations up also puts values beyond the baseline's maximum: one alert
    # for the device's model version, listing the feature with each test that found it.
    (alert,) = fleet.alerts("alarm-1")
    assert alert.kind == "drift" and alert.state == "open" and alert.feature is None
    assert listed_tests(alert) == {"shaft_rpm": ["distribution", "new-range"]}
    assert alert.last_seen_at > alert.opened_at
    ev = figures(alert, "shaft_rpm", "distribution")
    assert ev["verdict"] == "drift" and ev["statistic"] > ev["threshold"]
    assert figures(alert, "shaft_rpm", "new-range")["verdict"] == "drift"
    assert alert.evidence["windows"] == 5 and alert.evidence["verdict"] == "drift"
    assert len(alert.evidence["window_ids"]) == 5 and alert.evidence["min_n"] == 500

    # Too few values later: no evidence either way, so the alert stays open.
    t1 = t0 + 2 * HOUR
    fleet.upload("alarm-1", fleet.in_distribution(200, seed=7), t1)
    fleet.evaluate(t1)
    (alert,) = fleet.alerts("alarm-1")
    assert alert.state == "open"
    assert listed_tests(alert) == {"shaft_rpm": ["distribution", "new-range"]}

    # Enough in-distribution values: the alert closes, showing the tests that cleared.
    t2 = t0 + 4 * HOUR
    fleet.upload("alarm-1", fleet.in_distribution(1000, seed=8), t2)
    fleet.evaluate(t2)
    (alert,) = fleet.alerts("alarm-1")
    assert alert.state == "closed" and alert.closed_at is not None
    assert alert.evidence["verdict"] == "no_drift"
    assert listed_tests(alert) == {"shaft_rpm": ["distribution", "new-range"]}
    assert figures(alert, "shaft_rpm", "distribution")["verdict"] == "no_drift"
    beyond = figures(alert, "shaft_rpm", "new-range")
    assert beyond["verdict"] == "no_drift" and beyond["reason"] == "new-range"

    # Drift again: a new alert, the closed one stays closed.
    t3 = t0 + 6 * HOUR
    fleet.upload("alarm-1", fleet.shifted(1000, seed=9, feature=0), t3)
    fleet.evaluate(t3)
    states = [a.state for a in fleet.alerts("alarm-1")]
    assert states == ["closed", "open"]
    assert listed_tests(fleet.alerts("alarm-1")[-1]) == {"shaft_rpm": ["distribution", "new-range"]}

    status, listed = fleet.get("/alerts", state="open")
    assert status == 200
    (mine,) = [a for a in listed["alerts"] if a["scope_value"] == "alarm-1"]
    assert [(f["name"], f["reasons"]) for f in mine["features"]] == [
        ("shaft_rpm", ["distribution", "new-range"])
    ]
    assert mine["evidence"]["verdict"] == "drift"
    status, closed = fleet.get("/alerts", state="closed")
    assert any(a["scope_value"] == "alarm-1" for a in closed["alerts"])

    metrics = fleet.api.request("GET", "/metrics").data.decode()
    assert "edgefleet_drift_alerts_open" in metrics
    assert 'edgefleet_drift_features_drifting{model="pump-health",version="1.0.0"}' in metrics


def test_a_dead_sensor_opens_a_missing_values_alert_that_says_so(fleet: DriftFleet) -> None:
    t0 = datetime(2031, 2, 10, 12, tzinfo=UTC)
    fleet.register("dead-1")
    data = fleet.in_distribution(1000, seed=21)
    data[np.random.default_rng(21).random(1000) < 0.05, 1] = np.nan  # 5 % NaN, feature 1
    fleet.upload("dead-1", data, t0)
    since, until = (t0 - HOUR).isoformat(), t0.isoformat()
    status, report = fleet.get("/drift", device="dead-1", since=since, until=until)
    assert status == 200, report
    (model,) = report["models"]
    dead = model["features"][1]
    assert dead["verdict"] == "drift" and dead["reasons"] == ["missing-values"]
    assert dead["verdicts"]["distribution"] == "no_drift"  # what is left is undrifted
    assert dead["nan"] == int(np.isnan(data[:, 1]).sum()) and dead["baseline_nan"] == 0
    assert dead["missing_p_value"] < 1e-6
    assert [f["verdict"] for i, f in enumerate(model["features"]) if i != 1] == ["no_drift"] * (
        len(model["features"]) - 1
    )

    fleet.evaluate(t0)
    fleet.evaluate(t0 + timedelta(minutes=1))
    (alert,) = fleet.alerts("dead-1")
    assert alert.state == "open" and listed_tests(alert) == {
        fleet.manifest.features[1].name: ["missing-values"]
    }
    (entry,) = alert.evidence["features"]
    assert entry["feature"] == 1
    ev = entry["tests"]["missing-values"]
    assert ev["reason"] == "missing-values" and ev["baseline_share"] == 0.0
    assert 0.03 < ev["share"] < 0.07 and ev["p_value"] <= ev["alpha"]
    status, listed = fleet.get("/alerts", state="open")
    (view,) = [a for a in listed["alerts"] if a["scope_value"] == "dead-1"]
    assert [(f["feature"], f["reasons"]) for f in view["features"]] == [(1, ["missing-values"])]

    # The sensor is replaced: no NaN in enough rows closes the alert.
    t1 = t0 + 2 * HOUR
    fleet.upload("dead-1", fleet.in_distribution(1000, seed=22), t1)
    fleet.evaluate(t1)
    (alert,) = fleet.alerts("dead-1")
    assert alert.state == "closed" and alert.evidence["verdict"] == "no_drift"


def test_a_few_new_values_open_a_new_range_alert_with_the_devices_counts(
    fleet: DriftFleet,
) -> None:
    t0 = datetime(2031, 2, 12, 12, tzinfo=UTC)
    fleet.register("new-1")
    data = fleet.in_distribution(1000, seed=23)
    top = fleet.manifest.baseline.features[2].summary.max
    assert top is not None
    data[[610, 650, 700, 720, 750, 790], 2] = top + 1.0  # six new values, in one window
    ids = fleet.upload("new-1", data, t0, counted=True)
    # Only that window needs codec version 3; the others keep version 1 and carry no counts.
    payloads = fleet.api.call(_payloads(fleet, ids))
    assert [p[3] for p in payloads] == [1, 1, 1, 3, 1]
    since, until = (t0 - HOUR).isoformat(), t0.isoformat()
    status, report = fleet.get("/drift", device="new-1", since=since, until=until)
    assert status == 200, report
    (model,) = report["models"]
    feature = model["features"][2]
    # The four windows without counts had nothing beyond the range: the merge keeps six.
    assert (feature["below_baseline"], feature["above_baseline"]) == (0, 6)
    assert feature["reasons"] == ["new-range"] and feature["new_range_p_value"] < 1e-3
    fleet.evaluate(t0)
    (alert,) = fleet.alerts("new-1")
    assert alert.state == "open"
    (entry,) = alert.evidence["features"]
    assert entry["feature"] == 2 and entry["reasons"] == ["new-range"]
    ev = entry["tests"]["new-range"]
    assert ev["above_baseline"] == 6 and ev["baseline_max"] == top


async def _payloads(fleet: DriftFleet, window_ids: list[str]) -> list[bytes]:
    async with fleet.api.server.db.session() as session:
        rows = await session.scalars(select(WindowRow).where(WindowRow.window_id.in_(window_ids)))
        by_id = {r.window_id: r.payload for r in rows}
    return [by_id[i] for i in window_ids]


def test_fleetctl_drift_prints_a_table_and_alerts_lists_them(
    fleet: DriftFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    end = datetime(2031, 3, 1, 12, tzinfo=UTC)
    fleet.register("cli-1")
    fleet.upload("cli-1", fleet.shifted(1000, seed=10, feature=0), end)
    remote = ["--server", fleet.api.url, "--token-file", str(fleet.api.admin_token_file)]
    capsys.readouterr()
    since, until = (end - HOUR).isoformat(), end.isoformat()
    code = main(["drift", "--device", "cli-1", "--since", since, "--until", until, *remote])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FEATURE" in out and "STATISTIC/THRESHOLD" in out
    shaft = next(line for line in out.splitlines() if line.startswith("shaft_rpm"))
    assert shaft.split()[-1] == "DRIFT"
    assert "no_drift" in out

    fleet.evaluate(end)
    code = main(["alerts", "--state", "open", "--json", *remote])
    alerts = json.loads(capsys.readouterr().out)
    assert code == 0
    assert any(
        a["scope_value"] == "cli-1" and [f["name"] for f in a["features"]] == ["shaft_rpm"]
        for a in alerts
    )
    code = main(["drift", *remote])
    assert code == 1 and "give one of" in capsys.readouterr().err


# -- accuracy: estimated without labels, measured with them ----------------------------


def _v1_scores(X: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    out = TFLiteRuntime().load(MODELS / "v1.tflite").run({"features": X})["scores"]
    return np.asarray(out, dtype=np.float64)


def _confusion(
    y: npt.NDArray[np.int64], predicted: npt.NDArray[np.int64], k: int
) -> list[list[int]]:
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y, predicted), 1)
    return counts.tolist()


def _post_labels(fleet: DriftFleet, windows: list[dict[str, Any]], token: str | None = None) -> Any:
    r = fleet.api.request(
        "POST", f"{V}/labels", token=token or fleet.admin, json={"windows": windows}
    )
    return r.status, json.loads(r.data)


def test_accuracy_under_covariate_shift_is_estimated_and_measured_with_late_labels(
    fleet: DriftFleet,
) -> None:
    end = datetime(2031, 4, 1, 12, tzinfo=UTC)
    fleet.register("tilted-1")
    # Hotter, more loaded machines: the inputs move, what an input means does not.
    X, y = tilted({"bearing_temp_c": 1.0, "motor_current_a": 1.0, "shaft_rpm": 1.0}, 10_000, 51)
    scores = _v1_scores(X)
    predicted = scores.argmax(axis=1)
    ids = fleet.upload("tilted-1", X.astype(np.float64), end, rows_per_window=500, scores=scores)
    window = {"since": (end - HOUR).isoformat(), "until": end.isoformat()}

    status, report = fleet.get("/drift", device="tilted-1", **window)
    assert status == 200, report
    accuracy = report["models"][0]["accuracy"]
    calibration = fleet.manifest.baseline.calibration
    assert calibration is not None
    assert accuracy["reference"] == pytest.approx(calibration.reference_accuracy)
    assert accuracy["threshold"] == pytest.approx(calibration.reference_accuracy - 0.05)
    assert accuracy["n"] == 10_000 and accuracy["labelled"] is None
    assert accuracy["low"] <= accuracy["estimated"] <= accuracy["high"]
    measured = float((predicted == y).mean())
    assert abs(measured - calibration.reference_accuracy) > 0.01  # the shift moved accuracy
    assert abs(accuracy["estimated"] - measured) <= 0.03, (accuracy["estimated"], measured)
    # The interval includes the allowance measured at build time, and says what it assumes.
    assert accuracy["allowance"] == calibration.allowance and accuracy["allowance_measured"]
    assert accuracy["low"] <= measured <= accuracy["high"]
    assert "covariate shift" in accuracy["assumption"] and "concept" in accuracy["assumption"]

    # Labels arrive later for half the windows: confusion counts, in the model's class order.
    classes = fleet.manifest.classes
    assert classes is not None
    labelled = ids[::2]
    bodies = []
    for k, window_id in enumerate(ids):
        if window_id in labelled:
            part = slice(k * 500, (k + 1) * 500)
            counts = _confusion(y[part], predicted[part], len(classes))
            bodies.append({"window_id": window_id, "classes": classes, "counts": counts})
    status, result = _post_labels(fleet, bodies)
    assert status == 200, result
    right = sum(
        int((predicted[k * 500 : (k + 1) * 500] == y[k * 500 : (k + 1) * 500]).sum())
        for k in range(0, len(ids), 2)
    )
    assert result == {"stored": 10, "replaced": 0, "rows": 5000, "correct": right}

    _, report = fleet.get("/drift", device="tilted-1", **window)
    shown = report["models"][0]["accuracy"]
    assert shown["estimated"] == accuracy["estimated"]  # labels do not change the estimate
    assert shown["labelled"]["windows"] == 10 and shown["labelled"]["rows"] == 5000
    assert shown["labelled"]["accuracy"] == pytest.approx(right / 5000)
    assert abs(shown["labelled"]["estimated"] - right / 5000) <= 0.03

    # Posting a window's labels again replaces them; every post is in the audit log.
    first = bodies[0]
    fixed = {
        "window_id": first["window_id"],
        "labels": [{"actual": classes[0], "predicted": classes[0], "count": 500}],
    }
    status, result = _post_labels(fleet, [fixed])
    assert status == 200 and result == {"stored": 0, "replaced": 1, "rows": 500, "correct": 500}
    _, report = fleet.get("/drift", device="tilted-1", **window)
    previous = sum(map(sum, (first["counts"][i][i : i + 1] for i in range(len(classes)))))
    assert report["models"][0]["accuracy"]["labelled"]["rows"] == 5000
    assert report["models"][0]["accuracy"]["labelled"]["accuracy"] == pytest.approx(
        (right - previous + 500) / 5000
    )
    status, page = fleet.get("/audit")
    posts = [e for e in page["entries"] if e["action"] == "labels.post"]
    assert [p["details"]["windows"] for p in posts[-2:]] == [10, 1]


def test_labels_that_do_not_fit_are_refused_and_nothing_is_stored(fleet: DriftFleet) -> None:
    end = datetime(2031, 4, 2, 12, tzinfo=UTC)
    fleet.register("labels-1")
    X, _ = tilted({}, 400, 52)
    ids = fleet.upload("labels-1", X.astype(np.float64), end, scores=_v1_scores(X))
    bare = fleet.upload("labels-1", fleet.in_distribution(200, seed=53), end - 3 * HOUR)
    classes = fleet.manifest.classes
    assert classes is not None
    good = {"window_id": ids[0], "labels": [{"actual": classes[1], "predicted": classes[1]}]}
    identity = [[int(i == j) for j in range(4)] for i in range(4)]
    cases = [
        ([good, {"window_id": "no-such-window", "labels": []}], 404, "no window no-such-window"),
        (
            [good, {"window_id": ids[1], "classes": classes[::-1], "counts": identity}],
            422,
            "in this order",
        ),
        (
            [
                good,
                {"window_id": ids[1], "labels": [{"actual": "broken", "predicted": classes[0]}]},
            ],
            422,
            "'broken' is not a class",
        ),
        ([good, {"window_id": bare[0], "labels": []}], 422, "no score output"),
        ([good, good], 422, "appears twice"),
        ([{"window_id": ids[1], "classes": classes, "counts": [[1, 2], [3, 4]]}], 422, "4 x 4"),
        ([{"window_id": ids[1], "counts": identity}], 422, "counts need classes"),
        (
            [{"window_id": ids[1], "classes": classes, "counts": identity, "labels": []}],
            422,
            "either counts",
        ),
        (
            [
                {
                    "window_id": ids[1],
                    "labels": [{"actual": classes[0], "predicted": classes[0], "count": -1}],
                }
            ],
            422,
            "count",
        ),
    ]
    for windows, status, message in cases:
        got, body = _post_labels(fleet, windows)
        assert (got, message in body.get("error", "")) == (status, True), (windows, body)
    assert _post_labels(fleet, [])[0] == 422
    _, report = fleet.get(
        "/drift", device="labels-1", since=(end - HOUR).isoformat(), until=end.isoformat()
    )
    assert report["models"][0]["accuracy"]["labelled"] is None  # the good ones were not stored

    # Posting labels needs the operator role.
    viewer = fleet.api.request(
        "POST", f"{V}/tokens", token=fleet.admin, json={"name": "labels-viewer", "role": "viewer"}
    )
    assert viewer.status == 201, viewer.data
    got, body = _post_labels(fleet, [good], token=json.loads(viewer.data)["token"])
    assert got == 403, body


def _scores_with_top(top: float, rows: int, seed: int) -> npt.NDArray[np.float64]:
    """Class probabilities whose top score is ``top``, predicted classes spread evenly."""
    rng = np.random.default_rng(seed)
    scores = np.full((rows, 4), (1.0 - top) / 3)
    scores[np.arange(rows), rng.integers(0, 4, rows)] = top
    return scores


def test_an_accuracy_alert_opens_for_device_and_cohort_and_closes_when_it_recovers(
    fleet: DriftFleet,
) -> None:
    t0 = datetime(2031, 5, 1, 12, tzinfo=UTC)
    fleet.register("unsure-1", "line-9", region="ap-south")
    # In-distribution inputs, but the model is unsure of everything: low estimated accuracy.
    fleet.upload(
        "unsure-1", fleet.in_distribution(1000, seed=60), t0, scores=_scores_with_top(0.4, 1000, 60)
    )
    fleet.evaluate(t0)
    fleet.evaluate(t0 + timedelta(minutes=1))  # still low: the same alert, updated

    def accuracy_alerts(scope: str, value: str) -> list[AlertRow]:
        async def load() -> list[AlertRow]:
            async with fleet.api.server.db.session() as session:
                return list(
                    (
                        await session.scalars(
                            select(AlertRow)
                            .where(
                                AlertRow.kind == "accuracy",
                                AlertRow.scope == scope,
                                AlertRow.scope_value == value,
                            )
                            .order_by(AlertRow.id)
                        )
                    ).all()
                )

        return fleet.api.call(load())

    (alert,) = accuracy_alerts("device", "unsure-1")
    assert alert.state == "open" and alert.feature is None and alert.last_seen_at > alert.opened_at
    ev = alert.evidence
    assert ev["verdict"] == "below" and ev["high"] < ev["threshold"] < ev["reference"]
    assert ev["n"] == 1000 and ev["windows"] == 5 and ev["max_drop"] == 0.05
    # The cohorts the device belongs to alert too, each once.
    for scope, value in (("tag", "line-9"), ("region", "ap-south"), ("hardware_id", HARDWARE)):
        assert [a.state for a in accuracy_alerts(scope, value)] == ["open"], (scope, value)
    # No drift alert: the inputs did not move.
    assert not fleet.alerts("unsure-1", "drift")

    status, listed = fleet.get("/alerts", state="open", kind="accuracy")
    assert status == 200
    mine = [a for a in listed["alerts"] if a["scope_value"] == "unsure-1"]
    assert len(mine) == 1 and mine[0]["kind"] == "accuracy" and mine[0]["feature"] is None
    status, drift_only = fleet.get("/alerts", kind="drift")
    assert status == 200 and all(a["kind"] == "drift" for a in drift_only["alerts"])
    metrics = fleet.api.request("GET", "/metrics").data.decode()
    assert "edgefleet_accuracy_alerts_open" in metrics

    # Confident again: the estimate is back above the threshold and the alerts close.
    t1 = t0 + 2 * HOUR
    fleet.upload(
        "unsure-1",
        fleet.in_distribution(1000, seed=61),
        t1,
        scores=_scores_with_top(0.97, 1000, 61),
    )
    fleet.evaluate(t1)
    (alert,) = accuracy_alerts("device", "unsure-1")
    assert alert.state == "closed" and alert.evidence["verdict"] == "within"
    assert [a.state for a in accuracy_alerts("tag", "line-9")] == ["closed"]


def test_fleetctl_posts_labels_from_csv_and_shows_accuracy(
    fleet: DriftFleet, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    end = datetime(2031, 6, 1, 12, tzinfo=UTC)
    fleet.register("cli-acc-1")
    X, y = tilted({}, 1000, 70)
    scores = _v1_scores(X)
    ids = fleet.upload("cli-acc-1", X.astype(np.float64), end, scores=scores)
    classes = fleet.manifest.classes
    assert classes is not None
    predicted = scores.argmax(axis=1)
    lines = ["window_id,actual,predicted"]
    for k, window_id in enumerate(ids[:2]):
        for i in range(k * 200, (k + 1) * 200):
            lines.append(f"{window_id},{classes[y[i]]},{classes[predicted[i]]}")
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    remote = ["--server", fleet.api.url, "--token-file", str(fleet.api.admin_token_file)]
    capsys.readouterr()
    assert main(["labels", "post", str(path), *remote]) == 0
    out = capsys.readouterr().out
    right = int((predicted[:400] == y[:400]).sum())
    assert (
        f"Labels of 2 windows stored (0 replaced earlier ones): 400 predictions, {right} right"
        in out
    )

    since, until = (end - HOUR).isoformat(), end.isoformat()
    assert (
        main(["drift", "--device", "cli-acc-1", "--since", since, "--until", until, *remote]) == 0
    )
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("accuracy:"))
    assert "estimated" in line and f"measured {right / 400:.1%} on 400 labelled" in line
    assert "the interval assumes the calibration carries over" in out

    assert main(["drift", "--fleet", "--since", since, "--until", until, *remote]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Drift of fleet, windows ended") and "measured" in out

    bad = tmp_path / "bad.csv"
    bad.write_text("window,label\nx,y\n")
    assert main(["labels", "post", str(bad), *remote]) == 1
    assert "window_id,actual,predicted" in capsys.readouterr().err
    assert main(["alerts", "--kind", "accuracy", *remote]) == 0
    assert "KIND" in capsys.readouterr().out
