"""``fleetctl broker config``: Mosquitto's configuration, confining each device to its topics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fleet_server.broker_config import (
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    BrokerTLS,
    write_broker_config,
)
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.files import read_secret
from fleet_server.fleetctl.render import emit


def _device_credential(text: str) -> tuple[str, str]:
    device_id, sep, path = text.partition(":")
    if not (sep and device_id and path):
        raise argparse.ArgumentTypeError(f"{text!r} is not DEVICE_ID:PASSWORD_FILE")
    return device_id, path


def cmd_broker_config(args: argparse.Namespace) -> None:
    devices: dict[str, str] = {}
    for device_id, path in args.device:
        if device_id in devices:
            raise CommandError(f"device {device_id} is given twice")
        devices[device_id] = read_secret(path, f"password of device {device_id}")
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_files) and not all(tls_files):
        raise CommandError("a TLS listener needs --tls-cert, --tls-key and --tls-ca together")
    tls = (
        BrokerTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca), port=args.tls_port)
        if all(tls_files)
        else None
    )
    files = write_broker_config(
        Path(args.out),
        args.server_user,
        read_secret(args.server_password_file, "server password"),
        devices,
        namespace=args.namespace,
        tls=tls,
        port=args.port,
        bind_address=args.bind,
    )
    listeners = [
        {"port": li.port, "address": li.address or "*", "tls": li.tls} for li in files.listeners
    ]
    where = ", ".join(
        f"{li['address']}:{li['port']}{' (TLS)' if li['tls'] else ''}" for li in listeners
    )
    count = f"{len(devices)} device{'' if len(devices) == 1 else 's'}"
    emit(
        args,
        {
            "conf": str(files.conf),
            "passwd": str(files.passwd),
            "acl": str(files.acl),
            "server_user": args.server_user,
            "namespace": args.namespace,
            "devices": sorted(devices),
            "listeners": listeners,
        },
        f"Wrote {files.conf}, {files.passwd.name} and {files.acl.name} (mode 0600): server user "
        f"{args.server_user}, namespace {args.namespace}, {count}, listening on {where}\n"
        f"Run the broker with: mosquitto -c {files.conf}",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``broker config``."""
    broker = add_group(groups, "broker", "the MQTT broker (Mosquitto 2)")
    p = add_command(
        broker,
        "config",
        cmd_broker_config,
        parents,
        "write mosquitto.conf, passwd and acl confining each device to its own topics",
        "fleetctl broker config --out broker/ --server-user fleet --server-password-file "
        "server.pw --namespace fleet-3c5a0e9d21b7 --device pump-17:pump-17.pw",
        "fleetctl broker config --out broker/ --server-user fleet --server-password-file "
        "server.pw --namespace plant-7 --device pump-17:pump-17.pw --tls-cert broker.pem "
        "--tls-key broker.key --tls-ca ca.pem",
    )
    p.add_argument("--out", required=True, help="directory for mosquitto.conf, passwd and acl")
    p.add_argument("--server-user", required=True, help="the fleet server's MQTT username")
    p.add_argument(
        "--namespace",
        required=True,
        help="the deployment's MQTT topic namespace (fleet-server logs it at start, and "
        "fleetctl devices register shows it)",
    )
    p.add_argument(
        "--server-password-file", required=True, help="file holding the server's MQTT password"
    )
    p.add_argument(
        "--device",
        type=_device_credential,
        action="append",
        default=[],
        metavar="ID:PASSWORD_FILE",
        help="a device and the file holding its MQTT password (repeatable)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"plain MQTT listener (default {DEFAULT_PORT}; on 127.0.0.1 only when TLS is on)",
    )
    p.add_argument("--bind", help="address the network-facing listener binds (default: all)")
    p.add_argument("--tls-cert", help="the broker's certificate chain (PEM)")
    p.add_argument("--tls-key", help="the broker's private key (PEM)")
    p.add_argument("--tls-ca", help="the CA devices trust (PEM)")
    p.add_argument(
        "--tls-port",
        type=int,
        default=DEFAULT_TLS_PORT,
        help=f"TLS listener (default {DEFAULT_TLS_PORT})",
    )
