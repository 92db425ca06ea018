"""Accuracy over time over the REST API: CBPE's estimate and labelled accuracy per period."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.db.models import WindowRow
from fleet_server.release.keys import KeyStore
from tests.support.databases import DATABASES
from tests.support.drift_fleet import HOUR, DriftFleet, drift_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=DATABASES)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[DriftFleet]:
    yield from drift_fleet(request, tmp_path_factory, session_keys, bundles)


def _history(fleet: DriftFleet, **params: Any) -> tuple[int, Any]:
    status, found = fleet.get("/accuracy/history", **params)
    return status, found


def _finite_everywhere(found: Any) -> bool:
    """Whether no number in ``found`` is NaN or infinite (the JSON parsed strictly)."""
    text = json.dumps(found, allow_nan=False)
    return bool(json.loads(text))


def test_each_hour_shows_the_estimate_and_the_labelled_accuracy_and_empty_hours_are_left_out(
    fleet: DriftFleet,
) -> None:
    end = datetime(2033, 3, 1, 12, tzinfo=UTC)
    fleet.register("hist-1", "hist-line", region="hist-north")
    scores = np.random.default_rng(1).dirichlet([0.5] * len(fleet.manifest.classes or []), 400)
    # Hours 1 and 3 before the end have windows (two each), hour 2 none.
    late = fleet.upload("hist-1", fleet.in_distribution(400, seed=1), end, scores=scores)
    early = fleet.upload(
        "hist-1", fleet.in_distribution(400, seed=2), end - 2 * HOUR, scores=scores
    )
    fleet.label({late[0]: (150, 50), late[1]: (100, 100), early[0]: (180, 20)})
    since, until = (end - 3 * HOUR).isoformat(), end.isoformat()

    status, found = _history(fleet, region="hist-north", since=since, until=until, step_s=3600)
    assert status == 200, found
    assert _finite_everywhere(found) and found["step_s"] == 3600
    (series,) = found["series"]
    assert (series["model"], series["version"]) == (fleet.manifest.name, "1.0.0")
    assert series["reference"] is not None and series["threshold"] < series["reference"]
    early_point, late_point = series["points"]  # the empty hour between is left out
    assert early_point["end"] < late_point["end"]
    for point in (early_point, late_point):
        assert point["windows"] == 2 and point["n"] == 400
        assert point["low"] <= point["estimated"] <= point["high"]
    assert (early_point["labelled_windows"], early_point["labelled_rows"]) == (1, 200)
    assert early_point["labelled"] == pytest.approx(0.9)
    assert (late_point["labelled_windows"], late_point["labelled_rows"]) == (2, 400)
    assert late_point["labelled"] == pytest.approx(250 / 400)
    assert late_point["labelled_estimated"] == pytest.approx(late_point["estimated"])

    # The same windows through the device's scope, and through the drift report's figure.
    _, alone = _history(fleet, device="hist-1", since=since, until=until, step_s=3600)
    assert alone["series"] == found["series"]
    _, drift = fleet.get("/drift", region="hist-north", since=since, until=until)
    (model,) = drift["models"]
    whole = model["accuracy"]["labelled"]
    assert whole["rows"] == 600 and whole["accuracy"] == pytest.approx(430 / 600)


def test_windows_without_scores_or_labels_and_unreadable_ones_are_read_as_what_they_are(
    fleet: DriftFleet,
) -> None:
    end = datetime(2033, 3, 2, 12, tzinfo=UTC)
    fleet.register("hist-2", region="hist-south")
    ids = fleet.upload("hist-2", fleet.in_distribution(400, seed=3), end)  # no scores

    async def spoil() -> None:
        async with fleet.api.server.db.session() as session:
            row = await session.get(WindowRow, ids[0])
            assert row is not None
            row.payload = b"\x00not a window"

    fleet.api.call(spoil())
    status, found = _history(
        fleet, region="hist-south", since=(end - HOUR).isoformat(), until=end.isoformat()
    )
    assert status == 200, found
    assert _finite_everywhere(found)
    (series,) = found["series"]
    assert series["unreadable"] == 1
    (point,) = series["points"]  # one window left, in one period of the adaptive step
    assert point["windows"] == 1 and point["n"] == 0
    assert point["estimated"] is point["low"] is point["high"] is point["labelled"] is None
    assert found["step_s"] >= 1 and not math.isnan(found["step_s"])

    # Nothing in range: no series, still an answer.
    status, empty = _history(
        fleet,
        region="hist-south",
        since=(end + HOUR).isoformat(),
        until=(end + 2 * HOUR).isoformat(),
    )
    assert status == 200 and empty["series"] == [], empty


def test_the_query_is_checked_and_answered_under_the_apis_roles(fleet: DriftFleet) -> None:
    status, refused = _history(fleet, region="nowhere-at-all")
    assert status == 404 and "nowhere-at-all" in json.dumps(refused), refused
    status, refused = _history(fleet, region="hist-north", tag="hist-line")
    assert status == 422, refused
    status, refused = fleet.get("/accuracy/history", fleet="true", step_s=0.5)
    assert status == 422 and "step_s" in json.dumps(refused), refused
    viewer = fleet.token("history-viewer", "viewer")
    r = fleet.api.request("GET", "/api/v1/accuracy/history?fleet=true", token=viewer)
    assert r.status == 200, r.data
    r = fleet.api.request("GET", "/api/v1/accuracy/history?fleet=true")
    assert r.status == 401, r.data
