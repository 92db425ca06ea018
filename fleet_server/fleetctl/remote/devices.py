"""``fleetctl devices``: the registry, each device's windows, events and lifecycle."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fleet_server.api.client import path_segment
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.files import check_out_folder, secret_out
from fleet_server.fleetctl.remote import plans
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, text_table, when


def _describe_device(d: dict[str, Any]) -> str:
    fields = [
        ("device", d["id"]),
        ("hardware", d["hardware_id"]),
        ("region", d.get("region") or "-"),
        ("time zone", d.get("timezone") or "-"),
        ("tags", ", ".join(d.get("tags") or []) or "-"),
        ("online", "yes" if d["online"] else "no"),
        ("last seen", when(d.get("last_seen_at"))),
        ("enrolled", when(d.get("enrolled_at"))),
        ("agent", d.get("agent_version") or "-"),
        ("running", d.get("active_bundle") or "-"),
        ("counter", d.get("installed_counter", 0)),
        ("phase", d.get("phase") or "-"),
        ("assigned", d.get("assigned_target") or "-"),
        *(
            [("shadow", f"{d['shadow_target']} (rollout {d.get('shadow_rollout') or '-'})")]
            if d.get("shadow_target")
            else []
        ),
        ("director version", d.get("director_version", 0)),
        *_decommission_fields(d),
    ]
    return "\n".join(f"{name + ':':<18}{value}" for name, value in fields)


def cmd_devices_list(args: argparse.Namespace) -> None:
    devices = api_client(args).get(
        "/devices",
        tag=args.tag,
        hardware_id=args.hardware,
        online=args.online,
        include_decommissioned=args.all or None,
    )["devices"]
    table = text_table(
        ["DEVICE", "HARDWARE", "ONLINE", "RUNNING", "ASSIGNED", "TAGS"],
        [
            [
                d["id"],
                d["hardware_id"],
                _online_cell(d),
                d.get("active_bundle"),
                d.get("assigned_target"),
                ",".join(d.get("tags") or []) or None,
            ]
            for d in devices
        ],
    )
    emit(args, devices, table if devices else "No devices.")


def cmd_devices_show(args: argparse.Namespace) -> None:
    device = api_client(args).get(f"/devices/{path_segment(args.device)}")
    emit(args, device, _describe_device(device) + _describe_refusals(device))


def _describe_refusals(d: dict[str, Any]) -> str:
    """The warning about a refused assignment, and the device's latest refusals."""
    lines = []
    if d.get("assignment_warning"):
        lines.append(f"WARNING: {d['assignment_warning']}")
    refusals = d.get("refusals") or []
    if refusals:
        lines.append("recent refusals:")
        lines += [
            f"  {when(r.get('at'))}  {r.get('bundle') or '-'}  "
            f"{r.get('reason') or r.get('event')}: {r.get('message') or '-'}"
            for r in refusals
        ]
    return "".join(f"\n{line}" for line in lines)


def cmd_devices_tag(args: argparse.Namespace) -> None:
    if not args.add and not args.remove:
        raise CommandError("give --add TAG or --remove TAG (each repeatable)")
    device = api_client(args).request(
        "PATCH",
        f"/devices/{path_segment(args.device)}/tags",
        body={"add": args.add, "remove": args.remove},
    )
    emit(args, device, f"{device['id']}: tags {', '.join(device['tags']) or '(none)'}")


def _password_lines(
    args: argparse.Namespace, created: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The answer to show and its password lines: the password itself, or where --out wrote it."""
    shown = secret_out(args, created, "password")
    if shown is None:
        return created, (
            "Password (shown only now; the device's HTTP and MQTT credential):\n"
            f"  {created['password']}"
        )
    return shown, (
        f"Password written to {args.out} (mode 0600; the device's HTTP and MQTT credential, "
        "for its [credentials] password_file)"
    )


def cmd_devices_register(args: argparse.Namespace) -> None:
    check_out_folder(args, "device was registered")
    created = api_client(args).post(
        "/devices",
        {
            "device_id": args.device,
            "hardware_id": args.hardware,
            "region": args.region,
            "timezone": args.timezone,
            "tags": args.tag,
            "reuse_decommissioned": args.reuse_decommissioned,
        },
    )
    shown, password = _password_lines(args, created)
    emit(
        args,
        shown,
        f"Registered {created['device_id']} ({created['device']['hardware_id']}).\n"
        + password
        + (
            f"\nMQTT namespace (agent.toml, [mqtt] namespace): {created['mqtt_namespace']}"
            if created.get("mqtt_namespace")
            else ""
        ),
    )


def cmd_devices_events(args: argparse.Namespace) -> None:
    events = api_client(args).get(f"/devices/{path_segment(args.device)}/events", limit=args.limit)[
        "events"
    ]
    table = text_table(
        ["AT", "EVENT", "DETAILS"],
        [[when(e.get("at")), e.get("event"), _details_cell(e)] for e in events],
    )
    emit(args, events, table if events else "No events.")


def _details_cell(item: dict[str, Any]) -> str:
    """An event's or audit entry's details in one cell; a clear note if the server left them out."""
    omitted = item.get("details_omitted")
    if omitted:
        return f"[{omitted}]"
    return json.dumps(item.get("details") or {}, sort_keys=True)[:80]


def _online_cell(d: dict[str, Any]) -> str:
    if d.get("decommissioned_at"):
        return "decommissioned"
    return "yes" if d["online"] else "no"


def _decommission_fields(d: dict[str, Any]) -> list[tuple[str, Any]]:
    if not d.get("decommissioned_at"):
        return []
    return [
        ("decommissioned", f"{when(d['decommissioned_at'])} UTC"),
        ("reason", d.get("decommission_reason") or "-"),
    ]


# What an operator must do on a broker whose passwd file `fleetctl broker config` wrote.
_BROKER_NOTE = (
    "If the broker's passwd file comes from 'fleetctl broker config', run it again {what} "
    "and reload Mosquitto (kill -HUP): it re-reads passwd and acl and disconnects clients "
    "whose credentials no longer hold."
)


_PASSWORD_OUT_HELP = (
    "write only the password to FILE, readable by its owner only (mode 0600), for the "
    "device's [credentials] password_file and broker config --device ID:FILE "
    "(default: print it)"
)


def cmd_devices_decommission(args: argparse.Namespace) -> None:
    device = api_client(args).post(
        f"/devices/{path_segment(args.device)}/decommission", {"reason": args.reason}
    )
    emit(
        args,
        device,
        f"Decommissioned {device['id']}: its credentials no longer work (HTTP 401, MQTT "
        "messages dropped), its assignment is withdrawn, its history is kept; "
        "'devices list --all' still shows it.\n"
        + _BROKER_NOTE.format(what="without --device " + device["id"]),
    )


def cmd_devices_rotate_credentials(args: argparse.Namespace) -> None:
    check_out_folder(args, "credentials were rotated")
    created = api_client(args).post(f"/devices/{path_segment(args.device)}/credentials", {})
    shown, password = _password_lines(args, created)
    emit(
        args,
        shown,
        f"New credentials for {created['device_id']}; the old password no longer works.\n"
        + password
        + "\nInstall it on the device (its credentials password file). "
        + _BROKER_NOTE.format(
            what=f"with --device {created['device_id']}:FILE holding the new password"
        ),
    )


WINDOWS_PER_REQUEST = 1000


def cmd_devices_windows(args: argparse.Namespace) -> None:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    client = api_client(args)
    windows: list[dict[str, Any]] = []
    before = None
    while len(windows) < args.limit:
        page = client.get(
            f"/devices/{path_segment(args.device)}/windows",
            since=args.since,
            until=args.until,
            model=args.model,
            version=args.version,
            limit=min(WINDOWS_PER_REQUEST, args.limit - len(windows)),
            before=before,
        )
        windows += page["windows"]
        before = page.get("next_before")
        if before is None:
            break
    if args.ids:
        emit(args, windows, "".join(f"{w['window_id']}\n" for w in windows), end="")
        return
    table = text_table(
        ["WINDOW", "START", "END", "MODEL", "REQUESTS", "ERRORS", "LABELLED"],
        [
            [
                w["window_id"],
                when(w["start"]),
                when(w["end"]),
                f"{w['model']}@{w['version']}",
                w["requests"],
                w["errors"],
                "yes" if w["labelled"] else "no",
            ]
            for w in windows
        ],
    )
    more = f"\n(more: --limit {args.limit * 2}, or an earlier --until)" if before else ""
    emit(args, windows, (table + more) if windows else "No windows.")


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``devices list|show|tag|register|windows|events|decommission|rotate-credentials|set``."""
    devices = add_group(groups, "devices", "the device registry (server)")
    p = add_command(
        devices,
        "list",
        cmd_devices_list,
        parents,
        "list devices",
        "fleetctl devices list",
        "fleetctl devices list --tag line-a --online",
        "fleetctl devices list --hardware rpi4-arm64 --json",
    )
    p.add_argument("--tag", help="only devices with this tag")
    p.add_argument("--hardware", help="only devices of this hardware id")
    state = p.add_mutually_exclusive_group()
    state.add_argument(
        "--online", dest="online", action="store_const", const=True, help="only devices online"
    )
    state.add_argument(
        "--offline", dest="online", action="store_const", const=False, help="only devices offline"
    )
    p.add_argument(
        "--all", action="store_true", help="list decommissioned devices too (hidden by default)"
    )
    p = add_command(
        devices,
        "show",
        cmd_devices_show,
        parents,
        "show one device",
        "fleetctl devices show pump-17",
        "fleetctl devices show pump-17 --json",
    )
    p.add_argument("device", help="the device's id")
    p = add_command(
        devices,
        "tag",
        cmd_devices_tag,
        parents,
        "add or remove a device's tags",
        "fleetctl devices tag pump-17 --add canary",
        "fleetctl devices tag pump-17 --add line-b --remove line-a",
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--add", action="append", default=[], metavar="TAG", help="add TAG (repeatable)")
    p.add_argument(
        "--remove", action="append", default=[], metavar="TAG", help="remove TAG (repeatable)"
    )
    p = add_command(
        devices,
        "register",
        cmd_devices_register,
        parents,
        "pre-register a device and show its password (admin)",
        "fleetctl devices register pump-17 --hardware rpi4-arm64",
        "fleetctl devices register pump-18 --hardware rpi4-arm64 --region eu-west "
        "--timezone Europe/Berlin --tag line-a --tag canary",
        "fleetctl devices register pump-19 --hardware rpi4-arm64 --out pump-19.pw",
    )
    p.add_argument("device", help="the new device's id (its MQTT and HTTP username)")
    p.add_argument("--out", metavar="FILE", help=_PASSWORD_OUT_HELP)
    p.add_argument("--hardware", required=True, help="the device's hardware id")
    p.add_argument("--region", help="the device's region, for drift by region")
    p.add_argument(
        "--timezone",
        metavar="ZONE",
        help="the device's IANA time zone (Europe/Berlin): rollouts read their maintenance "
        "window on its clock (default: each window's own zone)",
    )
    p.add_argument("--tag", action="append", default=[], help="a tag to give it (repeatable)")
    p.add_argument(
        "--reuse-decommissioned",
        action="store_true",
        help="register a new device under the id of a decommissioned one (refused otherwise); "
        "its history stays, the new device starts with nothing assigned",
    )
    p = add_command(
        devices,
        "windows",
        cmd_devices_windows,
        parents,
        "a device's windows, newest first: the ids to label (fleetctl labels post)",
        epilog="examples:\n"
        "  fleetctl devices windows pump-17 --since 2031-01-01T00:00:00Z --limit 20\n"
        "  fleetctl devices windows pump-17 --version 1.1.0 --json\n"
        "  fleetctl devices windows pump-17 --limit 1 --ids",
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--since", help="ISO time: windows that ended after it")
    p.add_argument("--until", help="ISO time: windows that ended at or before it")
    p.add_argument("--model", help="only windows of this model")
    p.add_argument("--version", help="only windows of this model version")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument(
        "--ids",
        action="store_true",
        help="print only the window ids, one a line (for scripts, such as a labels CSV)",
    )
    p = add_command(
        devices,
        "events",
        cmd_devices_events,
        parents,
        "a device's recent events",
        "fleetctl devices events pump-17",
        "fleetctl devices events pump-17 --limit 10",
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default %(default)s)")
    p = add_command(
        devices,
        "decommission",
        cmd_devices_decommission,
        parents,
        "take a device out of the fleet: its credentials stop working, its history stays (admin)",
        "fleetctl devices decommission pump-17 --reason 'returned for repair'",
    )
    p.add_argument("device", help="the device id")
    p.add_argument("--reason", help="why, kept with the device and in the audit log")
    p = add_command(
        devices,
        "rotate-credentials",
        cmd_devices_rotate_credentials,
        parents,
        "give a device a new password, shown once; the old one stops working at once (admin)",
        "fleetctl devices rotate-credentials pump-17",
        "fleetctl devices rotate-credentials pump-17 --out pump-17.pw",
    )
    p.add_argument("device", help="the device id")
    p.add_argument("--out", metavar="FILE", help=_PASSWORD_OUT_HELP)
    plans.add_device_commands(devices, parents)
