"""A fleet server with the sample model v1 released, and windows stored as devices send them.

:class:`DriftFleet` registers devices, stores windows of chosen rows directly
in the database (as ingest would), runs the alert evaluation and reads the
alerts back; :func:`drift_fleet` makes one per database for a test module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import select

from fleet_server.db.models import AlertRow, WindowRow
from fleet_server.drift import Evaluation, evaluate_fleet, evaluate_once
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from protocol.bundle import read_manifest
from protocol.manifest import Manifest
from protocol.summary import score_histogram, summarize
from protocol.window import WindowSummary, encode_window
from testbed.api_server import ServerThread, repository_files
from testbed.images import HARDWARE
from tests.support.databases import database_url

V = "/api/v1"
MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
HOUR = timedelta(hours=1)


@dataclass
class DriftFleet:
    api: ServerThread
    admin: str
    manifest: Manifest
    rows: npt.NDArray[np.float64]

    def get(self, path: str, **params: Any) -> tuple[int, Any]:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        r = self.api.request("GET", f"{V}{path}?{query}", token=self.admin)
        return r.status, json.loads(r.data)

    def register(self, device_id: str, *tags: str, region: str | None = None) -> None:
        r = self.api.request(
            "POST",
            f"{V}/devices",
            token=self.admin,
            json={
                "device_id": device_id,
                "hardware_id": HARDWARE,
                "tags": list(tags),
                "region": region,
            },
        )
        assert r.status == 201, r.data

    def upload(
        self,
        device_id: str,
        data: npt.NDArray[np.float64],
        end: datetime,
        rows_per_window: int = 200,
        scores: npt.NDArray[np.float64] | None = None,
        counted: bool = False,
    ) -> list[str]:
        """Store ``data`` as consecutive one-minute windows of ``device_id`` ending at ``end``.

        ``scores``, the model's outputs for ``data``, give the windows their top-score histograms.
        ``counted``: the windows count the values beyond the baseline's range, as devices do.
        """
        baseline = self.manifest.baseline
        edges = [f.edges for f in baseline.features]
        ranges = [(f.valid_min, f.valid_max) for f in self.manifest.features]
        beyond = [(f.summary.min, f.summary.max) for f in baseline.features] if counted else None
        count = data.shape[0] // rows_per_window
        rows = []
        for k in range(count):
            chunk = data[k * rows_per_window : (k + 1) * rows_per_window]
            stop = end - timedelta(minutes=count - 1 - k)
            window = WindowSummary(
                window_id=f"{device_id}-{stop.timestamp():.0f}",
                device_id=device_id,
                model_name=self.manifest.name,
                model_version=self.manifest.version,
                baseline_id=baseline.id,
                start=(stop - timedelta(minutes=1)).timestamp(),
                end=stop.timestamp(),
                requests=rows_per_window,
                features=summarize(chunk, edges, ranges, beyond),
                scores=(
                    score_histogram(
                        scores[k * rows_per_window : (k + 1) * rows_per_window],
                        self.manifest.classes or [],
                    )
                    if scores is not None
                    else None
                ),
            )
            rows.append(
                WindowRow(
                    window_id=window.window_id,
                    device_id=device_id,
                    model_name=window.model_name,
                    model_version=window.model_version,
                    baseline_id=window.baseline_id,
                    start=stop - timedelta(minutes=1),
                    end=stop,
                    requests=window.requests,
                    errors=0,
                    payload=encode_window(window),
                    received_at=stop,
                )
            )

        async def store() -> None:
            async with self.api.server.db.session() as session:
                session.add_all(rows)

        self.api.call(store())
        return [r.window_id for r in rows]

    def in_distribution(self, n: int, seed: int) -> npt.NDArray[np.float64]:
        """``n`` rows of the baseline itself (without replacement): no drift by construction."""
        pick = np.random.default_rng(seed).permutation(self.rows.shape[0])[:n]
        out: npt.NDArray[np.float64] = self.rows[pick].copy()
        return out

    def shifted(self, n: int, seed: int, feature: int = 0) -> npt.NDArray[np.float64]:
        data = self.in_distribution(n, seed)
        data[:, feature] += 2.0 * self.rows[:, feature].std()
        return data

    def evaluate(self, until: datetime) -> None:
        async def run() -> None:
            async with self.api.server.db.session() as session:
                await evaluate_fleet(session, self.api.server.manifests, until, HOUR)

        self.api.call(run())

    def run_pass(
        self, until: datetime, notify: Callable[[str, AlertRow], None] | None = None
    ) -> Evaluation:
        """One pass of the server's alert job (evaluate, commit, log, ``notify``) at ``until``."""
        server = self.api.server
        return self.api.call(
            evaluate_once(
                server.db,
                server.metrics,
                server.manifests,
                HOUR.total_seconds(),
                notify=notify,
                until=until,
            )
        )

    def send(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """One API request (as admin unless ``token``); its status and decoded answer."""
        r = self.api.request(method, f"{V}{path}", token=token or self.admin, json=body)
        return r.status, json.loads(r.data)

    def label(self, counts: dict[str, tuple[int, int]]) -> None:
        """Posts labels for windows: for each window id, how many predictions of the first
        class were right and how many were wrong (the second class was the actual)."""
        classes = self.manifest.classes or []
        windows = [
            {
                "window_id": window_id,
                "labels": [
                    {"actual": classes[0], "predicted": classes[0], "count": right},
                    {"actual": classes[1], "predicted": classes[0], "count": wrong},
                ],
            }
            for window_id, (right, wrong) in counts.items()
        ]
        status, stored = self.send("POST", "/labels", {"windows": windows})
        assert status == 200, stored

    def token(self, name: str, role: str) -> str:
        status, created = self.send("POST", "/tokens", {"name": name, "role": role})
        assert status == 201, created
        token: str = created["token"]
        return token

    def alerts(self, device_id: str, kind: str | None = None) -> list[AlertRow]:
        """The device's alerts, oldest first; only those of one kind if ``kind`` is given."""

        async def load() -> list[AlertRow]:
            statement = select(AlertRow).where(
                AlertRow.scope == "device", AlertRow.scope_value == device_id
            )
            if kind is not None:
                statement = statement.where(AlertRow.kind == kind)
            async with self.api.server.db.session() as session:
                return list((await session.scalars(statement.order_by(AlertRow.id))).all())

        return self.api.call(load())


def listed_tests(alert: AlertRow | dict[str, Any]) -> dict[str, list[str]]:
    """A drift alert's features by name, each with the tests that list it."""
    evidence = alert.evidence if isinstance(alert, AlertRow) else alert["evidence"]
    return {f["name"]: f["reasons"] for f in evidence["features"]}


def figures(alert: AlertRow, feature: str, reason: str) -> dict[str, Any]:
    """The statistics a drift alert shows for one test of one feature."""
    (entry,) = [f for f in alert.evidence["features"] if f["name"] == feature]
    found: dict[str, Any] = entry["tests"][reason]
    return found


def drift_fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    **settings: Any,
) -> Iterator[DriftFleet]:
    """A :class:`DriftFleet` on the database ``request.param`` names; ``settings`` configure
    its server (:class:`fleet_server.config.ServerConfig` fields)."""
    tmp = tmp_path_factory.mktemp(f"drift-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url, **settings)
        try:
            repo = ImageRepository(tmp / "repo")
            repo.create(session_keys)
            repo.add_bundle(bundles["v1"], session_keys)
            files = repository_files(repo.path)
            r = api.request("POST", f"{V}/releases", token=api.admin_token, json={"files": files})
            assert r.status == 201, r.data
            with bundles["v1"].open("rb") as source:
                manifest = read_manifest(source)
            rows = np.load(MODELS / "baseline.npy").astype(np.float64)
            yield DriftFleet(api, api.admin_token, manifest, rows)
        finally:
            api.close()
