"""``fleetctl assign``, ``assignments list|cancel`` and ``unassign``."""

from __future__ import annotations

import argparse
import re
from typing import Any

from fleet_server.api.client import path_segment
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, text_table, when
from protocol.api.assignments import ASSIGNMENT_ID_PATTERN


def cmd_assign(args: argparse.Namespace) -> None:
    if not args.device and not args.tag:
        raise CommandError("give --device ID (repeatable) or --tag TAG")
    result = api_client(args).post(
        "/assignments", {"release": args.release, "devices": args.device, "tag": args.tag}
    )
    r = result["release"]
    lines = [f"Assigned {r['name']} {r['version']} ({r['target_path']}):"]
    if result["assignments"]:
        lines.append(
            text_table(
                ["DEVICE", "DIRECTOR VERSION"],
                [[a["device_id"], a["director_version"]] for a in result["assignments"]],
            )
        )
    if result.get("rule"):
        lines.append(
            f"Rule {result['rule']}: devices that gain the tag {args.tag} get it too "
            f"(fleetctl assignments cancel {result['rule']} stops that)"
        )
    emit(args, result, "\n".join(lines))


def cmd_assignments_list(args: argparse.Namespace) -> None:
    items = api_client(args).get(
        "/assignments",
        device=args.device,
        tag=args.tag,
        name=args.name,
        cancelled="true" if args.cancelled else None,
    )["assignments"]
    table = text_table(
        ["ID", "APPLIES TO", "RELEASE", "COUNTER", "ASSIGNED", "BY", "STATE"],
        [
            [
                a["id"],
                f"tag {a['tag']} ({a['devices']} devices)"
                if a["kind"] == "tag"
                else a["device_id"] + (f" (rule {a['rule']})" if a.get("rule") else ""),
                f"{a['name']} {a['version']}",
                a["release_counter"],
                when(a["assigned_at"]),
                a["actor"],
                f"cancelled {when(a['cancelled_at'])} by {a['cancelled_by']}"
                if a.get("cancelled_at")
                else "active",
            ]
            for a in items
        ],
    )
    emit(args, items, table if items else "No assignments.")


def cmd_assignments_cancel(args: argparse.Namespace) -> None:
    if not re.match(ASSIGNMENT_ID_PATTERN, args.id):
        raise CommandError(
            f"assignment id {args.id!r}: give dev-N (a device's) or tag-N (a tag rule), "
            "as fleetctl assignments list shows"
        )
    cancelled = api_client(args).request("DELETE", f"/assignments/{path_segment(args.id)}")
    emit(args, cancelled, _cancelled_line(cancelled))


def _cancelled_line(c: dict[str, Any]) -> str:
    devices = c["devices"]
    if not devices:
        return f"Cancelled {c['id']} ({c['target_path']}): no device held it"
    keep = "keeps what it runs" if len(devices) == 1 else "keep what they run"
    return f"Cancelled {c['id']} ({c['target_path']}): {', '.join(devices)} {keep}"


def cmd_unassign(args: argparse.Namespace) -> None:
    if (args.device is None) == (args.tag is None):
        raise CommandError("give --device ID or --tag TAG")
    client = api_client(args)
    items = client.get("/assignments", device=args.device, tag=args.tag)["assignments"]
    if args.device is not None:
        ids = [a["id"] for a in items if a["kind"] == "device"]
        if not ids:
            raise CommandError(f"{args.device} has no current assignment to cancel")
    else:
        ids = [a["id"] for a in items if a["kind"] == "tag"]
        if not ids:
            raise CommandError(f"no tag rule for {args.tag} to cancel")
    done = [client.request("DELETE", f"/assignments/{path_segment(i)}") for i in ids]
    emit(args, done, "\n".join(_cancelled_line(c) for c in done))


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``assign``, ``assignments list|cancel`` and ``unassign``."""
    p = add_command(
        groups,
        "assign",
        cmd_assign,
        parents,
        "assign a released bundle to devices or a tag (server)",
        "fleetctl assign pump-health@1.1.0 --tag canary",
        "fleetctl assign pump-health@1.1.0 --device pump-17 --device pump-18",
    )
    p.add_argument("release", help="NAME@VERSION or the bundle's target path")
    p.add_argument("--device", action="append", default=[], help="device id (repeatable)")
    p.add_argument("--tag", help="every device with this tag")
    assignments = add_group(
        groups, "assignments", "list and cancel assignments and tag rules (server)"
    )
    p = add_command(
        assignments,
        "list",
        cmd_assignments_list,
        parents,
        "current assignments: each device's (dev-N) and the tag rules (tag-N)",
        "fleetctl assignments list --tag canary --name pump-health",
    )
    p.add_argument("--device", help="only this device's assignment and the rules of its tags")
    p.add_argument("--tag", help="only this tag's rules and its devices' assignments")
    p.add_argument("--name", help="only assignments of this bundle name")
    p.add_argument("--cancelled", action="store_true", help="list cancelled ones too")
    p = add_command(
        assignments,
        "cancel",
        cmd_assignments_cancel,
        parents,
        "cancel an assignment or tag rule; devices keep what they run (operator)",
        "fleetctl assignments cancel tag-3",
    )
    p.add_argument("id", help="dev-N or tag-N, as assignments list shows")
    p = add_command(
        groups,
        "unassign",
        cmd_unassign,
        parents,
        "cancel a device's assignment or a tag's rules; devices keep what they run",
        "fleetctl unassign --device pump-17",
        "fleetctl unassign --tag canary",
    )
    p.add_argument("--device", help="cancel this device's current assignment")
    p.add_argument("--tag", help="cancel every active rule of this tag")
