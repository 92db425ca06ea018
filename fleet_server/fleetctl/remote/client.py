"""How a command reaches a fleet server: the flags, the API client and its token."""

from __future__ import annotations

import argparse
import os

from fleet_server.api.client import ApiClient, ApiClientError
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.files import read_secret


def remote_flags() -> argparse.ArgumentParser:
    """``--server`` and the API token, for every command that talks to a fleet server."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", help="the fleet server's URL (default: $EDGEFLEET_SERVER)")
    remote.add_argument(
        "--token-file", help="file holding an API token (else --token-env, else $EDGEFLEET_TOKEN)"
    )
    remote.add_argument(
        "--token-env", help="environment variable holding an API token (default: EDGEFLEET_TOKEN)"
    )
    remote.add_argument(
        "--ca-file", help="CA bundle (PEM) to verify an https:// server (default: the system's)"
    )
    return remote


def api_client(args: argparse.Namespace) -> ApiClient:
    """A client of the server and token the command was given (or the environment names)."""
    server = args.server or os.environ.get("EDGEFLEET_SERVER")
    if not server:
        raise CommandError("give --server URL (or set EDGEFLEET_SERVER)")
    token = None
    if args.token_file:
        token = read_secret(args.token_file, "API token")
    elif args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise CommandError(f"environment variable {args.token_env} is not set")
    else:
        token = os.environ.get("EDGEFLEET_TOKEN") or None
    return ApiClient(server, token, ca_file=args.ca_file)


def with_token_hint(exc: ApiClientError, client: ApiClient) -> str:
    """The server's refusal, plus how to give a token when it wanted one (401)."""
    if exc.status != 401:
        return str(exc)
    given = "the token given was not accepted" if client.token else "no API token was given"
    return (
        f"{exc} ({given}; pass an operator or admin token with --token-file FILE, "
        "--token-env VAR or the EDGEFLEET_TOKEN environment variable)"
    )


def duration(text: str) -> float:
    """An argument type: seconds from ``3600``, ``30m``, ``12h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 3600, 30m or 7d"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return seconds
