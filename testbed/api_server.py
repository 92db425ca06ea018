"""A real fleet server for tests: its aiohttp application on a free port, in a thread.

The server runs on its own event loop in a background thread, so tests talk
to it over real HTTP with blocking clients (urllib3, ``fleetctl``,
schemathesis) and can still run coroutines against its database with
:meth:`ServerThread.call`.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from aiohttp import web

from fleet_server.config import ServerConfig
from fleet_server.server import FleetServer, prepare

T = TypeVar("T")


class ServerThread:
    """``FleetServer(config).app()`` served on 127.0.0.1 until :meth:`close`."""

    def __init__(self, data_dir: Path, db_url: str, **settings: Any) -> None:
        """``settings``: other :class:`ServerConfig` fields (an alert webhook, say)."""
        self.config = ServerConfig(data_dir=data_dir, db_url=db_url, http_port=0, **settings)
        prepare(self.config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self._runner, port = self.call(self._start())
        self.url = f"http://127.0.0.1:{port}"
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(10, 30))

    async def _start(self) -> tuple[FleetServer, web.AppRunner, int]:
        server = FleetServer(self.config)
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return server, runner, int(runner.addresses[0][1])

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coroutine`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def app(self) -> web.Application:
        return self._runner.app

    @property
    def admin_token_file(self) -> Path:
        return self.config.data_dir / "admin.token"

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One request to the server (``token`` as a bearer token)."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, self.url + path, json=json, body=body, headers=all_headers)

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            await self.server.db.close()

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def repository_files(root: Path, only: set[str] | None = None) -> dict[str, str]:
    """Every file of a local image repository (or those in ``only``), base64, by path."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.name.startswith(".") and (only is None or rel in only):
            files[rel] = base64.b64encode(path.read_bytes()).decode()
    return files
