"""The drift feature's REST operations: drift, alerts, silences, a device's windows.

Each handler parses nothing itself (its :class:`Operation` declares the query
and body) and calls the service: :mod:`fleet_server.drift.service` for drift,
alerts and windows, :mod:`fleet_server.drift.silences` for acknowledgements
and silences. Labels are their own feature (:mod:`fleet_server.labels.routes`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import (
    AUTH_ERRORS,
    PRINCIPAL,
    SERVER,
    Operation,
    answer,
    body,
    query,
)
from fleet_server.db.models import as_utc
from fleet_server.drift import service
from fleet_server.drift.history import accuracy_history
from fleet_server.drift.models import Scope
from fleet_server.drift.silences import (
    acknowledge,
    active_silences,
    create_silence,
    expire_silence,
    get_alert,
    list_silences,
)
from fleet_server.drift.views import alert_view, model_drift_view, silence_view
from protocol.api.accuracy import AccuracyHistory, AccuracyHistoryQuery
from protocol.api.base import API_PREFIX
from protocol.api.drift import (
    AcknowledgeAlert,
    AlertList,
    AlertQuery,
    AlertView,
    DriftQuery,
    DriftReport,
    SilenceList,
    SilenceQuery,
    SilenceRequest,
    SilenceView,
)
from protocol.api.windows import WindowList, WindowQuery, WindowView
from protocol.cbpe import AccuracyPolicy

DEFAULT_DRIFT_RANGE = timedelta(hours=1)


def _drift_scope(q: DriftQuery) -> Scope:
    if q.fleet:
        return Scope("fleet")
    if q.device is not None:
        return Scope("device", q.device)
    if q.tag is not None:
        return Scope("tag", q.tag)
    if q.hardware_id is not None:
        return Scope("hardware_id", q.hardware_id)
    assert q.region is not None  # the query model insists on one scope
    return Scope("region", q.region)


async def get_drift(request: web.Request) -> web.StreamResponse:
    q = query(request, DriftQuery)
    server = request.app[SERVER]
    scope = _drift_scope(q)
    since, until = _range(q)
    async with server.db.session() as session:
        results = await service.drift_report(
            session, server.manifests, scope, since, until, q.model, q.version
        )
    return answer(
        DriftReport(
            scope=scope.kind,
            scope_value=scope.value,
            since=since,
            until=until,
            models=[model_drift_view(m) for m in results],
        )
    )


def _range(q: DriftQuery) -> tuple[datetime, datetime]:
    try:
        until = as_utc(q.until) if q.until is not None else datetime.now(UTC)
        since = as_utc(q.since) if q.since is not None else until - DEFAULT_DRIFT_RANGE
    except OverflowError:
        raise ApiError(422, "query since/until: out of range (give both, in UTC)") from None
    if since > until:
        raise ApiError(422, "query since: must not be after until")
    return since, until


async def get_accuracy_history(request: web.Request) -> web.StreamResponse:
    q = query(request, AccuracyHistoryQuery)
    server = request.app[SERVER]
    scope = _drift_scope(q)
    since, until = _range(q)
    async with server.db.session() as session:
        await service.check_report_filter(session, scope, q.model, q.version)
        periods, series = await accuracy_history(
            session,
            server.manifests,
            scope,
            since,
            until,
            step_s=q.step_s,
            buckets=q.buckets,
            model_name=q.model,
            model_version=q.version,
            policy=AccuracyPolicy(max_drop=server.config.accuracy_max_drop),
        )
    return answer(
        AccuracyHistory(
            scope=scope.kind,
            scope_value=scope.value,
            since=since,
            until=until,
            step_s=periods.step.total_seconds(),
            series=series,
        )
    )


async def list_alerts(request: web.Request) -> web.StreamResponse:
    q = query(request, AlertQuery)
    async with request.app[SERVER].db.session() as session:
        rows, silences = await service.find_alerts(session, q)
        return answer(AlertList(alerts=[alert_view(a, silences) for a in rows]))


def _alert_id(request: web.Request) -> int:
    return int(request.match_info["alert_id"])


async def get_alert_by_id(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVER].db.session() as session:
        row = await get_alert(session, _alert_id(request))
        return answer(alert_view(row, await active_silences(session)))


async def acknowledge_alert(request: web.Request) -> web.StreamResponse:
    b = body(request, AcknowledgeAlert)
    async with request.app[SERVER].db.session() as session:
        row = await acknowledge(session, _alert_id(request), request[PRINCIPAL].actor, b.comment)
        return answer(alert_view(row, await active_silences(session)))


async def create_alert_silence(request: web.Request) -> web.StreamResponse:
    b = body(request, SilenceRequest)
    async with request.app[SERVER].db.session() as session:
        silence = await create_silence(session, b, request[PRINCIPAL].actor)
        view = silence_view(silence, await service.open_alerts(session), datetime.now(UTC))
    return answer(view, 201)


async def list_alert_silences(request: web.Request) -> web.StreamResponse:
    q = query(request, SilenceQuery)
    now = datetime.now(UTC)
    async with request.app[SERVER].db.session() as session:
        silences = await list_silences(session, q.state, q.limit, now)
        open_alerts = await service.open_alerts(session)
        return answer(SilenceList(silences=[silence_view(s, open_alerts, now) for s in silences]))


async def expire_alert_silence(request: web.Request) -> web.StreamResponse:
    silence_id = int(request.match_info["silence_id"])
    async with request.app[SERVER].db.session() as session:
        silence = await expire_silence(session, silence_id, request[PRINCIPAL].actor)
        view = silence_view(silence, await service.open_alerts(session), datetime.now(UTC))
    return answer(view)


# -- a device's windows (for labelling) --------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def window_cursor(end: datetime, window_id: str) -> str:
    """Where a page of windows stopped, URL-safe: ``MICROSECONDS~WINDOW_ID`` of its last one."""
    return f"{(as_utc(end) - _EPOCH) // _MICROSECOND}~{window_id}"


def _window_cursor(text_: str) -> tuple[datetime, str]:
    micros, sep, window_id = text_.partition("~")
    try:
        if not sep or not window_id:
            raise ValueError
        return _EPOCH + timedelta(microseconds=int(micros)), window_id
    except (ValueError, OverflowError):
        raise ApiError(422, "query before: not a next_before this API handed out") from None


async def device_windows(request: web.Request) -> web.StreamResponse:
    q = query(request, WindowQuery)
    if q.since is not None and q.until is not None and as_utc(q.since) > as_utc(q.until):
        raise ApiError(422, "query since: must not be after until")
    before = _window_cursor(q.before) if q.before is not None else None
    async with request.app[SERVER].db.session() as session:
        device_id, page, more = await service.device_windows(
            session, request.match_info["device_id"], q, before
        )
    windows = [
        WindowView(
            window_id=window_id,
            start=as_utc(start),
            end=as_utc(end),
            model=model,
            version=version,
            requests=requests,
            errors=errors,
            labelled=bool(labelled),
        )
        for window_id, start, end, model, version, requests, errors, labelled in page
    ]
    return answer(
        WindowList(
            device_id=device_id,
            windows=windows,
            next_before=window_cursor(windows[-1].end, windows[-1].window_id) if more else None,
        )
    )


# -- the feature's part of the operations table -------------------------------------

V = API_PREFIX

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", f"{V}/drift", get_drift, "getDrift",
        "Drift per feature of a device's or a cohort's windows, per model version",
        tag="drift", auth="viewer", query=DriftQuery, response=DriftReport,
        errors=(*AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "GET", f"{V}/accuracy/history", get_accuracy_history, "getAccuracyHistory",
        "CBPE's estimated accuracy and the labelled accuracy of a device's or a cohort's "
        "windows over time, per model version",
        tag="drift", auth="viewer", query=AccuracyHistoryQuery, response=AccuracyHistory,
        errors=(*AUTH_ERRORS, 404, 422),
    ),
    Operation(
        "GET", f"{V}/alerts", list_alerts, "listAlerts",
        "Drift and estimated-accuracy alerts (one per scope and cause), filtered, newest first",
        tag="drift", auth="viewer", query=AlertQuery, response=AlertList,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "GET", f"{V}/alerts/{{alert_id}}", get_alert_by_id, "getAlert", "Show one alert",
        tag="drift", auth="viewer", response=AlertView, errors=(*AUTH_ERRORS, 404),
    ),
    Operation(
        "POST", f"{V}/alerts/{{alert_id}}/ack", acknowledge_alert, "acknowledgeAlert",
        "Acknowledge an open alert: it is not notified again and still closes when it clears",
        tag="drift", auth="operator", body=AcknowledgeAlert, response=AlertView,
        errors=(400, *AUTH_ERRORS, 404, 409, 413, 422),
    ),
    Operation(
        "GET", f"{V}/silences", list_alert_silences, "listSilences",
        "Silences, newest first (active ones by default)",
        tag="drift", auth="viewer", query=SilenceQuery, response=SilenceList,
        errors=(*AUTH_ERRORS, 422),
    ),
    Operation(
        "POST", f"{V}/silences", create_alert_silence, "createSilence",
        "Silence the alerts that match (or one alert's scope and cause) for a while",
        tag="drift", auth="operator", body=SilenceRequest, response=SilenceView, status=201,
        errors=(400, *AUTH_ERRORS, 404, 413, 422),
    ),
    Operation(
        "DELETE", f"{V}/silences/{{silence_id}}", expire_alert_silence, "expireSilence",
        "End a silence now",
        tag="drift", auth="operator", response=SilenceView, errors=(*AUTH_ERRORS, 404, 409),
    ),
    Operation(
        "GET", f"{V}/devices/{{device_id}}/windows", device_windows, "listDeviceWindows",
        "A device's windows (ids to label), newest first, a page at a time",
        tag="drift", auth="viewer", query=WindowQuery, response=WindowList,
        errors=(*AUTH_ERRORS, 404, 422),
    ),
)
# fmt: on
