"""``fleetctl drift``: drift per feature and estimated accuracy of a scope."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.fleetctl.commands import add_command
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, number, percent, text_table, when


def cmd_drift(args: argparse.Namespace) -> None:
    scopes = {
        "device": args.device,
        "tag": args.tag,
        "hardware_id": args.hardware,
        "region": args.region,
    }
    if sum(v is not None for v in scopes.values()) + args.fleet != 1:
        raise CommandError(
            "give one of --device ID, --tag TAG, --hardware HW, --region REGION, --fleet"
        )
    report = api_client(args).get(
        "/drift",
        **scopes,
        fleet=args.fleet or None,
        model=args.model,
        version=args.version,
        since=args.since,
        until=args.until,
    )
    lines = [
        f"Drift of {report['scope']} {report['scope_value']}".rstrip() + ", "
        f"windows ended {when(report['since'])} .. {when(report['until'])}"
    ]
    if not report["models"]:
        lines.append("No windows.")
    for m in report["models"]:
        lines.append("")
        lines.append(
            f"{m['model']} {m['version']}: {m['windows']} windows, {m['requests']} requests"
            f"{_sampled(m)} "
            f"({when(m['start'])} .. {when(m['end'])}); drift at false-alarm rate "
            f"{m['false_alarm_rate']} per feature, at least {m['min_n']} values"
        )
        if m.get("problem"):
            lines.append(f"  cannot test: {m['problem']}")
            continue
        lines.append(_accuracy_line(m.get("accuracy")))
        lines.append(
            text_table(
                ["FEATURE", "N", "NAN", "PSI", "JS", "STATISTIC/THRESHOLD", "REASONS", "VERDICT"],
                [
                    [
                        f["name"] or f["feature"],
                        f["n"],
                        f.get("nan", 0),
                        number(f["psi"]),
                        number(f["js"]),
                        f"{number(f['statistic'], 1)}/{number(f['threshold'], 1)}",
                        ",".join(f.get("reasons") or []) or "-",
                        f["verdict"].upper() if f["verdict"] == "drift" else f["verdict"],
                    ]
                    for f in m["features"]
                ],
            )
        )
    emit(args, report, "\n".join(lines))


def _sampled(m: dict[str, Any]) -> str:
    summarised = m.get("summarised_requests")
    if summarised is None or summarised == m["requests"]:
        return ""
    return f" ({summarised} summarised)"


def _accuracy_line(a: dict[str, Any] | None) -> str:
    """The accuracy estimated without labels, its interval and threshold, and the labelled one."""
    if a is None:
        return "  accuracy: not estimated (the release has no calibration or no score output)"
    line = (
        f"  accuracy: estimated {percent(a['estimated'])} "
        f"({percent(a['low'])} .. {percent(a['high'])}, {a['n']} predictions), "
        f"reference {percent(a['reference'])}, alert below {percent(a['threshold'])}"
    )
    labelled = a.get("labelled")
    if labelled:
        line += (
            f"; measured {percent(labelled['accuracy'])} on {labelled['rows']} labelled "
            f"predictions in {labelled['windows']} windows "
            f"(estimated {percent(labelled['estimated'])} there)"
        )
    if a.get("assumption"):
        allowance = percent(a.get("allowance"))
        if not a.get("allowance_measured", True):
            allowance += " (default: the bundle predates its measurement)"
        line += f"\n  the interval assumes {a['assumption']}; allowance {allowance}"
    return line


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``drift``."""
    p = add_command(
        groups,
        "drift",
        cmd_drift,
        parents,
        "drift per feature and estimated accuracy of a device, a cohort or the fleet (server)",
        "fleetctl drift --device pump-17",
        "fleetctl drift --tag canary --model pump-health --version 1.1.0",
        "fleetctl drift --fleet --since 2026-12-01T00:00:00Z --until 2026-12-02T00:00:00Z",
    )
    p.add_argument("--device", help="one device")
    p.add_argument("--tag", help="every device with this tag")
    p.add_argument("--hardware", help="every device of this hardware id")
    p.add_argument("--region", help="every device in this region")
    p.add_argument("--fleet", action="store_true", help="every device")
    p.add_argument("--model", help="only this model")
    p.add_argument("--version", help="only this model version")
    p.add_argument(
        "--since", help="windows that ended from this ISO time on (default: an hour before --until)"
    )
    p.add_argument("--until", help="windows that ended up to this ISO time (default: now)")
