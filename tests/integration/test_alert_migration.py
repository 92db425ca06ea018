"""Alerts stored one per feature and test are grouped by migration 0008, and split back by its
downgrade."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from fleet_server.db.engine import MIGRATIONS, normalise_url
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

T0 = datetime(2030, 1, 1, 12, tzinfo=UTC)
WINDOWS = {
    "baseline_id": "b1",
    "windows": 4,
    "window_ids": ["w1", "w2", "w3", "w4"],
    "start": "2030-01-01T11:00:00+00:00",
    "end": "2030-01-01T12:00:00+00:00",
    "min_n": 500,
    "false_alarm_rate": 0.01,
}


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url))
    return config


def _run(url: str, statement: str, rows: list[dict[str, Any]] | None = None) -> list[Any]:
    async def go() -> list[Any]:
        engine = create_async_engine(normalise_url(url))
        try:
            async with engine.begin() as connection:
                if rows is not None:
                    await connection.execute(text(statement), rows)
                    return []
                return list((await connection.execute(text(statement))).mappings().all())
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _legacy(
    alert_id: int, device: str, feature: int, reason: str, state: str = "open", minutes: int = 0
) -> dict[str, Any]:
    key = f"drift|device:{device}|pump-health@1.0.0|{feature}"
    evidence = {"reason": reason, "verdict": "drift", "p_value": 1e-9, "n": 1000} | WINDOWS
    return {
        "id": alert_id,
        "kind": "drift",
        "scope": "device",
        "scope_value": device,
        "model_name": "pump-health",
        "model_version": "1.0.0",
        "feature": feature,
        "feature_name": f"f{feature}",
        "reason": reason,
        "state": state,
        "open_key": (key if reason == "distribution" else f"{key}|{reason}")
        if state == "open"
        else None,
        "opened_at": T0 + timedelta(minutes=minutes),
        "last_seen_at": T0 + timedelta(minutes=minutes + 5),
        "closed_at": None if state == "open" else T0 + timedelta(hours=1),
        "evidence": evidence,
    }


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.parametrize("kind", DATABASES)
def test_open_alerts_of_one_scope_and_version_are_merged_and_closed_ones_kept(
    kind: str, tmp_path: Path
) -> None:
    with database_url(kind, tmp_path) as url:
        config = _config(url)
        command.upgrade(config, "0005")
        rows = [
            _legacy(11, "pump-1", 0, "new-range", minutes=3),
            _legacy(10, "pump-1", 0, "distribution"),
            _legacy(12, "pump-1", 2, "missing-values", minutes=1),
            _legacy(13, "pump-1", 1, "distribution", state="closed"),
            _legacy(14, "pump-2", 0, "distribution"),
        ]
        _run(
            url,
            "INSERT INTO alerts (id, kind, scope, scope_value, model_name, model_version, feature, "
            "feature_name, reason, state, open_key, opened_at, last_seen_at, closed_at, evidence) "
            "VALUES (:id, :kind, :scope, :scope_value, :model_name, :model_version, :feature, "
            ":feature_name, :reason, :state, :open_key, :opened_at, :last_seen_at, :closed_at, "
            ":evidence)",
            [r | {"evidence": json.dumps(r["evidence"])} for r in rows],
        )
        command.upgrade(config, "head")
        stored = {r["id"]: r for r in _run(url, "SELECT * FROM alerts ORDER BY id")}
        assert sorted(stored) == [10, 13, 14]
        merged = stored[10]
        assert merged["open_key"] == "drift|device:pump-1|pump-health@1.0.0"
        assert merged["feature"] is None and merged["reason"] is None and merged["state"] == "open"
        evidence = _json(merged["evidence"])
        assert [(f["feature"], f["name"], f["reasons"]) for f in evidence["features"]] == [
            (0, "f0", ["distribution", "new-range"]),
            (2, "f2", ["missing-values"]),
        ]
        assert evidence["features"][0]["tests"]["new-range"]["p_value"] == 1e-9
        assert "window_ids" not in evidence["features"][0]["tests"]["new-range"]
        assert evidence["window_ids"] == WINDOWS["window_ids"] and evidence["verdict"] == "drift"
        assert evidence["merged_alerts"] == [10, 11, 12]
        assert stored[14]["open_key"] == "drift|device:pump-2|pump-health@1.0.0"
        closed = stored[13]
        assert (closed["feature"], closed["reason"], closed["state"]) == (
            1,
            "distribution",
            "closed",
        )

        # Back down: one open alert per feature and test again, under the keys the older
        # server looks for; the closed one untouched.
        command.downgrade(config, "0005")
        stored = {r["id"]: r for r in _run(url, "SELECT * FROM alerts ORDER BY id")}
        keys = sorted(r["open_key"] for r in stored.values() if r["open_key"] is not None)
        assert keys == [
            "drift|device:pump-1|pump-health@1.0.0|0",
            "drift|device:pump-1|pump-health@1.0.0|0|new-range",
            "drift|device:pump-1|pump-health@1.0.0|2|missing-values",
            "drift|device:pump-2|pump-health@1.0.0|0",
        ]
        assert stored[13]["state"] == "closed" and stored[10]["feature"] == 0
