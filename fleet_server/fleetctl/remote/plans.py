"""``fleetctl plan``, ``fleetctl cloud capacity`` and ``fleetctl devices set``: hybrid plans."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.api.client import path_segment
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, number, percent, text_table, when


def _interval(value: dict[str, Any] | None) -> str:
    return "-" if not value else f"{percent(value['low'])}-{percent(value['high'])}"


def plan_lines(p: dict[str, Any]) -> str:
    """How to read one plan, line by line."""
    o, i = p["observed"], p["inputs"]
    lines = [
        f"{p['device_id']}: plan {p['plan_id']}, {p['mode']}"
        f"{' (EXPIRED)' if p['expired'] else ''}, issued {when(p['issued_at'])}, "
        f"expires {when(p['expires_at'])}",
        f"  why:              {p.get('why') or '-'}",
        f"  demand:           {number(i.get('rate'), 3)} requests/s over "
        f"{i.get('requests_counted', 0)} requests, weight {i.get('weight')}, "
        f"opted out {'yes' if i.get('opted_out') else 'no'}",
        f"  calibration:      temperature {i.get('temperature')} "
        f"({i.get('temperature_from', '-')}), confidence from {i.get('confidence_source', '-')}",
        f"  link:             {percent(i.get('link_errors'))} cloud calls failed, "
        f"p95 {number(i.get('link_latency_p95_ms'), 0)} ms",
        f"  capacity:         {i.get('capacity')}/s, headroom {percent(i.get('headroom'))} "
        f"({i.get('capacity_source', '-')}), water level {number(i.get('level'), 3)}",
        f"  share:            {number(p.get('share'), 3)}/s; quota {number(p['quota_rate'], 3)}/s "
        f"burst {p['quota_burst']}; tau {number(p['tau'], 3)}; "
        f"audit {percent(p['plan']['audit_rate'])}",
        f"  expected offload: {percent(p.get('expected_offload'))}",
        f"  observed offload: {percent(o.get('offload'))} "
        f"(interval {_interval(o.get('interval'))}) over {o['requests']} requests: "
        f"{o['escalated']} escalated, {o['kept_local_quota']} kept local for quota, "
        f"{o['audits']} audits, {o['rate_limited']} refused 429",
        f"  agreement:        audits {percent(o.get('audit_agreement'))} "
        f"(interval {_interval(o.get('audit_agreement_interval'))}, calibration promised "
        f"{percent(o.get('agreement_promised'))}); escalated "
        f"{percent(o.get('escalated_agreement'))}",
        f"  issued for:       {'; '.join(p.get('issued_for') or []) or '-'}",
        f"  last planned for: {'; '.join(p.get('reasons') or []) or '-'}",
    ]
    return "\n".join(lines)


def cmd_plan_show(args: argparse.Namespace) -> None:
    plan = api_client(args).get(f"/plans/{path_segment(args.device)}")
    emit(args, plan, plan_lines(plan))


def cmd_plan_list(args: argparse.Namespace) -> None:
    answer = api_client(args).get("/plans", device_id=args.device)
    rows = [
        [
            p["device_id"],
            p["plan_id"],
            p["mode"] + (" (expired)" if p["expired"] else ""),
            number(p.get("share"), 3),
            number(p["tau"], 3),
            percent(p.get("expected_offload")),
            percent(p["observed"].get("offload")),
            _interval(p["observed"].get("interval")),
            when(p["expires_at"]),
        ]
        for p in answer["plans"]
    ]
    human = (
        text_table(
            [
                "DEVICE",
                "PLAN",
                "MODE",
                "SHARE/S",
                "TAU",
                "EXPECTED",
                "OBSERVED",
                "INTERVAL",
                "EXPIRES",
            ],
            rows,
        )
        if rows
        else "No plans."
    )
    emit(args, answer, human)


def _capacity_line(c: dict[str, Any]) -> str:
    by = f", set by {c['updated_by']} at {when(c['updated_at'])}" if c.get("updated_by") else ""
    return (
        f"cloud capacity {c['capacity']:g} requests/s, headroom {percent(c['headroom'])} "
        f"({c['source']}{by})"
    )


def cmd_cloud_capacity(args: argparse.Namespace) -> None:
    client = api_client(args)
    if args.capacity is None:
        if args.headroom is not None:
            raise CommandError("give the capacity too: fleetctl cloud capacity 50 --headroom 0.2")
        answer = client.get("/cloud/capacity")
    else:
        body: dict[str, Any] = {"capacity": args.capacity}
        if args.headroom is not None:
            body["headroom"] = args.headroom
        answer = client.request("PUT", "/cloud/capacity", body=body)
    emit(args, answer, _capacity_line(answer))


def cmd_devices_set(args: argparse.Namespace) -> None:
    if args.weight is None and args.offload_opt_out is None:
        raise CommandError("give --weight W, --offload-opt-out or --no-offload-opt-out")
    body: dict[str, Any] = {}
    if args.weight is not None:
        body["weight"] = args.weight
    if args.offload_opt_out is not None:
        body["offload_opt_out"] = args.offload_opt_out
    answer = api_client(args).request(
        "PATCH", f"/devices/{path_segment(args.device)}/hybrid", body=body
    )
    emit(
        args,
        answer,
        f"{answer['device_id']}: weight {answer['weight']:g}, offload "
        f"{'opted out (local only)' if answer['offload_opt_out'] else 'allowed'}",
    )


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``plan show|list`` and ``cloud capacity``."""
    plan = add_group(groups, "plan", "hybrid-inference plans: what each device sends to the cloud")
    p = add_command(
        plan,
        "show",
        cmd_plan_show,
        parents,
        "a device's plan: inputs, share, tau, expected and observed offload, why",
        "fleetctl plan show pump-17",
        "fleetctl plan show pump-17 --json",
    )
    p.add_argument("device", help="the device's id")
    p = add_command(
        plan,
        "list",
        cmd_plan_list,
        parents,
        "every device's plan",
        "fleetctl plan list",
        "fleetctl plan list --device pump-17 --json",
    )
    p.add_argument("--device", help="only this device's plan")
    cloud = add_group(groups, "cloud", "the cloud inference endpoint's capacity (server)")
    p = add_command(
        cloud,
        "capacity",
        cmd_cloud_capacity,
        parents,
        "show the capacity the planner splits, or set it (operator): the fleet is planned again",
        "fleetctl cloud capacity",
        "fleetctl cloud capacity 50 --headroom 0.2",
    )
    p.add_argument(
        "capacity", nargs="?", type=float, help="requests a second the cloud endpoint serves"
    )
    p.add_argument("--headroom", type=float, help="share of it held back (default 0.1)")


def add_device_commands(devices: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``devices set``: a device's weight and opt-out."""
    p = add_command(
        devices,
        "set",
        cmd_devices_set,
        parents,
        "set a device's weight in the split of the cloud's capacity and its offload opt-out "
        "(operator)",
        "fleetctl devices set pump-17 --weight 2",
        "fleetctl devices set pump-17 --offload-opt-out",
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--weight", type=float, help="its priority (> 0; default 1)")
    p.add_argument(
        "--offload-opt-out",
        dest="offload_opt_out",
        action="store_const",
        const=True,
        help="its data must not leave it: planned local only",
    )
    p.add_argument(
        "--no-offload-opt-out",
        dest="offload_opt_out",
        action="store_const",
        const=False,
        help="allow offloading again",
    )
