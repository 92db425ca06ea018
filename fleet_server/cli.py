"""``fleet-server``: runs one fleet server replica.

    fleet-server --data DIR [--db URL] [--mqtt URL] [--mqtt-namespace NS] [--http HOST:PORT]
    fleet-server cloud --data DIR --trusted-root ROOT.json ...   (the cloud endpoint)

Defaults need no set-up: SQLite in DIR, no broker. Run several replicas on
one PostgreSQL and one broker to scale out: they split the MQTT ingest with a
shared subscription and all serve the API. Every deployment talks on its own
MQTT topic namespace (by default derived from its database, so the replicas of
one database agree on it); a server whose namespace another deployment holds
on the broker, or whose replica id a running replica uses, is refused at start.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fleet_server.config import ServerConfig
from protocol.cli import edgefleet_version

# The flag behind each configuration field, so that a refusal names what to change.
_FLAGS = {
    "data_dir": "--data",
    "db_url": "--db",
    "mqtt_url": "--mqtt",
    "mqtt_namespace": "--mqtt-namespace",
    "mqtt_ca_file": "--mqtt-ca-file",
    "http_host": "--http",
    "http_port": "--http",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "replica_id": "--replica-id",
    "alert_webhook_url": "--alert-webhook",
    "alert_webhook_secret": "--alert-webhook-secret-file",
}


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-server",
        description=__doc__.splitlines()[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="On first start it writes an admin API token to DATA/admin.token.\n"
        "Every setting is a flag; the only environment variables it reads are\n"
        "EDGEFLEET_ALERT_WEBHOOK and EDGEFLEET_ALERT_WEBHOOK_SECRET_FILE, the defaults\n"
        "of --alert-webhook and --alert-webhook-secret-file.\n\n"
        "The cloud inference endpoint runs as its own process: fleet-server cloud --help.\n\n"
        "examples:\n"
        "  fleet-server --data /var/lib/edgefleet-server\n"
        "  fleet-server --data /var/lib/edgefleet-server --db postgresql://fleet@db/fleet "
        "--mqtt mqtt://broker:1883 --http 0.0.0.0:8080 --replica-id a\n"
        "  fleet-server --data /var/lib/edgefleet-server --mqtt mqtts://broker:8883 "
        "--mqtt-ca-file ca.pem --mqtt-username fleet --mqtt-password-file fleet.pw "
        "--tls-cert server.pem --tls-key server.key",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="the server's folder: image repository, director metadata and keys, audit key, "
        "admin.token, and the SQLite database by default",
    )
    parser.add_argument(
        "--db", help="database URL, sqlite:///PATH or postgresql://... (default: DATA/fleet.db)"
    )
    parser.add_argument(
        "--mqtt", help="broker URL, mqtt://host:port or mqtts://host:port (default: no broker)"
    )
    parser.add_argument(
        "--mqtt-namespace",
        help="this deployment's MQTT topic namespace (default: derived from the database; "
        "every replica of one deployment must use the same)",
    )
    parser.add_argument("--mqtt-username", help="the server's MQTT username")
    parser.add_argument("--mqtt-password-file", help="file holding the server's MQTT password")
    parser.add_argument(
        "--mqtt-ca-file", help="CA (PEM) to verify an mqtts:// broker (default: the system's)"
    )
    parser.add_argument(
        "--no-shared-subscription",
        action="store_true",
        help="for brokers without $share (one replica only)",
    )
    parser.add_argument(
        "--http",
        type=_address,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to listen on (default 127.0.0.1:8080)",
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the private key (PEM) of --tls-cert")
    parser.add_argument(
        "--replica-id",
        help="this replica's id, the same across its restarts, so the broker keeps its messages "
        "while it is down (default: HOST-PID, a new one every start)",
    )
    parser.add_argument(
        "--ingest-batch-delay",
        type=float,
        metavar="SECONDS",
        help="how long device messages gather into one write (default 0.05); longer batches "
        "mean fewer transactions and more messages held unacknowledged",
    )
    parser.add_argument(
        "--rollout-interval",
        type=float,
        metavar="SECONDS",
        help="how often every active rollout is judged and takes its next step (default 60); "
        "one replica at a time does it",
    )
    parser.add_argument(
        "--drift-interval",
        type=float,
        metavar="SECONDS",
        help="how often drift alerts are updated from the stored windows (default 60)",
    )
    _hybrid_flags(parser)
    _alert_webhook_flags(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="debug logging, and the database migrations' own lines",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {edgefleet_version()}")
    return parser


def _alert_webhook_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alert-webhook",
        metavar="URL",
        default=os.environ.get("EDGEFLEET_ALERT_WEBHOOK") or None,
        help="POST alert notifications (opened, closed; not acknowledged or silenced ones) "
        "as signed JSON to this URL (default: $EDGEFLEET_ALERT_WEBHOOK)",
    )
    parser.add_argument(
        "--alert-webhook-secret-file",
        metavar="FILE",
        default=os.environ.get("EDGEFLEET_ALERT_WEBHOOK_SECRET_FILE") or None,
        help="file holding the shared secret the webhook's X-Edgefleet-Signature "
        "(HMAC-SHA256) is made with; required with --alert-webhook "
        "(default: $EDGEFLEET_ALERT_WEBHOOK_SECRET_FILE)",
    )


def _alert_webhook_fields(args: argparse.Namespace) -> dict[str, object]:
    if args.alert_webhook is None:
        return {}
    path = args.alert_webhook_secret_file
    if not path:
        raise ValueError(
            "--alert-webhook-secret-file: required with --alert-webhook (the receiver "
            "verifies each notification's signature with that shared secret)"
        )
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(
            f"--alert-webhook-secret-file: cannot read {path}: {exc.strerror}"
        ) from None
    if not secret:
        raise ValueError(f"--alert-webhook-secret-file: {path} is empty")
    return {"alert_webhook_url": args.alert_webhook, "alert_webhook_secret": secret}


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    data = Path(args.data).resolve()
    fields: dict[str, object] = {
        "data_dir": data,
        "db_url": args.db or f"sqlite:///{data / 'fleet.db'}",
        "mqtt_url": args.mqtt,
        "mqtt_namespace": args.mqtt_namespace,
        "mqtt_username": args.mqtt_username,
        "mqtt_password": (
            Path(args.mqtt_password_file).read_text().strip() if args.mqtt_password_file else None
        ),
        "mqtt_ca_file": args.mqtt_ca_file,
        "shared_subscription": not args.no_shared_subscription,
        "http_host": args.http[0],
        "http_port": args.http[1],
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    if args.replica_id:
        fields["replica_id"] = args.replica_id
    if args.ingest_batch_delay is not None:
        fields["ingest_batch_delay_s"] = args.ingest_batch_delay
    if args.rollout_interval is not None:
        fields["rollout_interval_s"] = args.rollout_interval
    if args.drift_interval is not None:
        fields["drift_interval_s"] = args.drift_interval
    fields |= _alert_webhook_fields(args)
    fields |= _hybrid_fields(args)
    return ServerConfig.model_validate(fields)


def _hybrid_flags(parser: argparse.ArgumentParser) -> None:
    hybrid = parser.add_argument_group("hybrid inference plans")
    hybrid.add_argument(
        "--plan-interval",
        type=float,
        metavar="SECONDS",
        help="how often every device's plan is checked against what it reports and made "
        "again where needed (default 30); one replica at a time does it",
    )
    hybrid.add_argument(
        "--plan-ttl",
        type=float,
        metavar="SECONDS",
        help="how long a signed plan holds (default 600); plans are renewed before",
    )
    hybrid.add_argument(
        "--cloud-capacity",
        type=float,
        metavar="REQUESTS_PER_S",
        help="the cloud's capacity until an operator sets one (fleetctl cloud capacity); "
        "default 0: no plans, nothing leaves a device",
    )
    hybrid.add_argument(
        "--cloud-model", metavar="NAME", help="the cloud model's name at the endpoint"
    )


def _hybrid_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for flag, field in (
        ("plan_interval", "hybrid_interval_s"),
        ("plan_ttl", "hybrid_plan_ttl_s"),
        ("cloud_capacity", "hybrid_capacity"),
        ("cloud_model", "hybrid_cloud_model"),
    ):
        value = getattr(args, flag)
        if value is not None:
            fields[field] = value
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["cloud"]:
        from fleet_server.cloud.cli import main as cloud_main

        return cloud_main(given[1:])
    args = build_parser().parse_args(given)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Alembic narrates every plugin and upgrade step at every start; an operator needs
        # those lines only when a migration misbehaves.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = _FLAGS.get(field, field or "configuration")
        print(f"fleet-server: {flag}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fleet-server: {exc}", file=sys.stderr)
        return 1
    from fleet_server.mqtt.claim import StartRefused
    from fleet_server.server import FleetServer, prepare

    config.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        prepare(config)
    except (SQLAlchemyError, OSError) as exc:
        print(
            f"fleet-server: --db: cannot use the database at {_shown_url(config.db_url)}: "
            f"{_reason(exc)}",
            file=sys.stderr,
        )
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await FleetServer(config).run(stop)

    # What start-up made (modules, the ORM's mappers, pydantic's schemas) lives as long as the
    # process: out of the collector's reach, a full collection walks only what came after. A
    # young generation of 20,000 objects rather than 700: ingest holds a few thousand messages
    # in flight, which a small one collects again and again and promotes to be walked again.
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)
    try:
        asyncio.run(run())
    except StartRefused as exc:
        print(f"fleet-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _shown_url(url: str) -> str:
    """``url`` with any password masked, for a message an operator may paste elsewhere."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _reason(exc: BaseException) -> str:
    """The driver's own words for a database failure, without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        exc = orig
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
