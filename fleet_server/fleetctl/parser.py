"""``fleetctl``'s command line: the top level, and the commands each module adds, in order."""

from __future__ import annotations

import argparse

from fleet_server.fleetctl.commands import add_group
from fleet_server.fleetctl.release_engineering import broker, bundle, keys, release
from fleet_server.fleetctl.remote import (
    alerts,
    assignments,
    audit,
    devices,
    director,
    drift,
    labels,
    plans,
    releases,
    rollouts,
    tokens,
)
from fleet_server.fleetctl.remote.client import remote_flags
from fleet_server.fleetctl.render import JSON_HELP, json_flag
from protocol.cli import CommandParser, edgefleet_version, examples

DESCRIPTION = "fleetctl: the release engineer's and operator's command-line tool."


def build_parser() -> argparse.ArgumentParser:
    """Every ``fleetctl`` command; ``--help`` lists the groups in the order added here."""
    parser = CommandParser(
        prog="fleetctl",
        description=DESCRIPTION,
        epilog="Commands marked (server) talk to a fleet server: --server URL or "
        "EDGEFLEET_SERVER,\nand an API token from --token-file, --token-env VAR or "
        "EDGEFLEET_TOKEN.\nEach command's --help shows its options and examples.\n\n"
        + examples(
            "fleetctl keys init --dir keys",
            "fleetctl devices list --server http://127.0.0.1:8080",
        ),
    )
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {edgefleet_version()}")
    local = [json_flag()]
    server = [*local, remote_flags()]
    # Not required: ``fleetctl`` alone prints the groups (main) rather than "required: group".
    groups = parser.add_subparsers(dest="group", title="commands", metavar="COMMAND")

    keys.add_commands(groups, local)
    bundle.add_commands(groups, local)
    release_group = add_group(groups, "release", "the image repository")
    release.add_commands(release_group, local)
    releases.add_commands(release_group, server)
    devices.add_commands(groups, server)
    tokens.add_provisioning_commands(groups, server)
    director.add_commands(groups, server)
    assignments.add_commands(groups, server)
    audit.add_commands(groups, server)
    tokens.add_commands(groups, server)
    drift.add_commands(groups, server)
    alerts.add_commands(groups, server)
    labels.add_commands(groups, server)
    rollouts.add_commands(groups, server)
    plans.add_commands(groups, server)
    broker.add_commands(groups, local)
    return parser
