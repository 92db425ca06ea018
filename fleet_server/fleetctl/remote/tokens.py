"""``fleetctl tokens`` (API tokens) and ``provisioning-token`` (tokens devices enrol with)."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.api.client import path_segment
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.files import check_out_folder, secret_out
from fleet_server.fleetctl.remote.client import api_client, duration
from fleet_server.fleetctl.render import emit, text_table, when


def cmd_provisioning_token_create(args: argparse.Namespace) -> None:
    check_out_folder(args, "token was created")
    created = api_client(args).post(
        "/provisioning-tokens",
        {"hardware_id": args.hardware, "tags": args.tag, "uses": args.uses, "ttl_s": args.ttl},
    )
    scope = f" for {created['hardware_id']} devices" if created["hardware_id"] else ""
    summary = (
        f"Provisioning token{scope}, {created['uses']} use(s), expires "
        f"{when(created['expires_at'])} UTC"
    )
    shown = secret_out(args, created, "token")
    if shown is None:
        emit(args, created, f"{summary} (shown only now):\n  {created['token']}")
        return
    emit(
        args,
        shown,
        f"{summary}, written to {args.out} (mode 0600); devices name it in agent.toml: "
        "[enrolment] token_file",
    )


def cmd_tokens_create(args: argparse.Namespace) -> None:
    created = api_client(args).post("/tokens", {"name": args.name, "role": args.role})
    info = created["info"]
    emit(
        args,
        created,
        f"Created {info['role']} token {info['id']} ({info['name']}), shown only now:\n"
        f"  {created['token']}",
    )


def cmd_tokens_list(args: argparse.Namespace) -> None:
    tokens = api_client(args).get("/tokens")["tokens"]
    table = text_table(
        ["ID", "NAME", "ROLE", "CREATED", "REVOKED"],
        [
            [t["id"], t["name"], t["role"], when(t["created_at"]), when(t["revoked_at"])]
            for t in tokens
        ],
    )
    emit(args, tokens, table if tokens else "No tokens.")


def cmd_tokens_revoke(args: argparse.Namespace) -> None:
    token = api_client(args).request("DELETE", f"/tokens/{path_segment(args.token_id)}")
    emit(args, token, f"Revoked token {token['id']} ({token['name']}, {token['role']})")


def add_provisioning_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``provisioning-token create``."""
    tokens = add_group(groups, "provisioning-token", "tokens devices enrol with (server, admin)")
    p = add_command(
        tokens,
        "create",
        cmd_provisioning_token_create,
        parents,
        "create a provisioning token",
        "fleetctl provisioning-token create --hardware rpi4-arm64 --uses 100",
        "fleetctl provisioning-token create --tag line-a --uses 10 --ttl 12h",
        "fleetctl provisioning-token create --hardware rpi4-arm64 --uses 10 "
        "--out provisioning-token",
    )
    p.add_argument("--hardware", help="enrol only devices of this hardware id")
    p.add_argument("--tag", action="append", default=[], help="tag enrolled devices (repeatable)")
    p.add_argument(
        "--uses", type=int, default=1, help="how many devices may enrol with it (default 1)"
    )
    p.add_argument(
        "--ttl",
        type=duration,
        default=7 * 86400,
        help="lifetime: seconds, or 30m, 12h, 7d (default 7d)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write only the token to FILE, readable by its owner only (mode 0600), for a "
        "device's [enrolment] token_file (default: print it)",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``tokens create|list|revoke``."""
    api_tokens = add_group(groups, "tokens", "API tokens (server, admin)")
    p = add_command(
        api_tokens,
        "create",
        cmd_tokens_create,
        parents,
        "create an API token",
        "fleetctl tokens create --name ci --role operator",
        "fleetctl tokens create --name dashboard --role viewer --json",
    )
    p.add_argument("--name", required=True, help="what the token is for, shown in the audit log")
    p.add_argument(
        "--role",
        required=True,
        choices=["viewer", "operator", "admin"],
        help="viewer reads; operator releases and assigns; admin also manages tokens and devices",
    )
    add_command(
        api_tokens,
        "list",
        cmd_tokens_list,
        parents,
        "list API tokens",
        "fleetctl tokens list",
        "fleetctl tokens list --json",
    )
    p = add_command(
        api_tokens,
        "revoke",
        cmd_tokens_revoke,
        parents,
        "revoke an API token",
        "fleetctl tokens revoke 3f9a1c0d5e7b2a64",
    )
    p.add_argument("token_id", help="the token's id (the ID column of tokens list)")
