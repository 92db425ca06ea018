"""The fleet server process: one event loop owning the HTTP API, MQTT ingest and publishing.

:class:`FleetServer` holds the shared parts (database, services, metrics);
:meth:`FleetServer.run` starts every long-lived task in one ``TaskGroup``
and stops them together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from aiohttp import web

from fleet_server.assignments import AssignmentService
from fleet_server.audit import anchor_once
from fleet_server.config import ServerConfig
from fleet_server.db import Database, migrate
from fleet_server.db.models import AlertRow
from fleet_server.director import DirectorRepository
from fleet_server.drift import ManifestCache, evaluate_once
from fleet_server.drift.views import alert_view
from fleet_server.drift.webhook import Notification, WebhookNotifier
from fleet_server.hybrid.service import HybridSettings, PlanService
from fleet_server.jobs import Job, run_jobs
from fleet_server.metrics import Metrics
from fleet_server.mqtt.claim import NamespaceGuard, StartRefused
from fleet_server.mqtt.link import ServerMqtt
from fleet_server.published import ReleaseService
from fleet_server.release.keys import KeyStore, init_keys, load_keys
from fleet_server.rollouts.kept import KeptAggregates
from fleet_server.rollouts.service import tick as rollout_tick
from protocol.cbpe import AccuracyPolicy
from protocol.messages import DesiredState

log = logging.getLogger(__name__)

# Director timestamps live a day; re-sign those expiring within 12 hours, hourly.
DIRECTOR_REFRESH_WITHIN = timedelta(hours=12)
DIRECTOR_REFRESH_EVERY_S = 3600.0
# Assignments committed but not signed (a signing failed) are tried again this often.
DIRECTOR_RETRY_EVERY_S = 30.0


def _director_keys(directory: Path) -> KeyStore:
    # The director's key is online by design (Uptane): the server creates and holds it.
    if (directory / "keys.json").exists():
        return load_keys(directory)
    return init_keys(directory)


class FleetServer:
    """Everything one server replica shares between its tasks."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.db_url)
        self.metrics = Metrics()
        self.releases = ReleaseService(config.repository_dir)
        self.manifests = ManifestCache(self.releases.repository)
        # The hourly aggregates' sums the rollout controller keeps between its ticks.
        self.kept_aggregates = KeptAggregates()
        director = DirectorRepository(config.director_dir)
        keys = _director_keys(config.director_keys_dir)
        if not director.exists():
            director.create(keys)
        self.mqtt = ServerMqtt(config, self.db, self.metrics) if config.mqtt_url else None
        self.assignments = AssignmentService(director, keys, self._publish_desired)
        self.plans = PlanService(
            director,
            keys,
            self.manifests,
            hybrid_settings(config),
            self.assignments.announce_changed,
        )
        self.http_port: int | None = None
        self._next_director_upkeep = 0.0  # the first upkeep runs at start
        self.notifier = self._alert_notifier()

    def _alert_notifier(self) -> WebhookNotifier | None:
        config = self.config
        if config.alert_webhook_url is None or config.alert_webhook_secret is None:
            return None
        return WebhookNotifier(
            url=config.alert_webhook_url,
            secret=config.alert_webhook_secret.get_secret_value().encode(),
            metrics=self.metrics,
            attempts=config.alert_webhook_attempts,
            backoff_s=config.alert_webhook_backoff_s,
            timeout_s=config.alert_webhook_timeout_s,
        )

    def notify_alert(self, change: str, row: AlertRow) -> None:
        """Queue the webhook notification of an alert this replica opened or closed."""
        if self.notifier is not None:
            alert = alert_view(row).model_dump(mode="json")
            self.notifier.notify(Notification(f"alert.{change}", alert))

    async def _publish_desired(self, desired: DesiredState) -> None:
        if self.mqtt is not None:
            await self.mqtt.publish_desired(desired)

    def app(self) -> web.Application:
        from fleet_server.api.app import build_app

        return build_app(self)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set.

        Raises :class:`~fleet_server.mqtt.claim.StartRefused` before serving
        anything when the broker is unreachable, the namespace belongs to
        another deployment, the replica id is in use, or the HTTP address
        cannot be listened on (busy port, no such interface).
        """
        guard = NamespaceGuard(self.config) if self.mqtt is not None else None
        if guard is not None:
            try:
                await guard.start()
            except BaseException:
                await self.db.close()
                raise
        try:
            async with self.db.session() as session:
                await self.releases.index(session)
            runner = web.AppRunner(self.app(), access_log=None)
            await runner.setup()
        except BaseException:
            if guard is not None:
                await guard.close()
            raise
        ssl_context = None
        if self.config.tls_cert and self.config.tls_key:
            from fleet_server.tls import server_context

            ssl_context = server_context(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(
            runner, self.config.http_host, self.config.http_port, ssl_context=ssl_context
        )
        try:
            await site.start()
        except OSError as exc:
            # A busy or forbidden address is the operator's to change, not a crash.
            await runner.cleanup()
            if guard is not None:
                await guard.close()
            await self.db.close()
            raise StartRefused(
                "--http",
                f"cannot listen on {self.config.http_host}:{self.config.http_port}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}",
            ) from exc
        server = cast("asyncio.Server | None", site._server)
        sockets = server.sockets if server else ()
        self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http_port
        log.info(
            "fleet server %s listening on %s:%s",
            self.config.replica_id,
            self.config.http_host,
            self.http_port,
        )
        log.info(
            "dashboard: %s://%s:%s/dashboard",
            "https" if self.config.tls_cert else "http",
            self.config.http_host,
            self.http_port,
        )
        refused: list[StartRefused] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                if self.mqtt is not None and guard is not None:
                    tasks.create_task(self._guard(guard, stop, refused))
                    tasks.create_task(self.mqtt.run(stop))
                tasks.create_task(run_jobs(self.jobs(), stop))
                if self.notifier is not None:
                    tasks.create_task(self.notifier.run(stop))
                await stop.wait()
        finally:
            await runner.cleanup()
            await self.db.close()
        if refused:
            raise refused[0]

    @staticmethod
    async def _guard(
        guard: NamespaceGuard, stop: asyncio.Event, refused: list[StartRefused]
    ) -> None:
        """Run the namespace guard; a refusal it meets stops the server like a signal would.

        Cancelling the other tasks instead would cut database work off mid-transaction.
        """
        try:
            await guard.run(stop)
        except StartRefused as exc:
            refused.append(exc)
            stop.set()

    def jobs(self) -> list[Job]:
        """The server's periodic work, each with its interval (see :mod:`fleet_server.jobs`)."""
        from fleet_server.mqtt.ingest import sweep_offline

        return [
            # Devices whose heartbeats stopped go offline (the last will covers clean cases).
            Job(
                "presence sweep",
                5.0,
                lambda: sweep_offline(self.db, self.metrics, self.config.heartbeat_timeout_s),
            ),
            Job("director upkeep", DIRECTOR_RETRY_EVERY_S, self._director_step),
            Job(
                "checking the audit log against its head",
                self.config.audit_anchor_interval_s,
                self._audit_anchor,
                at_stop=True,
            ),
            Job(
                "drift alert evaluation",
                self.config.drift_interval_s,
                lambda: evaluate_once(
                    self.db,
                    self.metrics,
                    self.manifests,
                    self.config.drift_range_s,
                    AccuracyPolicy(max_drop=self.config.accuracy_max_drop),
                    self.notify_alert,
                ),
            ),
            Job("rollout controller", self.config.rollout_interval_s, self._rollout_tick),
            Job("hybrid planning", self.config.hybrid_interval_s, lambda: self.plans.step(self.db)),
        ]

    async def _rollout_tick(self) -> None:
        """Every active rollout's next step, by one replica at a time (:func:`rollouts.tick`)."""
        await rollout_tick(
            self.db, self.assignments, datetime.now(UTC), self.manifests, self.kept_aggregates
        )

    async def _director_step(self) -> None:
        """Keep every device's director metadata in line with the database, fresh and small.

        At start and hourly: sign what was committed but not signed (the
        process died between an assignment's commit and its signing; a signing
        that failed while the server ran is retried every 30 s), re-sign
        timestamps that expire within 12 hours (they live a day), and prune
        metadata versions no device can still need. Several replicas may do
        this at once: each signing is atomic, never goes below the signed
        version, and the result is equivalent, so it costs a little work and
        breaks nothing.
        """
        if time.monotonic() >= self._next_director_upkeep:
            self._next_director_upkeep = time.monotonic() + DIRECTOR_REFRESH_EVERY_S
            await self._director_maintenance()
        elif self.assignments.unsigned:
            try:
                await self.assignments.sync(self.db, sorted(self.assignments.unsigned))
            except Exception:
                log.exception("signing committed assignments failed")

    async def _audit_anchor(self) -> None:
        """Check the audit log against the recorded head (at start, periodically and at stop).

        Each check that holds moves the server's head record on, so deleting
        the newest entries through the database alone is found by the next
        check, whether or not an operator saved an anchor since.
        """
        report = await anchor_once(self.db, self.config.data_dir)
        self.metrics.audit_chain_intact.set(1 if report.ok else 0)
        if not report.ok:
            log.error("audit log broken at entry %s: %s", report.broken_at, report.problem)

    async def _director_maintenance(self) -> None:
        try:
            signed = await self.assignments.sync(self.db)
            if signed:
                log.info("signed %d committed assignments the director lacked", signed)
        except Exception:
            log.exception("bringing the director in line with the database failed")
        try:
            count = await asyncio.to_thread(
                self.assignments.director.refresh_expiring,
                self.assignments.keys,
                DIRECTOR_REFRESH_WITHIN,
            )
            if count:
                log.info("re-signed %d director timestamps", count)
            pruned = await asyncio.to_thread(self.assignments.director.prune_all)
            if pruned:
                log.info("pruned %d superseded director metadata files", pruned)
        except Exception:
            log.exception("re-signing or pruning director metadata failed")


def hybrid_settings(config: ServerConfig) -> HybridSettings:
    """The planning service's settings from the server's configuration."""
    ttl = timedelta(seconds=config.hybrid_plan_ttl_s)
    return HybridSettings(
        ttl=ttl,
        renew_before=ttl * 0.3,
        lookback=timedelta(seconds=config.hybrid_lookback_s),
        default_capacity=config.hybrid_capacity,
        default_headroom=config.hybrid_headroom,
        audit_rate=config.hybrid_audit_rate,
        cloud_model=config.hybrid_cloud_model,
    )


def prepare(config: ServerConfig) -> None:
    """Bring the database schema up to date (blocking; before the event loop starts)."""
    migrate(config.db_url)
