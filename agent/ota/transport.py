"""Fetching repository files over HTTP(S) or from a local directory.

One fetcher serves both python-tuf (metadata, through ``FetcherInterface``)
and the agent's own target download (which needs HTTP Range to resume). Slow
retrieval is bounded two ways: a read timeout between bytes, and a minimum
average speed enforced once a grace period has passed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuf.api import exceptions as tuf_exc

from agent.ota.location import is_local as is_local
from agent.ota.location import local_path as local_path
from agent.ota.tuf_client import FetcherInterface

if TYPE_CHECKING:
    import urllib3


@dataclass(frozen=True)
class FetchConfig:
    """Timeouts and speed limits for every download."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    min_bytes_per_second: float = 2048.0
    grace_seconds: float = 10.0
    chunk_size: int = 1 << 20
    ca_file: str | None = None
    # HTTP Basic credentials (device id, password) for servers that host per device.
    auth: tuple[str, str] | None = None


@dataclass(frozen=True)
class Stream:
    """An open download: its chunks and the offset the first chunk starts at."""

    chunks: Iterator[bytes]
    offset: int


class RepositoryFetcher(FetcherInterface):
    """Fetches ``http(s)://`` URLs with urllib3 and ``file://`` URLs from disk.

    urllib3 is imported on the first HTTP request: a directory repository needs none of it.
    """

    def __init__(self, config: FetchConfig | None = None) -> None:
        self.config = config or FetchConfig()
        self._pool: urllib3.PoolManager | None = None

    @property
    def _http(self) -> urllib3.PoolManager:
        if self._pool is None:
            import urllib3

            self._pool = urllib3.PoolManager(
                ca_certs=self.config.ca_file,
                retries=False,
                timeout=urllib3.Timeout(
                    connect=self.config.connect_timeout, read=self.config.read_timeout
                ),
            )
        return self._pool

    @_http.setter
    def _http(self, pool: urllib3.PoolManager) -> None:
        self._pool = pool

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.open(url).chunks

    def open(self, url: str, offset: int = 0) -> Stream:
        """Open ``url`` from byte ``offset`` (HTTP Range); the server may restart at 0."""
        if is_local(url):
            return self._open_file(local_path(url), offset)
        import urllib3

        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if self.config.auth is not None:
            headers.update(urllib3.make_headers(basic_auth=":".join(self.config.auth)))
        try:
            response = self._http.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.NewConnectionError as exc:
            # Checked first: urllib3 makes a refused connection a kind of timeout.
            raise tuf_exc.DownloadError(f"{url}: cannot connect ({exc})") from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: no answer in time") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        if response.status == 416 and offset:
            response.release_conn()
            return self.open(url, 0)
        if response.status >= 400:
            response.release_conn()
            raise tuf_exc.DownloadHTTPError(
                f"{url} answered HTTP {response.status}", response.status
            )
        start = offset if response.status == 206 else 0
        return Stream(self._paced(self._http_chunks(url, response)), start)

    def _http_chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        import urllib3

        completed = False
        try:
            # read1 returns what has arrived instead of waiting for a full chunk,
            # so a trickling server is measured (and refused) while it trickles.
            while chunk := response.read1(self.config.chunk_size):
                yield chunk
            completed = True
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: the server stalled") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        finally:
            if completed:
                response.drain_conn()  # the end of a chunked body, so the connection is clean
                response.release_conn()
            else:
                response.close()  # never hand a half-read connection back to the pool

    def _open_file(self, path: Path, offset: int) -> Stream:
        try:
            f = path.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise tuf_exc.DownloadHTTPError(f"{path} does not exist", 404) from None
        except OSError as exc:
            raise tuf_exc.DownloadError(f"cannot read {path}: {exc}") from exc
        size = os.fstat(f.fileno()).st_size
        start = offset if 0 < offset <= size else 0
        f.seek(start)

        def chunks() -> Iterator[bytes]:
            with f:
                while chunk := f.read(self.config.chunk_size):
                    yield chunk

        return Stream(chunks(), start)

    def _paced(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Pass chunks on, refusing a download slower than the minimum speed."""
        started = time.monotonic()
        received = 0
        for chunk in chunks:
            received += len(chunk)
            elapsed = time.monotonic() - started
            if elapsed > self.config.grace_seconds and (
                received / elapsed < self.config.min_bytes_per_second
            ):
                raise tuf_exc.SlowRetrievalError(
                    f"download at {received / elapsed:.0f} B/s, below the minimum of "
                    f"{self.config.min_bytes_per_second:.0f} B/s"
                )
            yield chunk
