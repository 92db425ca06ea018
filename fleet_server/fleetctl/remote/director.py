"""``fleetctl director root``: the root devices verify the director's metadata with."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.files import write_file
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit


def _checked_root(data: Any) -> tuple[bytes, int]:
    """The director root the server sent, as JSON text, and its version; refused unless valid.

    Devices anchor all trust in this file, so only a TUF root signed by a
    threshold of its own keys is written.
    """
    from tuf.api import exceptions as tuf_exc
    from tuf.api.metadata import Metadata, Root

    text = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
    try:
        md = Metadata.from_bytes(text)
        if not isinstance(md.signed, Root):
            raise ValueError(f"it is {md.signed.type} metadata")
        md.verify_delegate(Root.type, md)
    except (tuf_exc.RepositoryError, ValueError, TypeError, KeyError) as exc:
        raise CommandError(
            f"the server's answer is not a director root signed by its own keys: {exc}"
        ) from None
    return text, md.signed.version


def cmd_director_root(args: argparse.Namespace) -> None:
    root = api_client(args).get("/director/root")
    text, version = _checked_root(root)
    if not args.out:
        emit(args, root, text.decode(), end="")
        return
    write_file(Path(args.out), text.decode(), what=args.out)
    emit(
        args,
        {"out": str(Path(args.out)), "version": version},
        f"Wrote the director's root (version {version}) to {args.out}; devices name it in "
        "agent.toml: [director] root",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``director root``."""
    director = add_group(groups, "director", "the server's director (Uptane)")
    p = add_command(
        director,
        "root",
        cmd_director_root,
        parents,
        "the director's root.json, which devices are provisioned with ([director] root)",
        "fleetctl director root --out /etc/edgefleet/director-root.json",
        "fleetctl director root",
    )
    p.add_argument(
        "--out", metavar="FILE", help="write it to FILE (default: print it on standard output)"
    )
