"""A real HTTP server for a repository directory, with faults a test can switch on.

Serves files with HTTP Range like a static web server; the ``faults`` let a
test make it misbehave the way a hostile or broken network does. The demo and
the benchmarks serve their image repositories and directors with
:func:`serve_directory`.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """Ways to misbehave, applied to paths containing ``match`` (all when empty)."""

    match: str = ""
    extra_bytes: int = 0  # append garbage past the real file (endless data)
    stall_after: int | None = None  # send this many bytes, then hang
    trickle_delay: float | None = None  # one byte per delay (slow retrieval)
    cut_after: int | None = None  # send this many bytes, then close (interrupted)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def applies(self, path: str) -> bool:
        return self.match in path

    def misbehaves(self) -> bool:
        """Whether any fault is switched on (Range ignored is still a well-formed answer)."""
        return bool(self.extra_bytes) or any(
            x is not None for x in (self.stall_after, self.trickle_delay, self.cut_after)
        )


class RepositoryServer:
    """Serve ``root`` on 127.0.0.1 on a free port until ``close()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = Faults()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = self.root / urllib.parse.unquote(h.path.lstrip("/").split("?")[0])
        faults = self.faults if self.faults.applies(h.path) else Faults()
        self.faults.requests.append((h.path, h.headers.get("Range")))
        if not path.is_file():
            h.send_error(404)
            return
        size = path.stat().st_size + faults.extra_bytes
        start = 0
        rng = h.headers.get("Range")
        if rng and not faults.ignore_range and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= size:
                h.send_response(416)
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(size - start))
        h.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if not faults.misbehaves():  # stream the file
                with path.open("rb") as f:
                    f.seek(start)
                    shutil.copyfileobj(f, h.wfile)
                return
            body = (path.read_bytes() + b"\0" * faults.extra_bytes)[start:]
            self._write_body(h, body, faults)

    def _write_body(self, h: BaseHTTPRequestHandler, body: bytes, faults: Faults) -> None:
        if faults.trickle_delay is not None:
            for i in range(len(body)):
                if self._stop.wait(faults.trickle_delay):
                    return
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
            return
        limit = faults.stall_after if faults.stall_after is not None else faults.cut_after
        if limit is None:
            h.wfile.write(body)
            return
        h.wfile.write(body[:limit])
        h.wfile.flush()
        if faults.stall_after is not None:
            self._stop.wait(30)
        h.close_connection = True
        time.sleep(0.01)


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free port of 127.0.0.1 until the block ends; yields its URL."""
    server = RepositoryServer(directory)
    try:
        yield server.url
    finally:
        server.close()
