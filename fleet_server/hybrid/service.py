"""The planning service: gathers each device's demand, plans the fleet, stores and signs plans.

One step (:meth:`PlanService.step`, the ``hybrid planning`` job, and at once after an
operator changes the capacity or a device's weight or opt-out):

1. read what the checks need: devices, stored plans, the cloud's capacity, each
   device's hourly hybrid stats of the last ``lookback``, the stats of its current
   plan (and the renewals of the same plan), open drift alerts, the calibration
   temperature of each device's active release;
2. ask :mod:`fleet_server.hybrid.watch` why the fleet must be planned again; with
   no reason, stop (but sign what a failed signing left behind);
   Until a capacity is known (set by an operator, or configured) no plan is made.
3. plan every device at once (:func:`fleet_server.hybrid.planner.plan_fleet`, the
   weighted max-min split of the capacity), then per device: a plan whose
   parameters changed, that nears its expiry, or whose device gave its own reason
   is issued anew (a new ``p-{12 hex}`` id, ``issued_at`` now, the TTL); the others
   keep their signed plan and only their ``inputs`` are updated;
4. in one transaction: the plan rows, the plans of devices that left deleted, each
   device to sign its next director version recorded (the assignment's
   record-then-sign discipline: the same counter, so an assignment never collides
   with a plan), and one audit entry (``hybrid.plan``) with the reasons;
5. after the commit: sign each changed plan into its device's director metadata
   (:meth:`fleet_server.director.DirectorRepository.sign_plan`; a dropped plan is
   signed away) and announce the new director version, so an online device
   refreshes now. A signing that fails, or is overtaken by an assignment signed
   meanwhile (which keeps the plan the metadata listed before), is done again at
   the next step.

Several replicas: one plans at a time (PostgreSQL advisory lock; a replica that
finds it taken skips the step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text

from fleet_server.assignments.store import lock_recorded_versions
from fleet_server.audit import record as audit
from fleet_server.db import Database
from fleet_server.db.models import AlertRow, CloudSettings, Device, HybridPlanRow
from fleet_server.devices.errors import DeviceNotFound
from fleet_server.director import DirectorRepository
from fleet_server.drift.models import DriftError
from fleet_server.drift.store import ManifestCache
from fleet_server.errors import Conflict, Invalid
from fleet_server.hybrid import store
from fleet_server.hybrid.aggregates import HybridDelta
from fleet_server.hybrid.demand import DeviceInputs, device_inputs, fleet_demand
from fleet_server.hybrid.planner import PLAN_REASONS, FleetPlan, PlannerSettings, plan_fleet
from fleet_server.hybrid.watch import (
    Observed,
    agreement_reason,
    changed_reason,
    expiry_reason,
    load_reason,
    observed,
    offload_reason,
    wilson,
)
from fleet_server.release.keys import KeyStore
from fleet_server.stored_json import finite_or_none
from protocol.hybrid import PLAN_MODES, HybridPlan

log = logging.getLogger(__name__)

ACTOR = "hybrid-planner"
# The advisory lock a replica holds while it plans (PostgreSQL).
PLAN_LOCK_ID = 0x687962726964  # "hybrid"
_PLANNING: weakref.WeakKeyDictionary[Database, asyncio.Lock] = weakref.WeakKeyDictionary()
# Renewals of an unchanged plan whose stats still count as the plan's.
KEEP_CONTINUES = 5
# A device bringing this share more than its quota to a loaded endpoint is planned afresh.
QUOTA_SLACK = 0.1
# Devices whose plan is signed at once (each in a thread).
SIGNING_AT_ONCE = 8
# Devices and reasons named in one audit entry.
AUDIT_NAMED = 50

Announce = Callable[[Database, Sequence[str]], Awaitable[None]]


class PlanNotFound(DeviceNotFound):
    """The device has no plan (or is not a device)."""


class CapacityInvalid(Invalid):
    """A capacity or headroom out of range."""


class DeviceGone(Conflict):
    """The device is decommissioned: it has no plan and gets none."""


@dataclass(frozen=True)
class HybridSettings:
    """The planning service's knobs (from :class:`fleet_server.config.ServerConfig`)."""

    ttl: timedelta = timedelta(minutes=10)
    renew_before: timedelta = timedelta(minutes=3)
    lookback: timedelta = timedelta(hours=1)
    default_capacity: float = 0.0
    default_headroom: float = 0.1
    audit_rate: float = 0.02
    interval_confidence: float = 0.99  # two-sided level of the Wilson intervals
    bootstrap_rate: float = 0.0  # cloud requests a second for a device with no rate yet
    cloud_model: str | None = None
    max_link_errors: float = 0.2
    max_link_latency_ms: float = 1000.0
    burst_seconds: float = 2.0
    cloud_first_when_covered: bool = False


@dataclass(frozen=True)
class Capacity:
    """The capacity C the planner splits, and where it comes from."""

    capacity: float
    headroom: float
    source: str  # "operator" (cloud_settings) or "default" (server configuration)
    updated_at: datetime | None = None
    updated_by: str | None = None


@dataclass
class Snapshot:
    """What one step reads."""

    devices: list[Device]
    plans: dict[str, HybridPlanRow]
    capacity: Capacity
    recent: dict[str, list[HybridDelta]]  # read only when planning (histograms)
    current: dict[str, list[HybridDelta]]  # each plan's rows, counts only (with its renewals)
    alerts: dict[str, list[int]]  # open drift alerts that concern each device
    temperatures: dict[str, tuple[float, str]]  # device -> (T, where it came from)


@dataclass
class PlanRun:
    """What one planning run did."""

    reasons: list[str]
    device_reasons: dict[str, list[str]]
    issued: list[str] = field(default_factory=list)  # devices whose plan was (re)issued
    dropped: list[str] = field(default_factory=list)
    kept: int = 0
    signed: int = 0


def capacity_of(row: CloudSettings | None, settings: HybridSettings) -> Capacity:
    """The operator's capacity when set, else the configured default."""
    if row is None:
        return Capacity(settings.default_capacity, settings.default_headroom, "default")
    return Capacity(row.capacity, row.headroom, "operator", row.updated_at, row.updated_by)


def plan_ids_of(row: HybridPlanRow) -> list[str]:
    """The plan and the unchanged plans it renewed: whose stats count as its."""
    continues = row.inputs.get("continues") if isinstance(row.inputs, dict) else None
    more = [str(p) for p in continues] if isinstance(continues, list) else []
    return [row.plan_id, *more]


def _alert_concerns(alert: AlertRow, device: Device) -> bool:
    model = (device.active_bundle or "").split(" ")[0]
    if alert.model_name != model and alert.scope != "device":
        return False
    return (
        (alert.scope == "device" and alert.scope_value == device.id)
        or (alert.scope == "tag" and alert.scope_value in (device.tags or []))
        or (alert.scope == "hardware_id" and alert.scope_value == device.hardware_id)
        or (alert.scope == "region" and alert.scope_value == device.region)
        or alert.scope == "fleet"
    )


def replan_reasons(
    snap: Snapshot, now: datetime, settings: HybridSettings
) -> tuple[list[str], dict[str, list[str]]]:
    """Why the fleet, and why each device, must be planned again (empty: they need not)."""
    fleet: list[str] = []
    per: dict[str, list[str]] = {}
    active = {d.id: d for d in snap.devices}
    joined = sorted(set(active) - set(snap.plans))
    left = sorted(set(snap.plans) - set(active))
    if joined:
        fleet.append(f"{len(joined)} device(s) joined: {', '.join(joined[:10])}")
    if left:
        fleet.append(f"{len(left)} device(s) left: {', '.join(left[:10])}")
    cap = snap.capacity
    load = 0.0
    loads: dict[str, tuple[float, float]] = {}  # device -> (cloud rate, quota rate)
    capacity_noted = False
    for device_id, row in snap.plans.items():
        device = active.get(device_id)
        if device is None:
            continue
        inputs = row.inputs if isinstance(row.inputs, dict) else {}
        if not capacity_noted:
            for what, before, value in (
                ("capacity", inputs.get("capacity"), cap.capacity),
                ("headroom", inputs.get("headroom"), cap.headroom),
            ):
                reason = changed_reason(what, before, value)
                if reason is not None:
                    fleet.append(reason)
                    capacity_noted = True
        reasons = [
            r
            for r in (
                changed_reason("weight", inputs.get("weight"), device.hybrid_weight),
                changed_reason("offload opt-out", inputs.get("opted_out"), device.offload_opt_out),
                changed_reason(
                    "temperature",
                    inputs.get("temperature"),
                    snap.temperatures.get(device_id, (1.0, ""))[0],
                ),
                expiry_reason(row.expires_at, now, settings.renew_before),
            )
            if r is not None
        ]
        seen = observed(snap.current.get(device_id, []))
        load += seen.cloud_rate
        loads[device_id] = (seen.cloud_rate, row.quota_rate)
        if inputs.get("planner_reason") == "no_requests" and seen.requests > 0:
            reasons.append(
                f"{seen.requests} requests seen since a plan made when it had served none"
            )
        expected = inputs.get("expected_offload")
        if row.mode != "local" and isinstance(expected, float | int):
            reason = offload_reason(float(expected), seen, settings.interval_confidence)
            if reason is not None:
                reasons.append(reason)
        reason = agreement_reason(seen, settings.interval_confidence)
        if reason is not None:
            reasons.append(reason)
        planned_with = set(inputs.get("drift_alerts") or [])
        new_alerts = [a for a in snap.alerts.get(device_id, []) if a not in planned_with]
        if new_alerts:
            reasons.append(f"drift flagged (alert {', '.join(map(str, new_alerts))})")
        if reasons:
            per[device_id] = reasons
    reason = load_reason(load, cap.capacity)
    if reason is not None:
        fleet.append(reason)
        # Those bringing more than their quota are planned afresh (a new plan watched from
        # its first window), so the same windows do not call for a re-plan at every step.
        for device_id, (rate, quota) in sorted(loads.items()):
            if rate > quota * (1 + QUOTA_SLACK) + 1e-9:
                per.setdefault(device_id, []).append(
                    f"brought {rate:.2f}/s to the cloud against its quota {quota:.2f}/s"
                )
    return fleet, per


def explain(
    reason: str, mode: str, inputs: DeviceInputs, settings: HybridSettings, share: float
) -> str:
    """One sentence: why the device got its mode (``reason``: the planner's, PLAN_REASONS)."""
    if reason == "opted_out":
        return "the device opted out of offloading: local only"
    if reason == "link_errors":
        return (
            f"{inputs.link_errors:.0%} of its cloud calls failed (above "
            f"{settings.max_link_errors:.0%}): local only"
        )
    if reason == "link_latency":
        return (
            f"its cloud latency p95 {inputs.link_latency_p95_ms:.0f} ms is above "
            f"{settings.max_link_latency_ms:.0f} ms: local only"
        )
    if reason == "no_requests":
        return "no requests seen yet: local only"
    if reason == "no_capacity":
        return "no cloud capacity to share: local only"
    if reason == "bootstrap":
        return f"no requests seen yet; {share:.3g}/s of capacity left over lets it start"
    if mode == "cloud_first":
        return f"its share {share:.3g}/s covers all its {inputs.rate:.3g} requests/s: cloud first"
    if mode == "local":
        return "its share of the cloud's capacity is 0: local only"
    return (
        f"its share {share:.3g}/s of its {inputs.rate:.3g} requests/s: requests whose "
        "calibrated confidence is below tau go to the cloud"
    )


def _same_plan(plan: HybridPlan, old: Mapping[str, Any] | None) -> bool:
    if not old:
        return False
    try:
        before = HybridPlan.model_validate(old)
    except ValueError:
        return False
    return (
        before.mode == plan.mode
        and math.isclose(before.tau, plan.tau, abs_tol=1e-6)
        and math.isclose(before.quota_rate, plan.quota_rate, rel_tol=1e-6, abs_tol=1e-9)
        and before.quota_burst == plan.quota_burst
        and math.isclose(before.audit_rate, plan.audit_rate, abs_tol=1e-9)
        and math.isclose(before.temperature, plan.temperature, rel_tol=1e-9)
        and before.cloud_model == plan.cloud_model
    )


def new_plan_id() -> str:
    """A fresh plan id, ``p-`` and 12 hex digits."""
    return f"p-{secrets.token_hex(6)}"


class PlanService:
    """Plans, stores and signs every device's hybrid plan; see the module's steps."""

    def __init__(
        self,
        director: DirectorRepository,
        keys: KeyStore,
        manifests: ManifestCache | None,
        settings: HybridSettings,
        announce: Announce | None = None,
    ) -> None:
        self.director = director
        self.keys = keys
        self.manifests = manifests
        self.settings = settings
        self.announce = announce
        # Devices whose plan signing failed or was overtaken: signed again at the next step.
        self.unsigned: set[str] = set()
        self._checked_signatures = False

    # -- the loop ---------------------------------------------------------------------

    async def step(
        self, db: Database, now: datetime | None = None, *, forced: Sequence[str] = ()
    ) -> PlanRun | None:
        """Plan again if anything calls for it (or ``forced`` names a reason); sign what is
        unsigned. Returns the run (``None``: nothing to plan, or another replica plans)."""
        now = now or datetime.now(UTC)
        async with self._one_at_a_time(db) as held:
            if not held:
                return None
            snap = await self._read(db, now)
            if not snap.plans and snap.capacity.source == "default" and snap.capacity.capacity <= 0:
                # No cloud configured: hybrid inference is off and nothing is signed.
                await self._sign_pending(db, None)
                return None
            reasons, per = replan_reasons(snap, now, self.settings)
            reasons = [*forced, *reasons]
            run = None
            if reasons or per:
                snap.recent = await self._recent(db, now)
                run = await self._plan(db, snap, now, reasons, per)
            await self._sign_pending(db, run)
            return run

    @asynccontextmanager
    async def _one_at_a_time(self, db: Database) -> AsyncIterator[bool]:
        lock = _PLANNING.setdefault(db, asyncio.Lock())
        async with lock, db.session() as guard:
            if db.is_postgres:
                held = await guard.scalar(
                    text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": PLAN_LOCK_ID}
                )
                yield bool(held)
            else:
                yield True

    async def _read(self, db: Database, now: datetime) -> Snapshot:
        async with db.session() as session:
            devices = await store.active_devices(session)
            plans = {p.device_id: p for p in await store.plans(session)}
            capacity = capacity_of(await store.cloud_settings(session), self.settings)
            owner = {pid: row.device_id for row in plans.values() for pid in plan_ids_of(row)}
            current: dict[str, list[HybridDelta]] = {}
            for d in await store.plan_counts(session, list(owner)):
                if owner.get(d.plan_id) == d.device_id:
                    current.setdefault(d.device_id, []).append(d)
            open_alerts = (
                await session.scalars(select(AlertRow).where(AlertRow.state == "open"))
            ).all()
            alerts = {
                d.id: sorted(a.id for a in open_alerts if _alert_concerns(a, d)) for d in devices
            }
            temperatures = await self._temperatures(session, devices)
        return Snapshot(devices, plans, capacity, {}, current, alerts, temperatures)

    async def _recent(self, db: Database, now: datetime) -> dict[str, list[HybridDelta]]:
        """Each device's rows of the hours of the last ``lookback`` (read only to plan)."""
        since = (now - self.settings.lookback).replace(minute=0, second=0, microsecond=0)
        recent: dict[str, list[HybridDelta]] = {}
        async with db.session() as session:
            for d in await store.hybrid_stats(session, since):
                recent.setdefault(d.device_id, []).append(d)
        return recent

    async def _temperatures(
        self, session: Any, devices: Sequence[Device]
    ) -> dict[str, tuple[float, str]]:
        """Each device's calibration temperature: its active release's manifest's
        ``fallback.temperature`` (1.0 when it reports none or the manifest is not known)."""
        by_bundle: dict[str, tuple[float, str]] = {}
        out: dict[str, tuple[float, str]] = {}
        for device in devices:
            bundle = device.active_bundle
            if bundle is None or self.manifests is None or " " not in bundle:
                out[device.id] = (1.0, "default (no active release reported)")
                continue
            if bundle not in by_bundle:
                name, version = bundle.split(" ", 1)
                try:
                    manifest = await self.manifests.get(session, name, version)
                    by_bundle[bundle] = (manifest.fallback.temperature, f"{name} {version}")
                except DriftError as exc:
                    by_bundle[bundle] = (1.0, f"default ({exc})")
            out[device.id] = by_bundle[bundle]
        return out

    async def _plan(
        self,
        db: Database,
        snap: Snapshot,
        now: datetime,
        reasons: list[str],
        per: dict[str, list[str]],
    ) -> PlanRun:
        s = self.settings
        run = PlanRun(reasons=reasons, device_reasons=per)
        inputs = [
            device_inputs(
                d.id,
                weight=d.hybrid_weight,
                opted_out=d.offload_opt_out,
                temperature=snap.temperatures.get(d.id, (1.0, ""))[0],
                recent=snap.recent.get(d.id, []),
                link_plans=plan_ids_of(snap.plans[d.id]) if d.id in snap.plans else None,
            )
            for d in snap.devices
        ]
        cap = snap.capacity
        result: FleetPlan = plan_fleet(
            fleet_demand(inputs),
            PlannerSettings(
                capacity=cap.capacity,
                headroom=cap.headroom,
                audit_rate=s.audit_rate,
                max_link_errors=s.max_link_errors,
                max_link_latency_ms=s.max_link_latency_ms,
                burst_seconds=s.burst_seconds,
                cloud_first_when_covered=s.cloud_first_when_covered,
                bootstrap_rate=s.bootstrap_rate,
            ),
        )
        rows: list[dict[str, Any]] = []
        for i, device_inputs_ in enumerate(inputs):
            device_id = device_inputs_.device_id
            old = snap.plans.get(device_id)
            mode = PLAN_MODES[int(result.mode[i])]
            share = float(result.share[i])
            candidate = HybridPlan(
                plan_id=new_plan_id(),
                device_id=device_id,
                mode=mode,
                temperature=device_inputs_.temperature,
                tau=float(min(max(result.tau[i], 0.0), 1.0)),
                quota_rate=max(float(result.quota_rate[i]), 0.0),
                quota_burst=int(result.quota_burst[i]) if mode != "local" else 0,
                audit_rate=float(min(max(result.audit_rate[i], 0.0), 1.0)),
                cloud_model=s.cloud_model,
                issued_at=now,
                expires_at=now + s.ttl,
            )
            own = per.get(device_id, [])
            expiring = old is not None and old.expires_at - now <= s.renew_before
            unchanged = old is not None and _same_plan(candidate, old.plan)
            renew = old is None or not unchanged or expiring or bool(own)
            details: dict[str, Any] = {
                "planned_at": now.isoformat(),
                "reasons": [*reasons, *own],
                "rate": finite_or_none(device_inputs_.rate),
                "requests_counted": device_inputs_.requests,
                "seconds_counted": finite_or_none(device_inputs_.seconds),
                "weight": device_inputs_.weight,
                "opted_out": device_inputs_.opted_out,
                "temperature": device_inputs_.temperature,
                "temperature_from": snap.temperatures.get(device_id, (1.0, "default"))[1],
                "confidence_source": device_inputs_.source,
                "link_errors": finite_or_none(device_inputs_.link_errors),
                "link_latency_p95_ms": finite_or_none(device_inputs_.link_latency_p95_ms),
                "capacity": cap.capacity,
                "headroom": cap.headroom,
                "capacity_source": cap.source,
                "level": finite_or_none(float(result.level)),
                "share": finite_or_none(share),
                "tau": candidate.tau,
                "expected_offload": finite_or_none(float(result.expected_offload[i])),
                "why": explain(PLAN_REASONS[int(result.reason[i])], mode, device_inputs_, s, share),
                "planner_reason": PLAN_REASONS[int(result.reason[i])],
                "drift_alerts": snap.alerts.get(device_id, []),
                "interval_confidence": s.interval_confidence,
            }
            if renew:
                # A plan renewed only for its expiry is the same plan: its stats carry on.
                # Issued for a device's own reason, it is watched afresh.
                expiry = expiry_reason(old.expires_at, now, s.renew_before) if old else None
                renewal = old is not None and unchanged and not [r for r in own if r != expiry]
                details["continues"] = (
                    plan_ids_of(old)[:KEEP_CONTINUES] if renewal and old is not None else []
                )
                details["issued_for"] = [*reasons, *own] or ["first plan"]
                run.issued.append(device_id)
                rows.append({"device_id": device_id, "plan": candidate, "inputs": details})
            else:
                assert old is not None
                details["continues"] = [str(p) for p in (old.inputs.get("continues") or [])]
                details["issued_for"] = old.inputs.get("issued_for", [])
                rows.append({"device_id": device_id, "plan": None, "inputs": details})
                run.kept += 1
        active = {d.id for d in snap.devices}
        run.dropped = sorted(set(snap.plans) - active)
        to_sign = sorted([*run.issued, *run.dropped])
        async with db.session() as session:
            recorded = await lock_recorded_versions(session, to_sign) if to_sign else {}
            signed = await asyncio.to_thread(
                lambda: {d: self.director.signed(d).version for d in to_sign}
            )
            stored = {p.device_id: p for p in await store.plans(session, lock=True)}
            for item in rows:
                row = stored.get(item["device_id"])
                plan: HybridPlan | None = item["plan"]
                if plan is None:
                    if row is not None:
                        row.inputs = item["inputs"]
                    continue
                values = {
                    "plan_id": plan.plan_id,
                    "mode": plan.mode,
                    "quota_rate": plan.quota_rate,
                    "quota_burst": plan.quota_burst,
                    "issued_at": plan.issued_at,
                    "expires_at": plan.expires_at,
                    "plan": plan.model_dump(mode="json"),
                    "inputs": item["inputs"],
                }
                if row is None:
                    session.add(HybridPlanRow(device_id=item["device_id"], **values))
                else:
                    for k, v in values.items():
                        setattr(row, k, v)
            await store.drop_plans(session, run.dropped)
            devices = {
                d.id: d
                for d in (await session.scalars(select(Device).where(Device.id.in_(to_sign)))).all()
            }
            for device_id in to_sign:
                device = devices.get(device_id)
                if device is None:
                    continue
                version = max(recorded.get(device_id) or 0, signed[device_id]) + 1
                device.director_version = version
                self.unsigned.add(device_id)
            await audit(
                session,
                ACTOR,
                "hybrid.plan",
                "fleet",
                {
                    "reasons": reasons[:AUDIT_NAMED],
                    "device_reasons": dict(sorted(per.items())[:AUDIT_NAMED]),
                    "devices": len(inputs),
                    "issued": run.issued[:AUDIT_NAMED],
                    "issued_count": len(run.issued),
                    "kept": run.kept,
                    "dropped": run.dropped[:AUDIT_NAMED],
                    "capacity": cap.capacity,
                    "headroom": cap.headroom,
                    "level": finite_or_none(float(result.level)),
                },
            )
        return run

    async def _sign_pending(self, db: Database, run: PlanRun | None) -> None:
        """Sign each device's stored plan (or its absence) where the director lacks it."""
        if not self._checked_signatures:
            self._checked_signatures = True
            async with db.session() as session:
                planned = {p.device_id for p in await store.plans(session)}
                gone = set(
                    (
                        await session.scalars(
                            select(Device.id).where(Device.decommissioned_at.is_not(None))
                        )
                    ).all()
                )
            self.unsigned |= planned | gone
        if not self.unsigned:
            return
        pending = sorted(self.unsigned)
        async with db.session() as session:
            rows = {p.device_id: p for p in await store.plans(session)}
            recorded = dict(
                (
                    await session.execute(
                        select(Device.id, Device.director_version).where(Device.id.in_(pending))
                    )
                ).all()
            )
        signed_now: list[str] = []
        behind: list[str] = []
        # Each device's metadata is its own files and lock: several are signed at once, so
        # their writes' fsyncs overlap.
        slots = asyncio.Semaphore(SIGNING_AT_ONCE)

        def sign_one(device_id: str) -> str | None:
            """``"signed"``, ``"behind"`` (a newer version is recorded first) or ``None``."""
            row = rows.get(device_id)
            plan = HybridPlan.model_validate(row.plan) if row is not None else None
            signed = self.director.signed(device_id)
            if (signed.version == 0 and plan is None) or signed.plan_id == (
                plan.plan_id if plan else None
            ):
                self.unsigned.discard(device_id)
                return None
            want = recorded.get(device_id) or 0
            if signed.version >= want:
                return "behind"
            if self.director.sign_plan(self.keys, device_id, plan, want) == want:
                self.unsigned.discard(device_id)
                return "signed"
            return None

        async def one(device_id: str) -> None:
            async with slots:
                try:
                    done = await asyncio.to_thread(sign_one, device_id)
                except Exception as exc:  # one device's failure must not stop the others
                    log.warning("could not sign the hybrid plan of %s: %r; retried", device_id, exc)
                    return
            if done == "signed":
                signed_now.append(device_id)
            elif done == "behind":
                behind.append(device_id)

        await asyncio.gather(*(one(d) for d in pending))
        signed_now.sort()
        behind.sort()
        if behind:
            async with db.session() as session:
                now_recorded = await lock_recorded_versions(session, behind)
                for device in (
                    await session.scalars(select(Device).where(Device.id.in_(behind)))
                ).all():
                    signed_version = (
                        await asyncio.to_thread(self.director.signed, device.id)
                    ).version
                    device.director_version = (
                        max(now_recorded.get(device.id) or 0, signed_version) + 1
                    )
            # Signed at the next step at the version just recorded.
        if run is not None:
            run.signed = len(signed_now)
        if signed_now and self.announce is not None:
            try:
                await self.announce(db, signed_now)
            except Exception as exc:
                log.warning("announcing new plans failed: %s", exc)

    # -- operators --------------------------------------------------------------------

    async def capacity(self, db: Database) -> Capacity:
        """The capacity the planner splits now."""
        async with db.session() as session:
            return capacity_of(await store.cloud_settings(session), self.settings)

    async def set_capacity(
        self, db: Database, *, capacity: float, headroom: float, actor: str
    ) -> Capacity:
        """Set C and the headroom (audited ``cloud.capacity``), then plan the fleet again."""
        if not (math.isfinite(capacity) and capacity >= 0):
            raise CapacityInvalid(f"capacity {capacity} must be a number >= 0 (requests a second)")
        if not (math.isfinite(headroom) and 0 <= headroom < 1):
            raise CapacityInvalid(f"headroom {headroom} must be >= 0 and < 1")
        now = datetime.now(UTC)
        async with db.session() as session:
            row = await store.cloud_settings(session)
            before = capacity_of(row, self.settings)
            if row is None:
                session.add(
                    CloudSettings(
                        id=1, capacity=capacity, headroom=headroom, updated_at=now, updated_by=actor
                    )
                )
            else:
                row.capacity, row.headroom = capacity, headroom
                row.updated_at, row.updated_by = now, actor
            await audit(
                session,
                actor,
                "cloud.capacity",
                "cloud",
                {
                    "capacity": capacity,
                    "headroom": headroom,
                    "before": {"capacity": before.capacity, "headroom": before.headroom},
                },
            )
        await self._replan_now(db, f"capacity set to {capacity:g}/s by {actor}")
        return await self.capacity(db)

    async def _replan_now(self, db: Database, reason: str) -> None:
        """Plan at once after an operator's change; a failure is logged, and the planning
        job, which sees the change too, plans at its next run."""
        try:
            await self.step(db, forced=[reason])
        except Exception:
            log.exception("planning after %r failed; the planning job tries again", reason)

    async def set_device(
        self,
        db: Database,
        device_id: str,
        *,
        weight: float | None,
        offload_opt_out: bool | None,
        actor: str,
    ) -> Device:
        """Set a device's weight and opt-out (audited ``device.hybrid``), then plan again."""
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise CapacityInvalid(f"weight {weight} must be a number > 0")
        async with db.session() as session:
            device = await session.get(Device, device_id)
            if device is None:
                raise DeviceNotFound(f"no device {device_id}")
            if device.decommissioned_at is not None:
                raise DeviceGone(f"{device_id} is decommissioned; it is planned nothing")
            before = {"weight": device.hybrid_weight, "offload_opt_out": device.offload_opt_out}
            if weight is not None:
                device.hybrid_weight = weight
            if offload_opt_out is not None:
                device.offload_opt_out = offload_opt_out
            after = {"weight": device.hybrid_weight, "offload_opt_out": device.offload_opt_out}
            await audit(session, actor, "device.hybrid", device_id, {"before": before, **after})
        if before != after:
            await self._replan_now(db, f"{device_id}'s settings changed by {actor}")
        async with db.session() as session:
            found = await session.get(Device, device_id)
            assert found is not None
            return found

    async def plans(self, db: Database, device_id: str | None = None) -> list[PlanShown]:
        """The stored plans (of ``device_id``) with what their devices did under them."""
        async with db.session() as session:
            rows = await store.plans(session, device_id)
            ids = [pid for r in rows for pid in plan_ids_of(r)]
            stats = await store.plan_counts(session, ids)
        owner = {pid: r.device_id for r in rows for pid in plan_ids_of(r)}
        by_device: dict[str, list[HybridDelta]] = {}
        for d in stats:
            if owner.get(d.plan_id) == d.device_id:
                by_device.setdefault(d.device_id, []).append(d)
        return [
            PlanShown(
                r, observed(by_device.get(r.device_id, [])), self.settings.interval_confidence
            )
            for r in rows
        ]

    async def plan(self, db: Database, device_id: str) -> PlanShown:
        """One device's plan; :class:`PlanNotFound` if it has none."""
        shown = await self.plans(db, device_id)
        if not shown:
            raise PlanNotFound(
                f"{device_id} has no hybrid plan (not a device, decommissioned, or not planned "
                "yet: plans are made every planning interval)"
            )
        return shown[0]


@dataclass(frozen=True)
class PlanShown:
    """A stored plan and what its device reported under it."""

    row: HybridPlanRow
    seen: Observed
    confidence: float  # of the Wilson intervals

    @property
    def offload_interval(self) -> tuple[float, float] | None:
        if not self.seen.requests:
            return None
        return wilson(self.seen.offloaded, self.seen.requests, self.confidence)

    @property
    def agreement_interval(self) -> tuple[float, float] | None:
        if not self.seen.audit_compared:
            return None
        return wilson(self.seen.audit_agreements, self.seen.audit_compared, self.confidence)
