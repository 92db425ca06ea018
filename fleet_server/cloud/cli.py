"""``fleet-server cloud``: runs the cloud inference endpoint.

    fleet-server cloud --data DIR --trusted-root ROOT.json [--repository URL|DIR] [--db URL]
                       [--http HOST:PORT] [--hardware-id ID] ...

It serves, over the Open Inference Protocol, the newest bundle of each model
name released for its hardware id (default ``cloud``) in the image
repository, verified from the trusted root as a device verifies; devices
authenticate with HTTP Basic (device id, credential) against the fleet's
database, which also holds their quotas and the endpoint's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from fleet_server.cli import _address
from fleet_server.cloud.config import CloudConfig

_FLAGS = {
    "db_url": "--db",
    "repository": "--repository",
    "trusted_root": "--trusted-root",
    "metadata_dir": "--metadata-dir",
    "hardware_id": "--hardware-id",
    "http_host": "--http",
    "http_port": "--http",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "model_refresh_s": "--model-refresh",
    "settings_refresh_s": "--settings-refresh",
    "auth_cache_s": "--auth-cache",
    "max_batch_size": "--max-batch-size",
    "max_batch_wait_s": "--max-batch-wait",
    "max_queue": "--max-queue",
    "interpreter_threads": "--interpreter-threads",
    "capacity": "--capacity",
    "default_quota_rate": "--default-quota-rate",
    "default_quota_burst": "--default-quota-burst",
}

# Flag -> configuration field, for the optional ones passed through when given.
_OPTIONAL = {
    "hardware_id": "hardware_id",
    "model_refresh": "model_refresh_s",
    "settings_refresh": "settings_refresh_s",
    "auth_cache": "auth_cache_s",
    "max_batch_size": "max_batch_size",
    "max_batch_wait": "max_batch_wait_s",
    "max_queue": "max_queue",
    "interpreter_threads": "interpreter_threads",
    "capacity": "capacity",
    "default_quota_rate": "default_quota_rate",
    "default_quota_burst": "default_quota_burst",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-server cloud",
        description=__doc__.splitlines()[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fleet-server cloud --data /var/lib/edgefleet-server "
        "--trusted-root /etc/edgefleet/root.json\n"
        "  fleet-server cloud --data /var/lib/edgefleet-cloud --db postgresql://fleet@db/fleet "
        "--repository https://repo.example/ --trusted-root root.json --http 0.0.0.0:8090 "
        "--max-batch-size 64 --max-batch-wait 0.005 --capacity 500",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="the endpoint's folder: verified metadata and downloaded bundles (DATA/cloud), "
        "and the server's SQLite database and image repository by default",
    )
    parser.add_argument("--db", help="database URL (default: DATA/fleet.db, as fleet-server's)")
    parser.add_argument(
        "--repository",
        help="the image repository, http(s)://... or a directory (default: DATA/repository)",
    )
    parser.add_argument(
        "--trusted-root",
        required=True,
        help="the image repository's root.json this endpoint trusts (as a device is provisioned)",
    )
    parser.add_argument(
        "--metadata-dir", help="where verified metadata is kept (default: DATA/cloud/metadata)"
    )
    parser.add_argument(
        "--hardware-id", help="serve the bundles released for this hardware id (default: cloud)"
    )
    parser.add_argument(
        "--http",
        type=_address,
        default=("127.0.0.1", 8090),
        help="HOST:PORT to listen on (default 127.0.0.1:8090)",
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the private key (PEM) of --tls-cert")
    parser.add_argument(
        "--model-refresh",
        type=float,
        metavar="SECONDS",
        help="how often releases are verified and loaded (default 60)",
    )
    parser.add_argument(
        "--settings-refresh",
        type=float,
        metavar="SECONDS",
        help="how often quotas and capacity are read from the database (default 5)",
    )
    parser.add_argument(
        "--auth-cache",
        type=float,
        metavar="SECONDS",
        help="how long a checked device credential is trusted (default 60)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="ROWS",
        help="rows in one interpreter call at most (default 32; 1 turns batching off)",
    )
    parser.add_argument(
        "--max-batch-wait",
        type=float,
        metavar="SECONDS",
        help="how long a batch waits for more requests after its first (default 0.005)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        metavar="REQUESTS",
        help="requests waiting per model before 429 (default 256)",
    )
    parser.add_argument(
        "--interpreter-threads", type=int, help="threads of each model's interpreter (default 1)"
    )
    parser.add_argument(
        "--capacity",
        type=float,
        metavar="PER_SECOND",
        help="requests a second admitted in total when the database sets no capacity "
        "(fleetctl cloud capacity; default 100)",
    )
    parser.add_argument(
        "--default-quota-rate",
        type=float,
        metavar="PER_SECOND",
        help="quota of a device without a current plan (default 0.2)",
    )
    parser.add_argument(
        "--default-quota-burst",
        type=int,
        metavar="REQUESTS",
        help="burst of a device without a current plan (default 2)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> CloudConfig:
    data = Path(args.data).resolve()
    fields: dict[str, object] = {
        "db_url": args.db or f"sqlite:///{data / 'fleet.db'}",
        "repository": args.repository or str(data / "repository"),
        "trusted_root": Path(args.trusted_root),
        "metadata_dir": Path(args.metadata_dir)
        if args.metadata_dir
        else data / "cloud" / "metadata",
        "http_host": args.http[0],
        "http_port": args.http[1],
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    for flag, field in _OPTIONAL.items():
        value = getattr(args, flag)
        if value is not None:
            fields[field] = value
    return CloudConfig.model_validate(fields)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = _FLAGS.get(field, field or "configuration")
        print(
            f"fleet-server cloud: {flag}: {err['msg'].removeprefix('Value error, ')}",
            file=sys.stderr,
        )
        return 2
    if not config.trusted_root.is_file():
        print(
            f"fleet-server cloud: --trusted-root: {config.trusted_root} is not a file",
            file=sys.stderr,
        )
        return 2
    from fleet_server.cloud.endpoint import CloudEndpoint

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await CloudEndpoint(config).run(stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"fleet-server cloud: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
