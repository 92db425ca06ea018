"""``fleet-server``: runs the fleet server.

So far it hosts the image repository — TUF metadata and bundle targets, with
HTTP Range so devices resume interrupted downloads — under ``/repository/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web


def build_app(repository: Path) -> web.Application:
    """The server's aiohttp application."""
    app = web.Application()
    # aiohttp's static handler answers Range requests with 206 and Content-Range.
    app.router.add_static("/repository/metadata/", repository / "metadata", follow_symlinks=False)
    app.router.add_static("/repository/targets/", repository / "targets", follow_symlinks=False)
    return app


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-server", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="image repository directory")
    parser.add_argument(
        "--http",
        type=_address,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to listen on (default 127.0.0.1:8080)",
    )
    args = parser.parse_args(argv)
    repository = Path(args.repo)
    if not (repository / "metadata" / "timestamp.json").is_file():
        print(
            f"fleet-server: {repository} holds no image repository "
            "(create one with 'fleetctl release add')",
            file=sys.stderr,
        )
        return 1
    host, port = args.http
    web.run_app(build_app(repository), host=host, port=port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
