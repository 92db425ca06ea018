"""``fleetctl keys``: the offline release keys, and the passphrase that unlocks them."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.render import emit
from fleet_server.release.keys import init_keys, is_encrypted, load_keys


def read_passphrase(args: argparse.Namespace, needed: bool) -> bytes | None:
    """The passphrase from --passphrase-file or --passphrase-env, else asked on a terminal if
    ``needed``."""
    if args.passphrase_file:
        try:
            return Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise CommandError(f"cannot read the passphrase file: {exc}") from None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise CommandError(f"environment variable {args.passphrase_env} is not set")
        return value.encode()
    if not needed:
        return None
    if not sys.stdin.isatty():
        raise CommandError(
            "the release keys are encrypted and standard input is not a terminal to ask on; "
            "give --passphrase-file FILE or --passphrase-env VAR"
        )
    return getpass.getpass("Passphrase for the release keys: ").encode()


def cmd_keys_init(args: argparse.Namespace) -> None:
    passphrase = read_passphrase(args, needed=False)
    store = init_keys(Path(args.dir), threshold=args.threshold, passphrase=passphrase)
    roles: dict[str, dict[str, Any]] = {
        role: {"threshold": keys.threshold, "keyids": [k.keyid for k in keys.public_keys]}
        for role, keys in store.roles.items()
    }
    data = {"dir": str(args.dir), "encrypted": passphrase is not None, "roles": roles}
    lines = [f"Created release keys in {args.dir} ({'encrypted' if passphrase else 'unencrypted'})"]
    lines += [
        f"  {role:<10} threshold {v['threshold']}  {', '.join(k[:12] for k in v['keyids'])}"
        for role, v in roles.items()
    ]
    lines.append("Keep the root and targets keys offline.")
    emit(args, data, "\n".join(lines))


def load_store(args: argparse.Namespace) -> Any:
    """The release keys of ``--keys``, unlocked with the passphrase if they are encrypted."""
    keys_dir = Path(args.keys)
    encrypted = is_encrypted(keys_dir)
    return load_keys(
        keys_dir, passphrase=read_passphrase(args, needed=encrypted) if encrypted else None
    )


def passphrase_flags(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the passphrase's flags."""
    parser.add_argument("--passphrase-file", help="file holding the release keys' passphrase")
    parser.add_argument(
        "--passphrase-env",
        help="environment variable holding the release keys' passphrase (without either, "
        "encrypted keys ask for it on a terminal)",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``keys init``."""
    keys = add_group(groups, "keys", "release keys")
    p = add_command(
        keys,
        "init",
        cmd_keys_init,
        parents,
        "create Ed25519 keys for every TUF role",
        "fleetctl keys init --dir keys",
        "fleetctl keys init --dir keys --threshold 2 --passphrase-env RELEASE_PASS",
        epilog="With --passphrase-file or --passphrase-env the keys are encrypted with that "
        "passphrase.\n\n",
    )
    p.add_argument("--dir", required=True, help="a new folder for the keys")
    p.add_argument(
        "--threshold",
        type=int,
        default=1,
        help="keys and signatures needed for root and targets (default 1)",
    )
    passphrase_flags(p)
