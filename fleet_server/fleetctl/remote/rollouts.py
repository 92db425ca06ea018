"""``fleetctl rollout``: staged rollouts gated on the field — create, list, status, actions."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, number, text_table, when

FINAL = ("rolling_back", "completed", "aborted")
# Decisions ``rollout status`` shows, the latest.
LAST_DECISIONS = 10


def _gates(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CommandError(f"--gates {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"--gates {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(
            f'--gates {path} must hold an object by gate name, e.g. {{"latency_p95": '
            '{"margin": 0.1}}'
        )
    return data


def cmd_rollout_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {
        "release": args.release,
        "select": args.select,
        "waves": args.waves,
        "bake": args.bake,
        "max_bake": args.max_bake,
        "rate": args.rate,
        "rate_factor": args.rate_factor,
        "window": args.window,
        "on_failure": args.on_failure,
        "holdback": args.holdback,
        "shadow": args.shadow,
        "gates": _gates(args.gates) if args.gates else None,
    }
    rollout = api_client(args).post("/rollouts", {k: v for k, v in body.items() if v is not None})
    stages = ", ".join(f"{number(s, 3)}%" for s in rollout["shares"])
    emit(
        args,
        rollout,
        f"Rollout {rollout['id']} of {rollout['spec']['release']} created ({rollout['phase']}): "
        f"{rollout['matched']} devices match {rollout['spec']['select']}; stages {stages}; "
        f"the controller starts wave 1 at its next tick\n"
        f"  fleetctl rollout status {rollout['id']} --watch",
    )


def cmd_rollout_list(args: argparse.Namespace) -> None:
    rollouts = api_client(args).get("/rollouts")["rollouts"]
    table = text_table(
        ["ID", "RELEASE", "SELECT", "PHASE", "STAGE", "CREATED", "BY", "REASON"],
        [
            [
                r["id"],
                r["release"],
                r["select"],
                r["phase"],
                f"{r['stage']}/{r['stages']}",
                when(r["created_at"]),
                r["created_by"],
                (r["reason"] or "")[:60],
            ]
            for r in rollouts
        ],
    )
    emit(args, rollouts, table if rollouts else "No rollouts.")


def _interval(g: dict[str, Any]) -> str:
    if g["low"] is None and g["high"] is None:
        return "-"
    return f"[{number(g['low'])}, {number(g['high'])}]"


def describe(r: dict[str, Any]) -> str:
    """A rollout as ``rollout status`` shows it."""
    spec = r["spec"]
    lines = [
        f"Rollout {r['id']}: {spec['release']} to {spec['select']} ({r['matched']} devices match)",
        f"  phase {r['phase']}, stage {r['stage']} of {len(r['shares'])}; "
        f"{r['reached']} reached, {r['assigned']} assigned",
    ]
    if r["reason"]:
        lines.append(f"  reason: {r['reason']}")
    for gate, what in sorted(r["missing"].items()):
        lines.append(f"  missing: {gate} {what}")
    shadow = r.get("shadow")
    if shadow:
        lines.append(
            f"  shadow stage: at least {shadow['duration']} before wave 1 serves; "
            f"{shadow['holding']} device(s) hold the shadow now"
        )
        for g in shadow["gates"]:
            lines.append(
                f"    {g['gate']} ({g['severity']}): harm beyond {number(g['harm_at'])}, "
                f"passes within {number(g['margin'])}; needs {g['min_devices']} devices, "
                f"{g['min_requests']} shadow requests"
            )
    lines.append("")
    lines.append(
        text_table(
            ["STAGE", "SHARE", "DEVICES", "STARTED"],
            [
                [
                    s["stage"],
                    f"{number(s['share'], 3)}%",
                    s["devices"],
                    "yes" if s["started"] else "-",
                ]
                for s in r["stages"]
            ],
        )
    )
    if r["evaluations"]:
        lines.append("")
        lines.append(f"Gates at {when(r['evaluated_at'])} UTC:")
        lines.append(
            text_table(
                ["GATE", "SEVERITY", "DECISION", "ESTIMATE", "INTERVAL", "MARGIN", "N", "MISSING"],
                [
                    [
                        g["gate"],
                        g["severity"],
                        g["decision"],
                        number(g["estimate"]),
                        _interval(g),
                        number(g["margin"]),
                        f"{g['n_devices']}/{g['n_control']}",
                        g["missing"] or "",
                    ]
                    for g in r["evaluations"]
                ],
            )
        )
    if r["decisions"]:
        lines.append("")
        lines.append("Decisions:")
        lines.append(
            text_table(
                ["SEQ", "AT", "EVENT", "BY", "PHASE", "RULE", "ACTION"],
                [
                    [
                        d["seq"],
                        when(d["at"]),
                        d["event"],
                        d["by"] or "",
                        f"{d['from_phase']}->{d['phase']}",
                        d["rule"],
                        d["action"],
                    ]
                    for d in r["decisions"][-LAST_DECISIONS:]
                ],
            )
        )
    return "\n".join(lines)


def cmd_rollout_status(args: argparse.Namespace) -> None:
    client = api_client(args)
    while True:
        rollout = client.get(f"/rollouts/{args.rollout_id}")
        emit(args, rollout, describe(rollout))
        if not args.watch or rollout["phase"] in FINAL:
            return
        time.sleep(args.every)


def _action(name: str, done: str) -> Any:
    def run(args: argparse.Namespace) -> None:
        rollout = api_client(args).post(
            f"/rollouts/{args.rollout_id}/{name}", {"reason": args.reason}
        )
        emit(
            args,
            rollout,
            f"Rollout {rollout['id']} {done}: now {rollout['phase']}, "
            f"stage {rollout['stage']} of {len(rollout['shares'])}",
        )

    return run


_ACTIONS = {
    "pause": ("paused", "stop starting installs until resumed; devices keep what they have"),
    "resume": ("resumed", "resume a paused rollout; its maximum bake counts afresh"),
    "promote": ("promoted", "start the next stage now, whatever the gates say (an override)"),
    "abort": ("aborted", "end the rollout; devices keep what they have"),
}


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``fleetctl rollout``: create, list, status, pause, resume, promote, abort."""
    rollout = add_group(groups, "rollout", "staged rollouts gated on the field (server)")
    p = add_command(
        rollout,
        "create",
        cmd_rollout_create,
        parents,
        "start a staged rollout of a release to the devices a selector matches",
        "fleetctl rollout create pump-health@2.0.0 --select hardware=rpi4-arm64,tag=line-a "
        "--waves 1%,10%,50%,100% --bake 30m",
        "fleetctl rollout create pump-health@2.0.0 --select region=eu-west --waves 10%,100% "
        "--bake 1h --rate 10/min --rate-factor 2 --on-failure rollback --holdback 5%",
        "fleetctl rollout create pump-health@2.0.0 --select tag=line-a --waves 50%,100% "
        "--bake 2h --window 'Mon-Fri 02:00-05:00 Europe/Berlin' --gates gates.json",
    )
    p.add_argument("release", metavar="NAME@VERSION", help="the released bundle to roll out")
    p.add_argument(
        "--select",
        required=True,
        help="which devices: hardware=, tag=, region= terms joined by commas",
    )
    p.add_argument(
        "--waves", required=True, help="cumulative shares rising to 100%%, e.g. 1%%,10%%,100%%"
    )
    p.add_argument("--bake", required=True, help="how long each wave bakes at least, e.g. 30m")
    p.add_argument(
        "--max-bake", help="after this long an inconclusive wave pauses (default 4 x --bake)"
    )
    p.add_argument("--rate", help="installs started at first, e.g. 10/min (default: no limit)")
    p.add_argument(
        "--rate-factor", type=float, help="multiply the rate by this each minute (1.1 to 5)"
    )
    p.add_argument(
        "--window",
        help="when installs may start: 'DAYS START-END ZONE', e.g. 'daily 02:00-05:00 UTC'",
    )
    p.add_argument(
        "--on-failure",
        choices=["pause", "rollback"],
        help="when a stop-gate shows harm: stop (pause, the default) or roll the devices back",
    )
    p.add_argument(
        "--holdback", help="share kept on the current version one bake longer (default 5%%)"
    )
    p.add_argument("--shadow", help="run the release beside the active model this long first")
    p.add_argument(
        "--gates", metavar="FILE.json", help='gate overrides by name, e.g. {"latency_p95": ...}'
    )

    add_command(
        rollout,
        "list",
        cmd_rollout_list,
        parents,
        "rollouts, newest first",
        "fleetctl rollout list",
        "fleetctl rollout list --json",
    )

    p = add_command(
        rollout,
        "status",
        cmd_rollout_status,
        parents,
        "a rollout's phase, waves, gates and latest decisions",
        "fleetctl rollout status ro-0123456789ab",
        "fleetctl rollout status ro-0123456789ab --watch --every 10",
    )
    p.add_argument("rollout_id", metavar="ID", help="the rollout's id (fleetctl rollout list)")
    p.add_argument("--watch", action="store_true", help="show it again until it ends")
    p.add_argument(
        "--every", type=float, default=30.0, help="seconds between --watch looks (default 30)"
    )

    for name, (done, help_text) in _ACTIONS.items():
        p = add_command(
            rollout,
            name,
            _action(name, done),
            parents,
            help_text,
            f"fleetctl rollout {name} ro-0123456789ab --reason 'ticket 4711'",
        )
        p.add_argument("rollout_id", metavar="ID", help="the rollout's id (fleetctl rollout list)")
        p.add_argument("--reason", help="why (kept with the decision, audited)")
