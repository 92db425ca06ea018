"""The drift feature's background job: evaluate the fleet's alerts every interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleet_server.db.models import AlertRow
from fleet_server.drift.lifecycle import AlertChange
from fleet_server.drift.service import evaluate_once
from fleet_server.drift.store import ManifestCache
from protocol.cbpe import AccuracyPolicy

if TYPE_CHECKING:
    from fleet_server.db import Database
    from fleet_server.metrics import Metrics

log = logging.getLogger(__name__)


async def run_drift_alerts(
    db: Database,
    metrics: Metrics,
    manifests: ManifestCache,
    stop: asyncio.Event,
    interval_s: float,
    trailing_s: float,
    accuracy_policy: AccuracyPolicy | None = None,
    notify: Callable[[AlertChange, AlertRow], None] | None = None,
) -> None:
    """Every ``interval_s``, update the alerts over the trailing ``trailing_s``, until ``stop``.

    Each pass is :func:`fleet_server.drift.service.evaluate_once`; a failed one
    is logged and the next runs on time.
    """
    while not stop.is_set():
        try:
            await evaluate_once(db, metrics, manifests, trailing_s, accuracy_policy, notify)
        except Exception:
            log.exception("drift alert evaluation failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
