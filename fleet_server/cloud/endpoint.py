"""The cloud endpoint process: HTTP site, model refresh and quota refresh, on one event loop.

Background jobs (each owned by the endpoint, stopped on shutdown):

- every ``model_refresh_s``: verify the image repository and load new releases
  (in a thread: python-tuf and the interpreter block);
- every ``settings_refresh_s``: read current plans' quotas and the capacity
  from the database.

A failed refresh is logged and the previous state kept: the endpoint serves
on with what it last verified and last read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.cloud.auth import DeviceAuthenticator
from fleet_server.cloud.config import CloudConfig
from fleet_server.cloud.metrics import CloudMetrics
from fleet_server.cloud.models import Loader, ModelSource
from fleet_server.cloud.routes import make_app
from fleet_server.cloud.service import CloudService
from fleet_server.cloud.store import configured_capacity, current_quotas
from fleet_server.db.engine import Database
from fleet_server.devices.store import authenticate_device
from model_runtime import TFLiteRuntime

logger = logging.getLogger(__name__)


class CloudEndpoint:
    """One cloud endpoint: :meth:`start`, then :meth:`stop` (or :meth:`run` until an event)."""

    def __init__(
        self,
        config: CloudConfig,
        *,
        database: Database | None = None,
        loader: Loader | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.database = database or Database(config.db_url)
        self._owns_database = database is None
        self.metrics = CloudMetrics()
        self._clock = clock
        self._wall_clock = wall_clock
        if loader is None:
            runtime = TFLiteRuntime(num_threads=config.interpreter_threads)
            loader = runtime.load
        self.source = ModelSource(
            repository=config.repository,
            trusted_root=config.trusted_root,
            metadata_dir=config.metadata_dir,
            hardware_id=config.hardware_id,
            loader=loader,
        )
        self.service = CloudService(
            config,
            authenticator=DeviceAuthenticator(self._check, ttl_s=config.auth_cache_s, clock=clock),
            metrics=self.metrics,
            clock=clock,
        )
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = config.http_port
        self._refresh_lock = asyncio.Lock()

    async def _check(self, device_id: str, password: str) -> bool:
        async with self.database.session() as session:
            return await authenticate_device(session, device_id, password)

    async def refresh_models(self) -> None:
        """Verify the repository now and serve what changed (refusals are counted, not raised)."""
        async with self._refresh_lock:
            report = await asyncio.to_thread(self.source.refresh)
            self.service.serve(self.source.models, report)

    async def refresh_settings(self) -> None:
        """Read quotas and capacity now; a database error keeps the last reading."""
        try:
            async with self.database.session() as session:
                quotas = await current_quotas(session, self._wall_clock())
                capacity = await configured_capacity(session)
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("cannot read cloud quotas; keeping the last ones: %s", exc)
            return
        self.service.set_quotas(quotas, capacity)

    async def start(self) -> None:
        """Load models and quotas once, then listen and keep both fresh."""
        await self.refresh_models()
        await self.refresh_settings()
        app = make_app(self.service)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(
            self._runner, self.config.http_host, self.config.http_port, ssl_context=context
        )
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._tasks = [
            asyncio.create_task(
                self._every(self.config.model_refresh_s, self.refresh_models), name="cloud-models"
            ),
            asyncio.create_task(
                self._every(self.config.settings_refresh_s, self._settings_tick),
                name="cloud-settings",
            ),
        ]
        logger.info(
            "cloud endpoint on %s:%s serving %s",
            self.config.http_host,
            self.port,
            ", ".join(f"{m.name} {m.version}" for m in self.source.models.values())
            or "nothing yet",
        )

    async def _settings_tick(self) -> None:
        await self.refresh_settings()
        self.service.book.forget_idle(self._clock())

    async def _every(self, interval: float, job: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = job()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a job that fails must not stop the endpoint
                logger.exception("cloud endpoint job failed; it runs again next interval")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.service.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._owns_database:
            with contextlib.suppress(Exception):
                await self.database.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{self.config.http_host}:{self.port}"
