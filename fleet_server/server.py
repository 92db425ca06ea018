"""The fleet server process: one event loop owning the HTTP API, MQTT ingest and publishing.

:class:`FleetServer` holds the shared parts (database, services, metrics);
:meth:`FleetServer.run` starts every long-lived task in one ``TaskGroup``
and stops them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from fleet_server.assignments import AssignmentService
from fleet_server.audit import anchor_once
from fleet_server.config import ServerConfig
from fleet_server.db import Database, migrate
from fleet_server.db.models import AlertRow
from fleet_server.director import DirectorRepository
from fleet_server.drift import ManifestCache, run_drift_alerts
from fleet_server.drift.views import alert_view
from fleet_server.drift.webhook import Notification, WebhookNotifier
from fleet_server.metrics import Metrics
from fleet_server.mqtt.claim import NamespaceGuard, StartRefused
from fleet_server.mqtt.link import ServerMqtt
from fleet_server.published import ReleaseService
from fleet_server.release.keys import KeyStore, init_keys, load_keys
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
        director = DirectorRepository(config.director_dir)
        keys = _director_keys(config.director_keys_dir)
        if not director.exists():
            director.create(keys)
        self.mqtt = ServerMqtt(config, self.db, self.metrics) if config.mqtt_url else None
        self.assignments = AssignmentService(director, keys, self._publish_desired)
        self.http_port: int | None = None
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
        sockets = site._server.sockets if site._server else ()
        self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http_port
        log.info(
            "fleet server %s listening on %s:%s",
            self.config.replica_id,
            self.config.http_host,
            self.http_port,
        )
        refused: list[StartRefused] = []
        try:
            async with asyncio.TaskGroup() as tasks:
                if self.mqtt is not None and guard is not None:
                    tasks.create_task(self._guard(guard, stop, refused))
                    tasks.create_task(self.mqtt.run(stop))
                tasks.create_task(self._presence_sweeper(stop))
                tasks.create_task(self._director_refresher(stop))
                tasks.create_task(self._audit_anchorer(stop))
                tasks.create_task(
                    run_drift_alerts(
                        self.db,
                        self.metrics,
                        self.manifests,
                        stop,
                        self.config.drift_interval_s,
                        self.config.drift_range_s,
                        AccuracyPolicy(max_drop=self.config.accuracy_max_drop),
                        self.notify_alert,
                    )
                )
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

    async def _presence_sweeper(self, stop: asyncio.Event) -> None:
        """Mark devices offline whose heartbeats stopped (the last will covers clean cases)."""
        from fleet_server.mqtt.ingest import sweep_offline

        while not stop.is_set():
            try:
                await sweep_offline(self.db, self.metrics, self.config.heartbeat_timeout_s)
            except Exception:
                log.exception("presence sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)

    async def _director_refresher(self, stop: asyncio.Event) -> None:
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
        next_full = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_full:
                next_full = time.monotonic() + DIRECTOR_REFRESH_EVERY_S
                await self._director_maintenance()
            elif self.assignments.unsigned:
                try:
                    await self.assignments.sync(self.db, sorted(self.assignments.unsigned))
                except Exception:
                    log.exception("signing committed assignments failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DIRECTOR_RETRY_EVERY_S)

    async def _audit_anchorer(self, stop: asyncio.Event) -> None:
        """Check the audit log against the recorded head at start, periodically and at stop.

        Each check that holds moves the server's head record on, so deleting
        the newest entries through the database alone is found by the next
        check, whether or not an operator saved an anchor since.
        """
        while True:
            try:
                report = await anchor_once(self.db, self.config.data_dir)
            except Exception:
                log.exception("checking the audit log against its head failed")
            else:
                self.metrics.audit_chain_intact.set(1 if report.ok else 0)
                if not report.ok:
                    log.error("audit log broken at entry %s: %s", report.broken_at, report.problem)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.audit_anchor_interval_s)

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


def prepare(config: ServerConfig) -> None:
    """Bring the database schema up to date (blocking; before the event loop starts)."""
    migrate(config.db_url)
