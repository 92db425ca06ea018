"""``fleetctl alerts``: drift and accuracy alerts, acknowledgements and silences."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.fleetctl.commands import add_command
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.remote.client import api_client, duration
from fleet_server.fleetctl.render import emit, number, p_value, percent, text_table, when


def _test_figures(reason: str, ev: dict[str, Any]) -> str:
    """One test's numbers in a few characters."""
    if reason in ("missing-values", "out-of-range"):
        return (
            f"{reason}: {percent(ev.get('share'))} vs {percent(ev.get('baseline_share'))}, "
            f"p {p_value(ev.get('p_value'))}"
        )
    if reason == "new-range":
        return (
            f"new-range: {number(ev.get('min'))}..{number(ev.get('max'))} vs "
            f"{number(ev.get('baseline_min'))}..{number(ev.get('baseline_max'))}, "
            f"p {p_value(ev.get('p_value'))}"
        )
    return f"{number(ev.get('statistic'), 1)}/{number(ev.get('threshold'), 1)}"


def _alert_figures(a: dict[str, Any]) -> str:
    ev = a["evidence"]
    if a["kind"] == "accuracy":
        return f"{percent(ev.get('estimated'))} < {percent(ev.get('threshold'))}"
    tests = [
        f"{f.get('name') or f['feature']} {_test_figures(reason, figures)}"
        for f in a.get("features") or []
        for reason, figures in sorted((f.get("tests") or {}).items())
    ]
    return "; ".join(tests[:2]) + (f"; +{len(tests) - 2} more" if len(tests) > 2 else "")


def _alert_features(a: dict[str, Any], most: int = 3) -> str | None:
    names = [
        f"{f.get('name') or f['feature']}({','.join(f.get('reasons') or [])})"
        for f in a.get("features") or []
    ]
    if not names:
        return None
    return " ".join(names[:most]) + (f" +{len(names) - most}" if len(names) > most else "")


def _alert_state(a: dict[str, Any]) -> str:
    notes = []
    if a.get("acknowledged") and a["state"] == "open":
        notes.append("acked")
    if a.get("silenced_by"):
        notes.append("silenced")
    return str(a["state"]) + (f" ({', '.join(notes)})" if notes else "")


def _scope(kind: str | None, value: str | None) -> str:
    if kind is None:
        return "any"
    return f"{kind}:{value}" if value else kind


def cmd_alerts(args: argparse.Namespace) -> None:
    alerts = api_client(args).get(
        "/alerts",
        state=args.state,
        kind=args.kind,
        scope=args.scope,
        device=args.device,
        model=args.model,
        version=args.version,
        limit=args.limit,
    )["alerts"]
    table = text_table(
        [
            *("ID", "KIND", "STATE", "SCOPE", "MODEL", "FEATURES"),
            *("OPENED", "LAST SEEN", "CLOSED", "EVIDENCE"),
        ],
        [
            [
                a["id"],
                a["kind"],
                _alert_state(a),
                _scope(a["scope"], a["scope_value"]),
                f"{a['model']}@{a['version']}",
                _alert_features(a),
                when(a["opened_at"]),
                when(a["last_seen_at"]),
                when(a["closed_at"]),
                _alert_figures(a),
            ]
            for a in alerts
        ],
    )
    emit(args, alerts, table if alerts else "No alerts.")


def cmd_alerts_ack(args: argparse.Namespace) -> None:
    alert = api_client(args).post(f"/alerts/{args.alert_id}/ack", {"comment": args.comment})
    emit(
        args,
        alert,
        f"Acknowledged alert {alert['id']} ({alert['kind']}, "
        f"{_scope(alert['scope'], alert['scope_value'])}, {alert['model']}@{alert['version']}): "
        "not notified again; it still closes when its condition clears",
    )


def _silence_scope(text: str) -> tuple[str, str | None]:
    kind, sep, value = text.partition(":")
    kinds = ("device", "tag", "hardware_id", "region", "fleet")
    if kind not in kinds or (sep and not value) or (kind == "fleet" and value):
        raise CommandError(
            f"--scope {text!r}: give KIND or KIND:VALUE with KIND one of {', '.join(kinds)} "
            "(fleet has no value), e.g. device:pump-17"
        )
    return kind, value or None


def _describe_silence(s: dict[str, Any]) -> str:
    matchers = [f"scope {_scope(s['scope'], s['scope_value'])}"]
    if s.get("kind"):
        matchers.append(f"kind {s['kind']}")
    if s.get("model") or s.get("version"):
        matchers.append(f"model {s.get('model') or '*'}@{s.get('version') or '*'}")
    return ", ".join(matchers)


def cmd_alerts_silence(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"duration_s": args.duration, "reason": args.reason}
    if args.alert_id is not None:
        if args.scope or args.kind or args.model or args.version:
            raise CommandError("give an alert ID or --scope (with --kind, --model, --version)")
        body["alert_id"] = args.alert_id
    elif args.scope is None:
        raise CommandError("give an alert ID or --scope KIND[:VALUE] to silence")
    else:
        body["scope"], body["scope_value"] = _silence_scope(args.scope)
        body |= {"kind": args.kind, "model": args.model, "version": args.version}
    silence = api_client(args).post("/silences", {k: v for k, v in body.items() if v is not None})
    emit(
        args,
        silence,
        f"Silence {silence['id']} ({_describe_silence(silence)}) until "
        f"{when(silence['ends_at'])} UTC; it matches {silence['matching']} open alerts",
    )


def cmd_alerts_silences(args: argparse.Namespace) -> None:
    silences = api_client(args).get("/silences", state=args.state, limit=args.limit)["silences"]
    table = text_table(
        ["ID", "ACTIVE", "MATCHES", "ENDS", "OPEN ALERTS", "BY", "REASON"],
        [
            [
                s["id"],
                "yes" if s["active"] else "no",
                _describe_silence(s),
                when(s["ends_at"]),
                s["matching"],
                s["created_by"],
                s["reason"][:60],
            ]
            for s in silences
        ],
    )
    emit(args, silences, table if silences else "No silences.")


def cmd_alerts_unsilence(args: argparse.Namespace) -> None:
    silence = api_client(args).request("DELETE", f"/silences/{args.silence_id}")
    emit(args, silence, f"Silence {silence['id']} ended ({_describe_silence(silence)})")


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``fleetctl alerts``: the list with its filters; ack, silence, silences, unsilence."""
    alerts = add_command(
        groups,
        "alerts",
        cmd_alerts,
        parents,
        "drift and accuracy alerts, one per scope and cause, newest first (server)",
        epilog="examples:\n"
        "  fleetctl alerts --state open --device pump-17\n"
        "  fleetctl alerts --scope tag:line-a --kind drift --json\n"
        "  fleetctl alerts ack 42 --comment 'sensor replaced tomorrow'\n"
        "  fleetctl alerts silence --scope device:pump-17 --for 2h --reason maintenance",
    )
    alerts.add_argument(
        "--state",
        choices=["open", "closed", "acknowledged", "silenced"],
        help="open (all open ones), closed, acknowledged or silenced (open and so handled)",
    )
    alerts.add_argument("--kind", choices=["drift", "accuracy"], help="only this kind")
    alerts.add_argument(
        "--scope", help="a scope kind (tag) or one scope (tag:line-a, device:pump-17, fleet)"
    )
    alerts.add_argument("--device", help="only alerts of this device's own scope")
    alerts.add_argument("--model", help="only this model")
    alerts.add_argument("--version", help="only this model version")
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    actions = alerts.add_subparsers(dest="action", metavar="ACTION", title="actions")

    p = add_command(
        actions,
        "ack",
        cmd_alerts_ack,
        parents,
        "acknowledge an open alert: not notified again, still closed when it clears",
        epilog="example:\n  fleetctl alerts ack 42 --comment 'on site at 14:00'",
    )
    p.add_argument("alert_id", type=int, metavar="ID", help="the alert's id (fleetctl alerts)")
    p.add_argument("--comment", help="why, or who is on it (shown with the alert, audited)")

    p = add_command(
        actions,
        "silence",
        cmd_alerts_silence,
        parents,
        "withhold the notifications of matching alerts for a while",
        epilog="examples:\n"
        "  fleetctl alerts silence 42 --for 2h --reason 'recalibrating'\n"
        "  fleetctl alerts silence --scope tag:line-a --kind drift --for 1d --reason 'line moved'",
    )
    p.add_argument(
        "alert_id",
        type=int,
        nargs="?",
        metavar="ID",
        help="silence this alert's scope and cause (its kind, scope and model version)",
    )
    p.add_argument("--scope", help="KIND or KIND:VALUE: device:pump-17, tag:line-a, fleet")
    p.add_argument("--kind", choices=["drift", "accuracy"], help="only alerts of this kind")
    p.add_argument("--model", help="only alerts of this model")
    p.add_argument("--version", help="only alerts of this model version")
    p.add_argument(
        "--for",
        dest="duration",
        required=True,
        type=duration,
        help="how long, e.g. 2h, 30m, 7d (ends on its own)",
    )
    p.add_argument("--reason", required=True, help="why (shown with the silence, audited)")

    p = add_command(
        actions,
        "silences",
        cmd_alerts_silences,
        parents,
        "list silences (active ones by default)",
        epilog="example:\n  fleetctl alerts silences --state all",
    )
    p.add_argument(
        "--state",
        choices=["active", "expired", "all"],
        default="active",
        help="active (default), expired or all",
    )
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")

    p = add_command(
        actions,
        "unsilence",
        cmd_alerts_unsilence,
        parents,
        "end a silence now",
        epilog="example:\n  fleetctl alerts unsilence 7",
    )
    p.add_argument("silence_id", type=int, metavar="SILENCE_ID", help="fleetctl alerts silences")
