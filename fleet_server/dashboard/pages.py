"""The dashboard's pages and actions.

Every page reads through the same services the REST operations call (the
rollouts, devices, drift and hybrid services and their views), under the same
roles: a page needs a session whose token holds at least ``viewer``; an
action needs ``operator`` and the session's CSRF token. A request carrying
``X-Dashboard-Fragment: 1`` gets only the inside of ``<main>``: the page's
script polls with it and swaps the content in place, without a reload.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import SERVER
from fleet_server.dashboard import svg
from fleet_server.dashboard.layout import e, page, section, table
from fleet_server.dashboard.sessions import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Session,
    Sessions,
    cookie_attributes,
    csrf_valid,
)
from fleet_server.devices import service as devices
from fleet_server.devices.views import device_view, event_view, with_refusals
from fleet_server.drift import service as drift
from fleet_server.drift import store as drift_store
from fleet_server.drift.history import Periods, accuracy_history
from fleet_server.drift.models import DriftError, Scope
from fleet_server.drift.views import alert_view, model_drift_view
from fleet_server.errors import NotFound
from fleet_server.hybrid.service import PlanNotFound
from fleet_server.hybrid.views import capacity_view, plan_view
from fleet_server.rollouts import service as rollouts
from fleet_server.rollouts import store as rollout_store
from fleet_server.tokens import InvalidToken, Principal, authenticate
from fleet_server.tokens.rules import role_allows
from protocol.api.accuracy import AccuracySeries
from protocol.api.devices import DeviceView
from protocol.api.drift import AlertView
from protocol.api.tokens import Role
from protocol.api.windows import WindowQuery
from protocol.window import WindowCodecError, WindowMergeError, decode_window, merge_windows

SESSIONS: web.AppKey[Sessions] = web.AppKey("dashboard_sessions")
FRAGMENT_HEADER = "X-Dashboard-Fragment"
# What a fragment's content hashes to: the script swaps <main> only when it changed.
DIGEST_HEADER = "X-Dashboard-Digest"
ACTIONS = rollouts.ACTIONS
ACTION_ROLE: Role = "operator"
INSTALLING_PHASES = frozenset({"downloading", "verified", "staging", "staged", "trial"})
STATIC = ("dashboard.css", "dashboard.js")
DRIFT_RANGE = timedelta(hours=24)
# How often each section's pages ask for their content again: drift tests every scope's
# windows of the last day at each ask, so it asks least.
POLL_S = {"overview": 3.0, "rollouts": 3.0, "hybrid": 10.0, "drift": 60.0}
# Columns of the drift heat map besides the fleet's: tags, then regions.
MAX_COHORTS = 24

PageBody = tuple[str, str]  # the page's title and the HTML inside <main> under the title
View = Callable[[web.Request, Principal], Awaitable[PageBody]]


# -- sessions -----------------------------------------------------------------------------


def _session(request: web.Request) -> Session | None:
    return request.app[SESSIONS].get(request.cookies.get(COOKIE))


async def _principal(request: web.Request, session: Session) -> Principal | None:
    try:
        return await authenticate(request.app[SERVER].db, session.token)
    except InvalidToken:
        request.app[SESSIONS].close(session.id)
        return None


def _login_redirect(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/dashboard/login?next={quote(request.path_qs, safe='')}")


def _refuse_other_origins(request: web.Request, what: str) -> None:
    """Refuse a POST another site's page sent (its ``Origin`` names another host): the
    SameSite cookie and the CSRF token stop those already; this also covers the login."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, f"refused: {what} from another origin ({origin[:100]})")


def _safe_next(value: str | None) -> str:
    """Where to go after login: a dashboard path only, never another site."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard"


def view(section_name: str, render: View) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A page handler: the session and its role checked, then ``render``, then the shell."""

    async def handle(request: web.Request) -> web.Response:
        session = _session(request)
        principal = await _principal(request, session) if session else None
        if session is None or principal is None:
            raise _login_redirect(request)
        principal.require("viewer")
        try:
            title, main = await render(request, principal)
        except NotFound as exc:
            return web.Response(
                text=page("Not found", f"<p>{e(exc)}</p>", role=principal.role, csrf=session.csrf),
                status=404,
                content_type="text/html",
                headers=_NO_STORE,
            )
        digest = hashlib.sha256(f"{title}\0{main}".encode()).hexdigest()[:32]
        if request.headers.get(FRAGMENT_HEADER) == "1":
            return web.Response(
                text=f"<h1>{e(title)}</h1>{main}",
                content_type="text/html",
                headers={**_NO_STORE, DIGEST_HEADER: digest},
            )
        html = page(
            title,
            main,
            section=section_name,
            role=principal.role,
            csrf=session.csrf,
            digest=digest,
            live_s=POLL_S.get(section_name, 3.0),
        )
        return web.Response(text=html, content_type="text/html", headers=_NO_STORE)

    return handle


# Every page: never cached, never framed (its buttons act), scripts and styles only its own
# (inline style attributes colour the heat map).
_NO_STORE = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


async def login_form(request: web.Request) -> web.Response:
    error = request.query.get("error")
    target = _safe_next(request.query.get("next"))
    body = (
        '<form class="login" method="post" action="/dashboard/login">'
        + (f'<p class="error" role="alert">{e(error)}</p>' if error else "")
        + '<label for="token">Token (ID.SECRET)</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required autofocus>'
        f'<input type="hidden" name="next" value="{e(target)}">'
        '<button type="submit">Log in</button></form>'
        "<p>Tokens come from <code>fleetctl token create</code> or the admin token file.</p>"
    )
    return web.Response(
        text=page("Log in", body, live_s=None), content_type="text/html", headers=_NO_STORE
    )


async def login(request: web.Request) -> web.Response:
    _refuse_other_origins(request, "login")
    form = await request.post()
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "")))
    try:
        principal = await authenticate(request.app[SERVER].db, token)
    except InvalidToken as exc:
        raise web.HTTPSeeOther(
            f"/dashboard/login?error={quote(str(exc))}&next={quote(target, safe='')}"
        ) from None
    if not role_allows(principal.role, "viewer"):
        raise web.HTTPSeeOther(f"/dashboard/login?error={quote('this token has no role')}")
    session = request.app[SESSIONS].open(token)
    response = web.HTTPSeeOther(target)
    response.set_cookie(COOKIE, session.id, **cookie_attributes(request.secure))  # type: ignore[arg-type]
    raise response


async def logout(request: web.Request) -> web.Response:
    _refuse_other_origins(request, "logout")
    session = _session(request)
    if session is not None:
        form = await request.post()
        presented = request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD, ""))
        if not csrf_valid(session, presented):
            raise ApiError(403, "refused: logout without this session's CSRF token")
        request.app[SESSIONS].close(session.id)
    response = web.HTTPSeeOther("/dashboard/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def to_overview(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/dashboard")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise ApiError(404, f"nothing at {request.path[:200]}")
    data = resources.files("fleet_server.dashboard").joinpath("static", name).read_bytes()
    kind = "text/css" if name.endswith(".css") else "text/javascript"
    return web.Response(body=data, content_type=kind, headers={"Cache-Control": "max-age=300"})


# -- actions -----------------------------------------------------------------------------


async def rollout_action(request: web.Request) -> web.Response:
    """pause/resume/promote/abort from the dashboard: session, CSRF token, operator role."""
    rollout_id = request.match_info["rollout_id"]
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise ApiError(404, f"nothing at {request.path[:200]}")
    _refuse_other_origins(request, f"{action} of rollout {rollout_id}")
    session = _session(request)
    principal = await _principal(request, session) if session else None
    if session is None or principal is None:
        raise ApiError(401, f"refused: {action} of rollout {rollout_id}: log in first")
    form = await request.post()
    presented = request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD, ""))
    if not csrf_valid(session, presented):
        raise ApiError(
            403, f"refused: {action} of rollout {rollout_id} without this session's CSRF token"
        )
    if not role_allows(principal.role, ACTION_ROLE):
        raise ApiError(
            403,
            f"refused: {action} of rollout {rollout_id} needs the {ACTION_ROLE} role; "
            f"the token {principal.name!r} is {principal.role}",
        )
    reason = str(form.get("reason", "")).strip()[:500] or None
    server = request.app[SERVER]
    shown = await rollouts.act(
        server.db, server.assignments, rollout_id, action, principal.actor, reason
    )
    if request.headers.get(CSRF_HEADER):
        return web.json_response({"id": shown.id, "phase": shown.phase})
    raise web.HTTPSeeOther(f"/dashboard/rollouts/{rollout_id}")


# -- the overview ----------------------------------------------------------------------


def device_state(d: DeviceView) -> str:
    """One word for where a device stands: failed, rolled back, installing, online, offline."""
    outcome = ((d.reported or {}).get("last_outcome") or {}).get("result")
    if outcome == "refused":
        return "failed"
    if outcome == "rolled_back":
        return "rolled back"
    if d.phase in INSTALLING_PHASES:
        return "installing"
    return "online" if d.online else "offline"


def _metric(request: web.Request, name: str, label: str) -> list[tuple[str, float]]:
    """A counter of this server process's metrics by one label, largest first."""
    values: dict[str, float] = {}
    for family in request.app[SERVER].metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "")
                values[key] = values.get(key, 0.0) + sample.value
    return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))


def _alert_rows(alerts: list[AlertView]) -> list[list[str]]:
    return [
        [
            e(a.id),
            e(a.kind),
            (
                f'<a href="/dashboard/devices/{e(a.scope_value)}">{e(a.scope_value)}</a>'
                if a.scope == "device"
                else e(f"{a.scope}:{a.scope_value}" if a.scope_value else a.scope)
            ),
            e(f"{a.model} {a.version}"),
            e(", ".join(f.name or str(f.feature) for f in a.features) or "—"),
            e(a.opened_at.strftime("%Y-%m-%d %H:%M")),
        ]
        for a in alerts
    ]


ALERT_HEADERS = ("Alert", "Kind", "Scope", "Model", "Features", "Opened (UTC)")


async def overview(request: web.Request, principal: Principal) -> PageBody:
    server = request.app[SERVER]
    shown = [device_view(d) for d in await devices.list_devices(server.db)]
    states = Counter(device_state(d) for d in shown)
    by_state = [
        (s, float(states.get(s, 0)))
        for s in ("online", "installing", "failed", "rolled back", "offline")
    ]
    versions = Counter(d.active_bundle or "none" for d in shown)
    hardware = Counter(d.hardware_id for d in shown)
    async with server.db.session() as session:
        silenced = await drift.find_alerts(session, _open_query())
        alerts = [alert_view(a, silenced[1]) for a in silenced[0]]
    ingested = _metric(request, "edgefleet_mqtt_messages_ingested_total", "channel")
    dropped = _metric(request, "edgefleet_mqtt_messages_dropped_total", "reason")
    counts = "".join(
        f'<li><span class="figure" data-state="{e(s)}">{int(n)}</span> {e(s)}</li>'
        for s, n in by_state
    )
    main = (
        f'<p class="lede"><span class="figure" id="device-total">{len(shown)}</span> devices, '
        f'<span class="figure" id="alert-total">{len(alerts)}</span> open alerts</p>'
        + '<div class="grid">'
        + section(
            "Devices by state",
            f'<ul class="counts">{counts}</ul>' + svg.bar_chart("devices by state", by_state),
            ident="by-state",
        )
        + section(
            "By model version",
            svg.bar_chart("devices by model version", _top(versions)),
            ident="by-version",
        )
        + section(
            "By hardware",
            svg.bar_chart("devices by hardware id", _top(hardware)),
            ident="by-hardware",
        )
        + section(
            "Ingest health (this server)",
            table(
                "messages stored by channel",
                ("Channel", "Messages"),
                [[e(k), f'<span class="figure">{int(v)}</span>'] for k, v in ingested],
            )
            + table(
                "messages dropped by reason",
                ("Reason", "Dropped"),
                [[e(k), f'<span class="figure">{int(v)}</span>'] for k, v in dropped],
            ),
            ident="ingest",
        )
        + "</div>"
        + section(
            "Open alerts",
            table("open alerts, newest first", ALERT_HEADERS, _alert_rows(alerts)),
            ident="alerts",
        )
    )
    return "Fleet overview", main


def _open_query() -> Any:
    from protocol.api.drift import AlertQuery

    return AlertQuery(state="open", limit=1000)


def _top(counts: Counter[str], most: int = 12) -> list[tuple[str, float]]:
    ranked = counts.most_common()
    shown = [(k, float(v)) for k, v in ranked[:most]]
    rest = sum(v for _, v in ranked[most:])
    return shown + ([("others", float(rest))] if rest else [])


async def device_search(request: web.Request, principal: Principal) -> PageBody:
    q = request.query.get("q", "").strip()[:100]
    server = request.app[SERVER]
    shown = [device_view(d) for d in await devices.list_devices(server.db)]
    if any(d.id == q for d in shown) and request.headers.get(FRAGMENT_HEADER) != "1":
        raise web.HTTPSeeOther(f"/dashboard/devices/{quote(q)}")  # an exact id: its page
    needle = q.lower()
    found = [
        d
        for d in shown
        if not needle
        or needle in d.id.lower()
        or needle in d.hardware_id.lower()
        or any(needle in t.lower() for t in d.tags)
        or needle in (d.region or "").lower()
    ]
    rows = [
        [
            f'<a href="/dashboard/devices/{e(d.id)}">{e(d.id)}</a>',
            e(device_state(d)),
            e(d.active_bundle),
            e(d.hardware_id),
            e(", ".join(d.tags)),
            e(d.region),
        ]
        for d in found[:500]
    ]
    title = f"Devices matching “{q}”" if q else "Devices"
    return title, table(
        f"{len(found)} devices", ("Device", "State", "Runs", "Hardware", "Tags", "Region"), rows
    )


# -- rollouts --------------------------------------------------------------------------


async def rollout_list(request: web.Request, principal: Principal) -> PageBody:
    listed = await rollouts.list_all(request.app[SERVER].db)
    rows = [
        [
            f'<a href="/dashboard/rollouts/{e(r.id)}">{e(r.id)}</a>',
            e(r.release),
            e(r.select),
            f'<span class="phase phase-{e(r.phase)}">{e(r.phase)}</span>',
            e(f"{r.stage} of {r.stages}"),
            e(r.reason),
            e(r.updated_at.strftime("%Y-%m-%d %H:%M:%S")),
        ]
        for r in listed.rollouts
    ]
    headers = ("Rollout", "Release", "Selector", "Phase", "Stage", "Reason", "Updated (UTC)")
    return "Rollouts", table("rollouts, newest first", headers, rows)


def _wave_phases(
    reached: list[Any], by_id: dict[str, DeviceView], release: str
) -> dict[int, Counter[str]]:
    name, _, version = release.partition("@")
    counts: dict[int, Counter[str]] = {}
    for r in reached:
        d = by_id.get(r.device_id)
        if d is None:
            continue
        state = device_state(d)
        if state == "online" or state == "offline":
            runs = d.active_bundle or ""
            state = "on the release" if version and version in runs and name in runs else "waiting"
        counts.setdefault(r.stage, Counter())[state] += 1
    return counts


PHASE_COLUMNS = ("waiting", "installing", "on the release", "failed", "rolled back")


async def rollout_page(request: web.Request, principal: Principal) -> PageBody:
    server = request.app[SERVER]
    rollout_id = request.match_info["rollout_id"]
    shown = await rollouts.get(server.db, rollout_id)
    async with server.db.session() as session:
        history = list(reversed(await rollout_store.evaluations(session, rollout_id, limit=120)))
        reached = await rollout_store.reached_devices(session, rollout_id)
    by_id = {d.id: device_view(d) for d in await devices.list_devices(server.db)}
    phases = _wave_phases(reached, by_id, shown.spec.release)
    wave_rows = [
        [
            e(s.stage),
            e(f"{s.share:g}%"),
            f'<span class="figure">{s.devices}</span>',
            e("yes" if s.started else "no"),
            *(e(phases.get(s.stage, Counter()).get(c, 0)) for c in PHASE_COLUMNS),
        ]
        for s in shown.stages
    ]
    summary = (
        f'<dl class="facts"><dt>Release</dt><dd>{e(shown.spec.release)}</dd>'
        f"<dt>Selector</dt><dd>{e(str(shown.spec.select))}</dd>"
        f'<dt>Phase</dt><dd><span class="phase phase-{e(shown.phase)}" id="rollout-phase">'
        f"{e(shown.phase)}</span></dd>"
        f"<dt>Stage</dt><dd>{e(shown.stage)} of {len(shown.stages)}</dd>"
        f'<dt>Matched</dt><dd><span class="figure" id="matched">{shown.matched}</span></dd>'
        f'<dt>Reached</dt><dd><span class="figure" id="reached">{shown.reached}</span></dd>'
        f"<dt>Reason</dt><dd>{e(shown.reason)}</dd></dl>"
    )
    actions = ""
    if role_allows(principal.role, ACTION_ROLE):
        own = _session(request)
        csrf = own.csrf if own else ""
        buttons = "".join(
            f'<button type="submit" name="do" formaction="/dashboard/rollouts/{e(rollout_id)}/'
            f'{a}" data-action="{a}">{a.capitalize()}</button>'
            for a in ACTIONS
        )
        actions = section(
            "Actions",
            f'<form class="actions" method="post" action="/dashboard/rollouts/{e(rollout_id)}/'
            f'pause" data-async><input type="hidden" name="csrf" value="{e(csrf)}">'
            '<label for="reason">Reason (optional)</label>'
            f'<input id="reason" name="reason" maxlength="500">{buttons}</form>'
            '<p class="action-result" role="status" aria-live="polite"></p>',
            ident="actions",
        )
    series: dict[str, list[svg.GatePoint]] = {}
    bounds: dict[str, tuple[float, float]] = {}
    for row in history:
        for g in row.gates:
            name = str(g.get("gate"))
            series.setdefault(name, []).append(
                svg.GatePoint(
                    at=row.at.strftime("%Y-%m-%d %H:%M:%S"),
                    estimate=_finite(g.get("estimate")),
                    low=_finite(g.get("low")),
                    high=_finite(g.get("high")),
                    n=int(g.get("n_devices") or 0),
                    decision=str(g.get("decision")),
                )
            )
            bounds[name] = (float(g.get("margin") or 0.0), float(g.get("harm_at") or 0.0))
    for ev in shown.evaluations:
        bounds.setdefault(ev.gate, (ev.margin, ev.harm_at))
    latest = {g.gate: g for g in shown.evaluations}
    gates = (
        "".join(
            f'<figure class="gate" data-gate="{e(name)}"><figcaption><b>{e(name)}</b>'
            + (
                f" — {e(latest[name].decision)}, estimate {e(_fmt(latest[name].estimate))} "
                f"[{e(_fmt(latest[name].low))}, {e(_fmt(latest[name].high))}], "
                f"margin {e(_fmt(latest[name].margin))}, n={latest[name].n_devices}"
                if name in latest
                else ""
            )
            + "</figcaption>"
            + svg.gate_chart(name, series.get(name, []), *bounds[name])
            + "</figure>"
            for name in bounds
        )
        or '<p class="empty">no gate evaluated yet</p>'
    )
    decisions = [
        [
            e(d.seq),
            e(d.at.strftime("%Y-%m-%d %H:%M:%S")),
            e(d.event),
            e(d.by),
            e(f"{d.from_phase} → {d.phase}"),
            f'<span class="rule">{e(d.rule)}</span>',
            e(d.action),
            e(d.reason),
        ]
        for d in reversed(shown.decisions)
    ]
    main = (
        summary
        + actions
        + section(
            "Waves",
            table(
                "waves: devices reached and where each stands",
                ("Wave", "Share", "Devices", "Started", *PHASE_COLUMNS),
                wave_rows,
            ),
            ident="waves",
        )
        + section(
            "Gates over time",
            '<p class="legend">Each evaluation: the estimate (dot) and its anytime-valid '
            "interval (bar), green when it passed, red when it failed; dashed green line: the "
            "margin non-inferiority is shown within; dotted red line: the bound past which harm "
            "is shown (one line when they are the same bound); grey square: not enough "
            "data.</p>"
            f'<div class="gates">{gates}</div>',
            ident="gates",
        )
        + section(
            "Decision log",
            table(
                "decisions, newest first",
                ("#", "At (UTC)", "Event", "By", "Phase", "Rule", "Action", "Reason"),
                decisions,
                cls="decisions",
            ),
            ident="decisions",
        )
    )
    return f"Rollout {shown.id}", main


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


# -- a device --------------------------------------------------------------------------


async def device_page(request: web.Request, principal: Principal) -> PageBody:
    server = request.app[SERVER]
    device_id = request.match_info["device_id"]
    shown = await devices.show_device(server.db, device_id)
    d = with_refusals(device_view(shown.device), shown.refusals, shown.warning)
    events = [event_view(r) for r in await devices.device_events(server.db, device_id, 50)]
    async with server.db.session() as session:
        _, windows, more = await drift.device_windows(
            session, device_id, WindowQuery(limit=20), None
        )
        found, silences = await drift.find_alerts(session, _device_alerts(device_id))
        alerts = [alert_view(a, silences) for a in found]
    reported = d.reported or {}

    def bundle(ref: Any) -> str:
        return e(f"{ref['name']} {ref['version']}") if isinstance(ref, dict) else "—"

    slots = table(
        "slots and what each holds",
        ("Slot", "Holds"),
        [
            ["active", bundle(reported.get("active"))],
            ["previous", bundle(reported.get("previous"))],
            ["installing", bundle(reported.get("installing"))],
            ["shadow", bundle(reported.get("shadow"))],
        ],
    )
    facts = (
        f'<dl class="facts"><dt>State</dt><dd id="device-state">{e(device_state(d))}</dd>'
        f"<dt>Hardware</dt><dd>{e(d.hardware_id)}</dd><dt>Region</dt><dd>{e(d.region)}</dd>"
        f"<dt>Tags</dt><dd>{e(', '.join(d.tags))}</dd>"
        f"<dt>Assigned</dt><dd>{e(d.assigned_target)}</dd>"
        f"<dt>Phase</dt><dd>{e(d.phase)}</dd>"
        f"<dt>Last seen</dt><dd>{e(d.last_seen_at)}</dd>"
        + (f"<dt>Warning</dt><dd>{e(d.assignment_warning)}</dd>" if d.assignment_warning else "")
        + "</dl>"
    )
    event_rows = [
        [
            e(ev.at.strftime("%Y-%m-%d %H:%M:%S")),
            e(ev.kind),
            f'<span class="event">{e(ev.event)}</span>',
            e(ev.details.get("reason") or ev.details.get("result")),
            e(_short(ev.details)),
        ]
        for ev in events
    ]
    refusal_rows = [
        [e(r.at.strftime("%Y-%m-%d %H:%M:%S")), e(r.event), e(r.reason), e(r.bundle), e(r.message)]
        for r in d.refusals
    ]
    window_rows = [
        [e(end.strftime("%Y-%m-%d %H:%M")), e(f"{model} {version}"), e(requests), e(errors)]
        for _, _, end, model, version, requests, errors, _ in windows
    ]
    try:
        plan = plan_view(await server.plans.plan(server.db, device_id))
        o = plan.observed
        hybrid = (
            f'<dl class="facts"><dt>Plan</dt><dd>{e(plan.plan_id)}</dd>'
            f"<dt>Mode</dt><dd>{e(plan.mode)}</dd>"
            f"<dt>Share</dt><dd>{e(_fmt(plan.share))} req/s</dd>"
            f"<dt>Expected offload</dt><dd>{e(_fmt(plan.expected_offload))}</dd>"
            f"<dt>Observed offload</dt><dd>{e(_fmt(o.offload))} ({o.offloaded} of "
            f"{o.requests})</dd><dt>Why</dt><dd>{e(plan.why)}</dd></dl>"
        )
    except PlanNotFound:
        hybrid = '<p class="empty">no hybrid plan</p>'
    main = (
        facts
        + section("Slots", slots, ident="slots")
        + section(
            "Refusals",
            table("latest refusals", ("At", "Event", "Reason", "Bundle", "Message"), refusal_rows),
            ident="refusals",
        )
        + section(
            "Install journal and events",
            table(
                "events, newest first",
                ("At (device clock)", "Kind", "Event", "Reason", "Details"),
                event_rows,
                cls="events",
            ),
            ident="events",
        )
        + section(
            "Windows" + (" (latest 20)" if more else ""),
            table(
                "summary windows, newest first", ("End", "Model", "Requests", "Errors"), window_rows
            ),
            ident="windows",
        )
        + section("Hybrid plan", hybrid, ident="hybrid")
        + section(
            "Alerts",
            table("the device's alerts", ALERT_HEADERS, _alert_rows(alerts)),
            ident="device-alerts",
        )
    )
    return f"Device {d.id}", main


def _device_alerts(device_id: str) -> Any:
    from protocol.api.drift import AlertQuery

    return AlertQuery(device=device_id, limit=100)


def _short(details: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in details.items() if k not in ("reason", "result"))
    return text[:160]


# -- drift -----------------------------------------------------------------------------


async def drift_page(request: web.Request, principal: Principal) -> PageBody:
    """Features × cohorts: the distribution test's statistic against its critical value."""
    server = request.app[SERVER]
    shown = [device_view(d) for d in await devices.list_devices(server.db)]
    cohorts: list[tuple[str, Scope]] = [
        *((f"tag:{t}", Scope("tag", t)) for t in sorted({t for d in shown for t in d.tags})),
        *(
            (f"region:{r}", Scope("region", r))
            for r in sorted({d.region for d in shown if d.region})
        ),
    ][:MAX_COHORTS]
    until = datetime.now(UTC)
    since = until - DRIFT_RANGE
    scopes = [("fleet", Scope("fleet", "")), *cohorts]
    cells: dict[tuple[str, str], Any] = {}
    features: list[str] = []
    accuracy_rows: list[list[str]] = []
    histories: list[str] = []
    decoded: dict[str, Any] = {}  # each window read once for every scope and chart
    async with server.db.session() as session:
        for label, scope in scopes:
            periods, series = await accuracy_history(
                session, server.manifests, scope, since, until, decoded=decoded
            )
            histories += [_accuracy_figure(label, scope, periods, s) for s in series]
            for m in await drift.drift_of(
                session, server.manifests, scope, since, until, decoded=decoded
            ):
                v = model_drift_view(m)
                for f in v.features:
                    name = f.name or str(f.feature)
                    if name not in features:
                        features.append(name)
                    cells[(name, label)] = (f, v)
                if v.accuracy is not None:
                    lab = v.accuracy.labelled
                    accuracy_rows.append(
                        [
                            e(label),
                            e(f"{v.model} {v.version}"),
                            e(_fmt(v.accuracy.estimated)),
                            e(f"[{_fmt(v.accuracy.low)}, {_fmt(v.accuracy.high)}]"),
                            e(_fmt(lab.accuracy) if lab else "—"),
                        ]
                    )
    head = "".join(f'<th scope="col">{e(label)}</th>' for label, _ in scopes)
    body = ""
    for name in features:
        row = f'<th scope="row">{e(name)}</th>'
        for label, _ in scopes:
            cell = cells.get((name, label))
            row += _heat_cell(name, label, cell)
        body += f"<tr>{row}</tr>"
    if not features:
        body = (
            f'<tr><td colspan="{len(scopes) + 1}" class="empty">'
            "no windows in the last 24 h</td></tr>"
        )
    heat = (
        '<div class="scroll"><table class="heat"><caption>distribution test statistic against '
        "its critical value, last 24 h (grey: not enough data)</caption>"
        f'<thead><tr><th scope="col">Feature</th>{head}</tr></thead><tbody>{body}</tbody></table>'
        '</div><p class="legend"><span class="swatch ok"></span> below critical '
        '<span class="swatch drift"></span> past critical <span class="swatch nodata"></span> '
        "not enough data</p>"
    )
    accuracy = table(
        "accuracy estimated without labels (CBPE), with labelled accuracy where labels exist",
        ("Scope", "Model", "Estimated", "Interval", "Labelled"),
        accuracy_rows,
        cls="accuracy",
    )
    over_time = (
        f'<div class="histories">{"".join(histories)}</div>'
        if histories
        else '<p class="empty">no windows in the last 24 h</p>'
    )
    return "Drift", (
        section("Features × cohorts", heat, ident="heat")
        + section("Accuracy", accuracy, ident="accuracy")
        + section("Accuracy over time", over_time, ident="accuracy-history")
    )


def _scope_query(scope: Scope) -> dict[str, str]:
    """``scope`` as the API's query names it."""
    return {"fleet": "true"} if scope.kind == "fleet" else {scope.kind: scope.value}


def _accuracy_figure(label: str, scope: Scope, periods: Periods, series: AccuracySeries) -> str:
    """One scope and model version's accuracy over time: the chart, and the API query that
    gives its numbers (``data-query``)."""
    marks = [
        svg.AccuracyMark(
            t=p.end.timestamp(),
            at=p.end.strftime("%Y-%m-%d %H:%M:%S"),
            estimate=p.estimated,
            low=p.low,
            high=p.high,
            n=p.n,
            labelled=p.labelled,
            labelled_rows=p.labelled_rows,
        )
        for p in series.points
    ]
    api_query = urlencode(
        {
            **_scope_query(scope),
            "model": series.model,
            "version": series.version,
            "since": periods.since.isoformat(),
            "until": periods.until.isoformat(),
            "step_s": f"{periods.step.total_seconds():g}",
        }
    )
    last = series.points[-1] if series.points else None
    latest = (
        f"latest: estimated {_fmt(last.estimated)} [{_fmt(last.low)}, {_fmt(last.high)}], "
        f"labelled {_fmt(last.labelled)} ({last.labelled_rows} rows)"
        if last is not None
        else "no periods"
    )
    problem = f"; {series.problem}" if series.problem else ""
    title = f"{label}, {series.model} {series.version}: accuracy over time"
    return (
        f'<figure class="accuracy-history" data-query="{e(api_query)}">'
        f"<figcaption>{e(label)} · {e(series.model)} {e(series.version)} — {e(latest)}"
        f"{e(problem)}</figcaption>"
        + svg.accuracy_chart(title, marks, series.threshold, series.reference)
        + "</figure>"
    )


def _heat_cell(feature: str, scope: str, cell: Any) -> str:
    if cell is None:
        return '<td class="nodata">no data</td>'
    f, v = cell
    stat = getattr(f, "statistic", None)
    critical = getattr(f, "threshold", None)
    enough = stat is not None and critical is not None and f.n >= v.min_n
    colour = svg.heat_colour(stat if enough else None, critical)
    text = f"{stat:.3g} / {critical:.3g}" if enough else "not enough data"
    link = f"/dashboard/drift/histogram?feature={quote(feature)}&scope={quote(scope)}"
    return (
        f'<td class="{"cell" if enough else "nodata"}" style="background:{colour}">'
        f'<a href="{e(link)}" aria-label="{e(feature)} in {e(scope)}: {e(text)}; histograms">'
        f"{e(text)}</a></td>"
    )


async def drift_histogram(request: web.Request, principal: Principal) -> PageBody:
    """One feature in one scope: the baseline's histogram against the field's, per version."""
    server = request.app[SERVER]
    feature = request.query.get("feature", "")[:100]
    label = request.query.get("scope", "fleet")[:100]
    kind, _, value = label.partition(":")
    scope = (
        Scope("tag", value)
        if kind == "tag" and value
        else Scope("region", value)
        if kind == "region" and value
        else Scope("fleet", "")
    )
    until = datetime.now(UTC)
    groups: dict[tuple[str, str, str], list[Any]] = {}
    charts = []
    async with server.db.session() as session:
        for row in await drift_store.load_windows(session, scope, until - DRIFT_RANGE, until):
            key = (row.model_name, row.model_version, row.baseline_id)
            groups.setdefault(key, []).append(row)
        for (name, version, baseline_id), rows in sorted(groups.items()):
            try:
                manifest = await server.manifests.get(session, name, version)
            except DriftError:
                continue
            names = [f.name for f in manifest.features]
            if manifest.baseline.id != baseline_id or feature not in names:
                continue
            index = names.index(feature)
            try:
                merged = merge_windows(decode_window(r.payload) for r in rows)
            except (WindowCodecError, WindowMergeError, ValueError):
                continue
            base = manifest.baseline.features[index]
            field = merged.features[index]
            charts.append(
                f"<figure><figcaption>{e(name)} {e(version)}: baseline ({base.summary.n} rows, "
                f"blue) against the field ({field.n} values in {len(rows)} windows, orange), "
                "as shares of each; the first and last bins hold what lies beyond the edges"
                "</figcaption>"
                + svg.histogram_chart(
                    f"{feature} in {label}: baseline against field",
                    base.edges,
                    base.summary.counts,
                    field.counts,
                )
                + "</figure>"
            )
    body = "".join(charts) or '<p class="empty">no windows of this feature in the last 24 h</p>'
    return f"{feature} in {label}", section(
        "Baseline against field", body, ident="histograms"
    ) + '<p><a href="/dashboard/drift">Back to the heat map</a></p>'


# -- hybrid ----------------------------------------------------------------------------


async def hybrid_page(request: web.Request, principal: Principal) -> PageBody:
    server = request.app[SERVER]
    capacity = capacity_view(await server.plans.capacity(server.db))
    plans = [plan_view(s) for s in await server.plans.plans(server.db)]
    rows = [
        [
            f'<a href="/dashboard/devices/{e(p.device_id)}">{e(p.device_id)}</a>',
            e(p.mode),
            e(_fmt(p.share)),
            e(_fmt(p.expected_offload)),
            e(_fmt(p.observed.offload)),
            e(f"{p.observed.offloaded} of {p.observed.requests}"),
            e("expired" if p.expired else "in force"),
        ]
        for p in plans
    ]
    shares = [(p.device_id, float(p.share or 0.0)) for p in plans[:30]]
    main = (
        f'<dl class="facts"><dt>Cloud capacity</dt><dd><span class="figure" id="capacity">'
        f"{capacity.capacity:g}</span> req/s</dd><dt>Headroom</dt><dd>{capacity.headroom:g}</dd>"
        f"<dt>Set by</dt><dd>{e(capacity.updated_by or capacity.source)}</dd></dl>"
        + section(
            "Each device's share",
            svg.bar_chart("cloud requests a second granted to each device", shares, width=640),
            ident="shares",
        )
        + section(
            "Plans and observed offload",
            table(
                "plans: each device's share of the cloud and the offload observed under it",
                ("Device", "Mode", "Share (req/s)", "Expected", "Observed", "Offloaded", "Plan"),
                rows,
                cls="plans",
            ),
            ident="plans",
        )
    )
    return "Hybrid", main


PAGES: tuple[tuple[str, str, View], ...] = (
    ("/dashboard", "overview", overview),
    ("/dashboard/devices", "overview", device_search),
    ("/dashboard/devices/{device_id}", "overview", device_page),
    ("/dashboard/rollouts", "rollouts", rollout_list),
    ("/dashboard/rollouts/{rollout_id}", "rollouts", rollout_page),
    ("/dashboard/drift", "drift", drift_page),
    ("/dashboard/drift/histogram", "drift", drift_histogram),
    ("/dashboard/hybrid", "hybrid", hybrid_page),
)


Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


def routes() -> tuple[Route, ...]:
    """Every route of the dashboard: method, path, handler. None is part of the REST API, so
    none is in its OpenAPI document."""
    return (
        *(("GET", path, view(name, render)) for path, name, render in PAGES),
        *(("GET", path, to_overview) for path in ("/", "/ui", "/dashboard/")),
        ("GET", "/dashboard/login", login_form),
        ("POST", "/dashboard/login", login),
        ("POST", "/dashboard/logout", logout),
        ("POST", "/dashboard/rollouts/{rollout_id}/{action}", rollout_action),
        ("GET", "/dashboard/static/{name}", static),
    )


def add_routes(app: web.Application) -> None:
    """Register the dashboard's pages, actions and assets on ``app``."""
    app[SESSIONS] = Sessions()
    for method, path, handler in routes():
        app.router.add_route(method, path, handler)
