"""Drift in one region opens one grouped alert there, and an undrifted region opens none.

The fleet is the demo's (``simulator/scenarios/demo.toml``): twelve devices a
region, each sending rows in turn from its cohort's pool of training-like rows
(as ``fleet-sim`` drives them), eu's drifting halfway (``vib_rms_x`` two standard
deviations up, half the readings from idle machines). Each device alone has too
few values to test; a region has thousands, over sixteen features: tested at
1 % each, an undrifted region would open an alert about one pass in four.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from firmware_images.datagen import FieldConditions, generate
from fleet_server.drift import evaluate_fleet
from fleet_server.release.keys import KeyStore
from tests.support.databases import DATABASES
from tests.support.drift_fleet import HOUR, DriftFleet, drift_fleet

pytestmark = pytest.mark.integration

DEVICES = 12  # a region, as in the demo
ROWS = 400  # a device's rows: two windows, under the 500 a test needs
POOL = 16384  # the demo's traffic.rows
DRIFT = FieldConditions(covariate_shift={"vib_rms_x": 2.0}, idle_share=0.5)
SEEDS = range(6)


@pytest.fixture(scope="module", params=DATABASES)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[DriftFleet]:
    yield from drift_fleet(request, tmp_path_factory, session_keys, bundles)


def _in_turn(pool: npt.NDArray[np.float32], n: int, seed: int) -> npt.NDArray[np.float64]:
    """``n`` rows taken in turn from a random start in ``pool``, as a simulated device sends."""
    start = random.Random(seed).randrange(len(pool))
    rows: npt.NDArray[np.float64] = pool[(start + np.arange(n)) % len(pool)].astype(np.float64)
    return rows


def _region(fleet: DriftFleet, name: str, seed: int, end: datetime, drifted: bool) -> None:
    """Twelve devices of region ``name``; with ``drifted``, their second half drifts."""
    cohort_seed = seed * 7919 + sum(map(ord, name))
    pool, _ = generate(POOL, cohort_seed)
    shifted, _ = generate(POOL, cohort_seed + 1, DRIFT)
    for i in range(DEVICES):
        device_id = f"{name}-{i}"
        fleet.register(device_id, name, region=name)
        rows = _in_turn(pool, ROWS, cohort_seed + i + 1)
        if drifted:
            rows[ROWS // 2 :] = _in_turn(shifted, ROWS - ROWS // 2, cohort_seed + i + 1001)
        fleet.upload(device_id, rows, end)


@pytest.mark.parametrize("seed", SEEDS)
def test_drift_in_one_region_opens_one_grouped_alert_and_the_other_region_none(
    fleet: DriftFleet, seed: int
) -> None:
    end = datetime(2032, 1, 1, 12, tzinfo=UTC) + timedelta(days=seed)
    eu, us = f"eu-{seed}", f"us-{seed}"  # each seed's own regions and alerts
    _region(fleet, eu, seed, end, drifted=True)
    _region(fleet, us, seed, end, drifted=False)

    async def evaluate() -> list[tuple[str, str, str, list[str]]]:
        async with fleet.api.server.db.session() as session:
            evaluation = await evaluate_fleet(session, fleet.api.server.manifests, end, HOUR)
            return [
                (
                    change,
                    row.scope,
                    row.scope_value,
                    [f["name"] for f in (row.evidence or {}).get("features") or []],
                )
                for change, row in evaluation.changes
                if row.kind == "drift"
            ]

    changes = fleet.api.call(evaluate())
    opened = [
        (scope, value, names) for change, scope, value, names in changes if change == "opened"
    ]
    # No device has enough values on its own: no device alert, drifted or not.
    assert not [o for o in opened if o[0] == "device"], opened
    # The undrifted region opens nothing, as a region or as its devices' tag.
    assert not [o for o in opened if o[1] == us], opened
    # The drifted one opens one alert per scope that holds it, listing its features.
    (region,) = [o for o in opened if o[0] == "region"]
    assert region[1] == eu and "vib_rms_x" in region[2], region
    (tag,) = [o for o in opened if o[0] == "tag"]
    assert tag[1] == eu and tag[2] == region[2], tag
    # Idle machines read no shaft speed: the alert names that too, in the same alert.
    assert "shaft_rpm" in region[2], region
