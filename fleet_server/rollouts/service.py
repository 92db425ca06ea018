"""The rollouts service: creating rollouts, showing them, operators' actions and the tick.

The only code of the feature that touches the session. Every step of a rollout
is :func:`~fleet_server.rollouts.controller.decide`'s: the service loads the
spec and the state, hands the controller the devices the selector matches now
(and, at a tick, every gate's evaluation), saves the state it returns
optimistically (:func:`~fleet_server.rollouts.store.save_state` names the
revision it read, so of two replicas only one takes a step) with a record of
the decision, and then carries out the effects:

- :class:`AssignDevices`: the release is assigned (through the assignment
  service) to up to ``limit`` devices the plan reaches that the rollout has not
  assigned yet, whose maintenance window is open on the device's own clock (its
  ``timezone``; the window's zone for a device without one), recorded first in
  ``rollout_devices`` with the release each ran before. A device recorded but
  not assigned (the process died in between) is assigned at the next step.
- :class:`RollbackReached`: every device reached that is still assigned the
  release goes back to the release it ran before: one that runs the release
  gets a marked fleet rollback
  (:func:`~fleet_server.assignments.planner.plan_rollback`), one that has not
  installed it yet is assigned its earlier release again. Later ticks repeat
  this for a rollout rolling back, so a rollback cut short is finished.
- :class:`AssignStage`: nothing of its own; the :class:`AssignDevices` after it
  starts the stage's installs.
- The shadow stage (stage 0): :class:`InstallShadow` has nothing of its own;
  each :class:`AssignDevices` of stage 0 gives up to ``limit`` wave-1 devices
  whose window is open the release as a shadow beside their assignment
  (:meth:`~fleet_server.assignments.AssignmentService.set_shadows`; the
  device row records it, so none gets it twice). :class:`ServeStage`: the
  stage-1 installs that follow assign the release to the devices holding the
  shadow first (assigning it clears the shadow); a device holding it that left
  the wave has it dropped. A rollout that ends (rolled back, aborted,
  completed) drops every shadow it still has out, so an abort or a rollback
  in the shadow stage leaves the devices as they were. :class:`DropShadows`
  (a stop in the shadow stage, ``on_failure=pause``): every shadow dropped at
  once — a shadow serves nothing but costs each device CPU, and a stopped
  rollout leads only to an abort; later ticks repeat the drop for a rollout
  stopped there, so a drop cut short is finished. A pause keeps the shadows
  for a resume. The shadow stage is judged on the shadow gates, from the
  shadow sections of the holders' windows against their active model's
  windows of the same hours; on the install gate, from the holders' shadow
  installs (a ``shadow-refused`` event of the release — self-test failed, over
  the bundle's budget, download or verification refused — is a failed
  install, and so is a holder with no outcome or silent past the install
  timeout, or whose shadow has run on none of the requests its active model
  answered for that long); and on the sample-ratio test, the holders that
  installed it reporting shadow requests against the selected devices outside
  wave 1 reporting windows.

Steps and their effects are taken one at a time (an operator's action waits
for a tick under way; a tick skips while another replica's holds the lock):
two carrying out at once could both assign a device that one had recorded and
not yet assigned.

A replayed tick (at or before the state's last) is no step at all, and a
device recorded once is never assigned twice by the rollout, so a tick run
twice does nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from fleet_server.assignments.planner import (
    RollbackFacts,
    RollbackPlan,
    RollbackRefused,
    below_installed,
    plan_rollback,
    refuse_yanked,
)
from fleet_server.assignments.service import AssignmentService
from fleet_server.audit import record as audit
from fleet_server.db import Database
from fleet_server.db.models import (
    AuditEntry,
    Device,
    DeviceEventRow,
    Release,
    RolloutRow,
    as_utc,
)
from fleet_server.drift.models import DriftError
from fleet_server.drift.store import ManifestCache
from fleet_server.errors import Conflict, FleetError, NotFound, Unprocessable
from fleet_server.published.service import find_release as find_published
from fleet_server.rollouts import store
from fleet_server.rollouts.aggregates import DeviceAggregates
from fleet_server.rollouts.controller import (
    Abort,
    AssignDevices,
    AssignStage,
    DropShadows,
    Effect,
    Event,
    InstallShadow,
    Pause,
    Promote,
    RecordDecision,
    Resume,
    RollbackReached,
    ServeStage,
    Start,
    Tick,
    decide,
)
from fleet_server.rollouts.evidence import (
    INSTALL_FAILURES,
    SHADOW_GATES,
    DeviceAggregate,
    InstallRecord,
    ShadowDevice,
    ShadowInstall,
    gather,
    gather_shadow,
    install_tally,
    shadow_install_tally,
    shadow_reporting,
)
from fleet_server.rollouts.gates import UnknownGateError, evaluate_all, gate_specs, srm_log_e
from fleet_server.rollouts.kept import KeptAggregates
from fleet_server.rollouts.maintenance import in_window
from fleet_server.rollouts.state import FINAL_PHASES, DecisionRecord, Phase, RolloutState
from fleet_server.rollouts.verdicts import GateEvaluation
from fleet_server.rollouts.waves import DeviceFacts, Population, matches, waves
from fleet_server.stored_json import finite_or_none
from protocol.api.rollouts import (
    DecisionView,
    GateSettingView,
    GateView,
    RolloutList,
    RolloutSpec,
    RolloutSummary,
    RolloutView,
    ShadowStageView,
    StageView,
    format_duration,
)
from protocol.cbpe import Calibration, estimate_accuracy
from protocol.histogram import quantile

log = logging.getLogger(__name__)

# A reached device with no install outcome and no report this long counts as failed.
INSTALL_TIMEOUT = timedelta(hours=1)
# Each device's own baseline: its windows on its current version this long before the rollout.
BASELINE = timedelta(hours=24)
# The advisory lock a replica holds while it ticks (PostgreSQL).
TICK_LOCK_ID = 0x726F6C6C6F7574  # "rollout"
# Steps are taken and carried out one at a time per database (see _one_at_a_time).
_STEPPING: weakref.WeakKeyDictionary[Database, asyncio.Lock] = weakref.WeakKeyDictionary()
# A tick's actions that change nothing an operator needs in the audit log.
_QUIET_ACTIONS = frozenset({"wait", "assign"})
# Devices named in a conflict's message.
_NAMED = 5
# How often an operator's action is decided again when a tick saved the rollout meanwhile.
ACTION_ATTEMPTS = 5


class RolloutNotFound(NotFound):
    """No rollout has that id."""


class RolloutConflict(Conflict):
    """The rollout contradicts another one, or changed while the request was served."""


class RolloutRefused(Unprocessable):
    """The spec is well formed but cannot be carried out (an unknown gate)."""


@dataclass(frozen=True)
class Selected:
    """The devices a rollout's selector matches now: the rows and their population."""

    devices: list[Device]
    population: Population


# -- create, list, show -------------------------------------------------------------------


async def create(db: Database, spec: RolloutSpec, actor: str) -> RolloutView:
    """A new rollout of ``spec`` (pending: the next tick starts it), audited.

    Refused: an unknown gate (:class:`RolloutRefused`), an
    unknown release (404), a yanked one (409), and a rollout of the same model
    name that is still active and selects some of the same devices
    (:class:`RolloutConflict`, naming it and some of those devices).
    """
    try:
        gate_specs(spec.gates, shadow=spec.shadow is not None)
    except UnknownGateError as exc:
        raise RolloutRefused(f"gates: {exc}") from None
    now = datetime.now(UTC)
    rollout_id = f"ro-{secrets.token_hex(6)}"
    async with db.session() as session:
        # Creates of one model wait for each other here (PostgreSQL), so two at once cannot
        # both miss the other's devices.
        await session.execute(
            select(Release.target_path).where(Release.name == spec.name).with_for_update()
        )
        release = await find_published(session, spec.release)
        refuse_yanked(release)
        mine = {d.id for d in await _matching(session, spec)}
        for other in await store.list_rollouts(session):
            if other.release_name != spec.name or other.phase in FINAL_PHASES:
                continue
            theirs = RolloutSpec.model_validate(other.spec)
            both = sorted(mine & {d.id for d in await _matching(session, theirs)})
            if both:
                named = ", ".join(both[:_NAMED]) + (
                    f" and {len(both) - _NAMED} more" if len(both) > _NAMED else ""
                )
                raise RolloutConflict(
                    f"rollout {other.id} of {other.release_name} is {other.phase} and selects "
                    f"{len(both)} of the same devices ({named}); one rollout per model and "
                    "device at a time: abort it or narrow the selector"
                )
        row = await store.create_rollout(
            session,
            rollout_id=rollout_id,
            name=rollout_id,
            release_name=release.name,
            release_version=release.version,
            spec=spec.model_dump(mode="json"),
            state=RolloutState().to_json(),
            phase=Phase.PENDING.value,
            created_by=actor,
            now=now,
        )
        await audit(
            session,
            actor,
            "rollout.create",
            rollout_id,
            {**spec.model_dump(mode="json"), "matched": len(mine)},
        )
        return await _view(session, row)


async def list_all(db: Database) -> RolloutList:
    """Every rollout, newest first."""
    async with db.session() as session:
        rows = await store.list_rollouts(session)
    items = []
    for row in rows:
        spec = RolloutSpec.model_validate(row.spec)
        state = RolloutState.from_json(row.state)
        items.append(
            RolloutSummary(
                id=row.id,
                release=spec.release,
                select=str(spec.select),
                phase=state.phase.value,
                stage=state.stage,
                stages=len(spec.shares),
                reason=state.reason,
                created_by=row.created_by,
                created_at=row.created_at,
                updated_at=row.updated_at,
            )
        )
    return RolloutList(rollouts=items)


async def get(db: Database, rollout_id: str) -> RolloutView:
    """The rollout ``rollout_id`` (:class:`RolloutNotFound` if none)."""
    async with db.session() as session:
        return await _view(session, await _row(session, rollout_id))


# -- operators' actions -----------------------------------------------------------------


ACTIONS = ("pause", "resume", "promote", "abort")


async def act(
    db: Database,
    assignments: AssignmentService,
    rollout_id: str,
    action: str,
    actor: str,
    reason: str | None = None,
) -> RolloutView:
    """An operator's ``action`` (one of :data:`ACTIONS`) on the rollout, audited.

    An action the controller refuses in the rollout's phase is a conflict
    naming the phase (:class:`~fleet_server.rollouts.controller.ActionRefused`).
    When a tick (or another replica) saves the rollout between reading it and
    saving the action, the action is decided again on the state saved, up to
    :data:`ACTION_ATTEMPTS` times, so it lands instead of asking the operator to
    retry; only a rollout that changes every time is a conflict.
    """

    def event(population: Population) -> Event:
        if action == "pause":
            return Pause(actor, reason)
        if action == "resume":
            return Resume(actor)
        if action == "promote":
            return Promote(actor, population, reason)
        if action == "abort":
            return Abort(actor, reason)
        raise ValueError(f"{action!r} is not one of {', '.join(ACTIONS)}")

    async with _one_at_a_time(db, wait=True) as held:
        assert held
        for attempt in range(1, ACTION_ATTEMPTS + 1):
            try:
                stepped = await _step(
                    db, rollout_id, event, datetime.now(UTC), actor=actor, reason=reason
                )
                break
            except store.StaleRollout:
                if attempt == ACTION_ATTEMPTS:
                    raise RolloutConflict(
                        f"rollout {rollout_id} changed {ACTION_ATTEMPTS} times while the "
                        f"{action} was decided; try again"
                    ) from None
                log.info("rollout %s: saved meanwhile; deciding the %s again", rollout_id, action)
        if stepped is None:  # pragma: no cover - an operator's action always takes a step
            raise RolloutConflict(f"rollout {rollout_id} changed meanwhile; try again")
        await _carry_out(db, assignments, stepped)
    return await get(db, rollout_id)


# -- the tick -------------------------------------------------------------------------


async def tick(
    db: Database,
    assignments: AssignmentService,
    now: datetime,
    manifests: ManifestCache | None = None,
    kept: KeptAggregates | None = None,
) -> int:
    """One controller step for every active rollout at ``now``; returns how many stepped.

    A pending rollout starts; any other is judged on its gates (``manifests``:
    where each version's calibration is read for CBPE accuracy; without it the
    estimated-accuracy gate has no evidence; ``kept``: the sums of the hourly
    aggregates kept from earlier ticks, so a tick reads only the rows received
    since; without it every tick reads every row of its ranges). One rollout's
    failure is logged and does not stop the others. On PostgreSQL one replica
    ticks at a time: the tick holds an advisory lock (a replica that finds it
    taken skips this tick); SQLite serves one node.
    """
    async with _one_at_a_time(db, wait=False) as held:
        if not held:
            if kept is not None:  # another replica leads: what this one kept goes stale
                kept.forget_unused()
            return 0
        stepped = await _tick_all(db, assignments, now, manifests, kept)
        if kept is not None:
            kept.forget_unused()
        return stepped


@asynccontextmanager
async def _one_at_a_time(db: Database, *, wait: bool) -> AsyncIterator[bool]:
    """Hold the right to step rollouts and carry out their effects; yields whether it is held.

    An operator's action and a tick carrying out at once could both assign a
    device one of them recorded and had not assigned yet (the repair of a step
    cut short), so they take turns: in this process an asyncio lock, across
    replicas (PostgreSQL) an advisory lock held to the end of a transaction —
    the lock taken first, in that order everywhere. ``wait=False`` (a tick)
    gives up at once when another replica holds it.
    """
    lock = _STEPPING.setdefault(db, asyncio.Lock())
    if not wait and lock.locked():
        yield False  # an action is stepping in this process: the tick comes again
        return
    async with lock, db.session() as guard:
        if _is_postgres(guard):
            function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
            held = await guard.scalar(text(f"SELECT {function}(:id)"), {"id": TICK_LOCK_ID})
            yield wait or bool(held)
        else:
            yield True


async def _tick_all(
    db: Database,
    assignments: AssignmentService,
    now: datetime,
    manifests: ManifestCache | None,
    kept: KeptAggregates | None,
) -> int:
    async with db.session() as session:
        rows = await store.list_rollouts(session)
        active = [r.id for r in rows if r.phase not in FINAL_PHASES]
        rolling_back = [
            (r.id, RolloutSpec.model_validate(r.spec), RolloutState.from_json(r.state))
            for r in rows
            if r.phase == Phase.ROLLING_BACK.value
        ]
        # Stopped in the shadow stage: its shadows go (a drop cut short is finished here).
        stopped_shadows = [
            r.id
            for r in rows
            if r.phase == Phase.STOPPED.value and RolloutState.from_json(r.state).stage == 0
        ]
    # A rollback cut short (the process died after saving the decision) is finished here;
    # devices already sent back are left alone, so this does nothing once it is done.
    for rollout_id, spec, state in rolling_back:
        try:
            finish = Stepped(rollout_id, spec, state, Population.of(rollout_id, []), [], now)
            await _roll_back(db, assignments, finish)
            await _drop_shadows(db, assignments, rollout_id)
        except Exception:
            log.exception("rollout %s: finishing the rollback failed", rollout_id)
    for rollout_id in stopped_shadows:
        try:
            await _drop_shadows(db, assignments, rollout_id)
        except Exception:
            log.exception("rollout %s: dropping the stopped shadows failed", rollout_id)
    stepped = 0
    for rollout_id in reversed(active):  # oldest first
        try:
            done = await _step(db, rollout_id, None, now, manifests=manifests, kept=kept)
            if done is not None:
                await _carry_out(db, assignments, done)
                stepped += 1
        except Exception:  # one rollout's failure must not stop the others
            log.exception("rollout %s: the tick failed; the next one tries again", rollout_id)
    return stepped


# -- the parts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stepped:
    """A step saved: what the effects need."""

    rollout_id: str
    spec: RolloutSpec
    state: RolloutState
    population: Population
    effects: list[Effect]
    now: datetime


async def _step(
    db: Database,
    rollout_id: str,
    make_event: Callable[[Population], Event] | None,
    now: datetime,
    *,
    actor: str | None = None,
    reason: str | None = None,
    manifests: ManifestCache | None = None,
    kept: KeptAggregates | None = None,
) -> Stepped | None:
    """Decide one step and save it (``make_event``: an operator's; ``None``: a tick).

    ``None`` when there was nothing to do (a replayed tick, a final phase) or,
    for a tick, when another replica saved first; for an operator's action, another
    save first raises :class:`~fleet_server.rollouts.store.StaleRollout`.
    """
    async with db.session() as session:
        row = await _row(session, rollout_id)
        spec = RolloutSpec.model_validate(row.spec)
        state = RolloutState.from_json(row.state)
        selected = await _selected(session, row.id, spec)
        event: Event
        if make_event is not None:
            event = make_event(selected.population)
        elif state.phase == Phase.PENDING:
            event = Start(selected.population)
        else:
            evaluations, srm = await _evaluate(
                session, row, spec, state, selected, now, manifests, kept
            )
            event = Tick(evaluations, srm, selected.population)
        after, effects = decide(state, event, spec, now)
        if after == state and not effects:
            return None
        try:
            await store.save_state(
                session,
                row.id,
                read_revision=row.revision,
                state=after.to_json(),
                phase=after.phase.value,
                now=now,
            )
        except store.StaleRollout:
            if make_event is None:
                return None
            raise
        for effect in effects:
            if isinstance(effect, RecordDecision):
                await _record(session, row.id, effect.record, actor, reason)
    return Stepped(row.id, spec, after, selected.population, effects, now)


async def _record(
    session: AsyncSession,
    rollout_id: str,
    decision: DecisionRecord,
    actor: str | None,
    reason: str | None,
) -> None:
    """The decision in the rollout's record; audited unless it is a tick that only waited or
    assigned (those are in the rollout's record alone)."""
    await store.record_evaluation(
        session,
        rollout_id,
        at=decision.at,
        stage=decision.stage,
        gates=decision.evaluations,
        rule=decision.rule[:64],
        action=decision.action[:64],
    )
    if actor is None and decision.action in _QUIET_ACTIONS:
        return
    await audit(
        session,
        actor or f"rollout {rollout_id}",
        f"rollout.{decision.event}",
        rollout_id,
        {
            "seq": decision.seq,
            "from_phase": decision.from_phase.value,
            "phase": decision.phase.value,
            "stage": decision.stage,
            "rule": decision.rule,
            "action": decision.action,
            "reason": decision.reason if decision.reason is not None else reason,
        },
    )


async def _carry_out(db: Database, assignments: AssignmentService, stepped: Stepped) -> None:
    """The step's effects, after its commit."""
    for effect in stepped.effects:
        if isinstance(effect, AssignDevices) and effect.stage == 0:
            await _install_shadows(db, assignments, stepped, effect)
        elif isinstance(effect, AssignDevices):
            await _assign(db, assignments, stepped, effect)
        elif isinstance(effect, RollbackReached):
            await _roll_back(db, assignments, stepped)
        elif isinstance(effect, ServeStage):
            await _serve(db, assignments, stepped)
        elif isinstance(effect, DropShadows):
            await _drop_shadows(db, assignments, stepped.rollout_id)
        elif isinstance(effect, InstallShadow | AssignStage | RecordDecision):
            continue  # the AssignDevices after it starts the installs; the record is saved
    if stepped.state.phase in FINAL_PHASES:
        await _drop_shadows(db, assignments, stepped.rollout_id)


async def _install_shadows(
    db: Database, assignments: AssignmentService, stepped: Stepped, effect: AssignDevices
) -> None:
    """Give up to ``effect.limit`` wave-1 devices whose window is open the release as a
    shadow (see the module); devices that hold it, run it, or cannot take it are passed by."""
    wave = _reached(stepped.state, stepped.population)
    async with db.session() as session:
        release = await find_published(session, stepped.spec.release)
        label = f"{release.name} {release.version}"
        devices = await _devices(session, wave)
        eligible = [
            d
            for d in devices
            if d.shadow_rollout is None
            and d.assigned_target != release.target_path
            and d.active_bundle != label
            and d.hardware_id in release.hardware_ids
            and (effect.window is None or in_window(effect.window, stepped.now))
        ]
        below = {d.id for d in below_installed(release, eligible)}
        eligible = [d for d in eligible if d.id not in below]
    chosen = eligible if effect.limit is None else eligible[: effect.limit]
    if not chosen:
        return
    try:
        await assignments.set_shadows(
            db,
            [d.id for d in chosen],
            release.target_path,
            stepped.rollout_id,
            f"rollout {stepped.rollout_id}",
        )
    except FleetError as exc:
        log.warning("rollout %s: could not install shadows: %s", stepped.rollout_id, exc)


async def _serve(db: Database, assignments: AssignmentService, stepped: Stepped) -> None:
    """The shadow passed: holders that left wave 1 have it dropped; the installs of stage 1
    that follow assign the others first."""
    wave = set(_reached(stepped.state, stepped.population))
    left = [d for d in await _shadow_holders(db, stepped.rollout_id) if d not in wave]
    if left:
        await assignments.set_shadows(
            db, left, None, stepped.rollout_id, f"rollout {stepped.rollout_id}"
        )


async def _drop_shadows(db: Database, assignments: AssignmentService, rollout_id: str) -> None:
    """Every shadow the rollout still has out, dropped (the devices keep their assignment)."""
    holders = await _shadow_holders(db, rollout_id)
    if holders:
        await assignments.set_shadows(db, holders, None, rollout_id, f"rollout {rollout_id}")


async def _shadow_holders(db: Database, rollout_id: str) -> list[str]:
    async with db.session() as session:
        rows = await session.scalars(
            select(Device.id).where(Device.shadow_rollout == rollout_id).order_by(Device.id)
        )
        return list(rows.all())


async def _assign(
    db: Database, assignments: AssignmentService, stepped: Stepped, effect: AssignDevices
) -> None:
    """Record, then assign, up to ``effect.limit`` devices the plan reaches (see the module)."""
    reached_ids = _reached(stepped.state, stepped.population)
    async with db.session() as session:
        release = await find_published(session, stepped.spec.release)
        target = release.target_path
        recorded = {
            r.device_id: r for r in await store.reached_devices(session, stepped.rollout_id)
        }
        waiting = [d for d in reached_ids if d not in recorded]
        devices = await _devices(session, waiting)
        # Devices holding the release as this rollout's shadow serve it first.
        devices.sort(key=lambda d: (d.shadow_rollout != stepped.rollout_id, d.id))
        eligible = [
            d
            for d in devices
            if d.hardware_id in release.hardware_ids
            and (effect.window is None or in_window(effect.window, stepped.now, d.timezone))
        ]
        below = {d.id for d in below_installed(release, eligible)}
        eligible = [d for d in eligible if d.id not in below]
        chosen = eligible if effect.limit is None else eligible[: effect.limit]
        ran = await _running_targets(session, chosen)
        await store.add_reached(
            session,
            stepped.rollout_id,
            [store.Reached(d.id, effect.stage, ran.get(d.id), d.active_bundle) for d in chosen],
            stepped.now,
        )
        # Recorded before but never assigned (the process died in between): assigned now.
        unassigned = [
            d.id
            for d in await _devices(session, sorted(recorded))
            if d.assigned_target != target
            and d.assigned_target == recorded[d.id].previous_target
            and d.decommissioned_at is None
        ]
    to_assign = sorted({d.id for d in chosen} | set(unassigned))
    if not to_assign:
        return
    try:
        assigned = await assignments.assign(
            db, target_path=target, actor=f"rollout {stepped.rollout_id}", device_ids=to_assign
        )
    except FleetError as exc:
        log.warning("rollout %s: could not assign %s: %s", stepped.rollout_id, target, exc)
        return
    try:
        await assignments.announce(release, assigned.results)
    except Exception:
        log.exception("rollout %s: assignment committed but not announced", stepped.rollout_id)


async def _roll_back(db: Database, assignments: AssignmentService, stepped: Stepped) -> None:
    """Every device reached and still assigned the release back to the one it ran before
    (see the module)."""
    plans: list[RollbackPlan] = []
    again: dict[str, list[str]] = {}
    async with db.session() as session:
        release = await find_published(session, stepped.spec.release)
        reached = await store.reached_devices(session, stepped.rollout_id)
        devices = {d.id: d for d in await _devices(session, [r.device_id for r in reached])}
        previous = {
            r.target_path: r
            for r in (
                await session.scalars(
                    select(Release).where(
                        Release.target_path.in_(
                            sorted({r.previous_target for r in reached if r.previous_target})
                        )
                    )
                )
            ).all()
        }
        running_label = f"{release.name} {release.version}"
        for r in reached:
            device = devices.get(r.device_id)
            before = previous.get(r.previous_target or "")
            if device is None or device.decommissioned_at is not None or before is None:
                log.warning(
                    "rollout %s: %s has no earlier release to go back to; it keeps what it has",
                    stepped.rollout_id,
                    r.device_id,
                )
                continue
            if device.assigned_target != release.target_path:
                continue  # sent back already, or assigned something else since
            if device.active_bundle != running_label:
                again.setdefault(before.target_path, []).append(device.id)
                continue
            facts = RollbackFacts(
                device.id, device.hardware_id, release.target_path, release.sha256,
                before.target_path,
            )  # fmt: skip
            try:
                plans.append(plan_rollback(facts, before))
            except RollbackRefused as exc:
                log.warning("rollout %s: %s", stepped.rollout_id, exc)
    actor = f"rollout {stepped.rollout_id}"
    if plans:
        await assignments.rollback(db, plans, actor, stepped.rollout_id)
    for target, ids in sorted(again.items()):
        try:
            await assignments.assign(db, target_path=target, actor=actor, device_ids=ids)
        except FleetError as exc:
            log.warning("rollout %s: could not reassign %s: %s", stepped.rollout_id, target, exc)


async def _running_targets(session: AsyncSession, devices: Sequence[Device]) -> dict[str, str]:
    """Each device's release before the rollout: what it was assigned, or else the release
    named as it reports running it (a device that got its model some other way)."""
    found = {d.id: d.assigned_target for d in devices if d.assigned_target is not None}
    wanted = {d.active_bundle for d in devices if d.id not in found and d.active_bundle}
    if wanted:
        names = sorted({w.partition(" ")[0] for w in wanted})
        rows = (await session.scalars(select(Release).where(Release.name.in_(names)))).all()
        by_label = {f"{r.name} {r.version}": r.target_path for r in rows}
        for d in devices:
            if d.id not in found and d.active_bundle in by_label:
                found[d.id] = by_label[d.active_bundle]
    return found


# -- evidence -------------------------------------------------------------------------


async def _evaluate(
    session: AsyncSession,
    row: RolloutRow,
    spec: RolloutSpec,
    state: RolloutState,
    selected: Selected,
    now: datetime,
    manifests: ManifestCache | None,
    kept: KeptAggregates | None = None,
) -> tuple[list[GateEvaluation], float | None]:
    """Every gate's evaluation and the SRM test's log e-value at ``now``.

    Treatment: the devices the rollout reached, on the new version since their
    install; control: the matching devices not reached, on their current
    version, since the rollout's start; each device's baseline: its own
    windows of the 24 h before the rollout on the version it ran then. CBPE
    accuracy uses each version's own calibration, from its manifest. With ``kept``
    the sums cover every device of each version (only the devices asked for are
    looked up in them).
    """
    if state.stage == 0:
        return await _evaluate_shadow(session, row, spec, state, selected, now)

    async def read(
        version: str, since: datetime, until: datetime, ids: list[str]
    ) -> DeviceAggregates:
        if kept is not None:
            return await kept.read(session, spec.name, version, since, until)
        return await store.device_aggregates(session, spec.name, version, since, until, ids)

    started = as_utc(row.created_at)
    reached = {r.device_id: r for r in await store.reached_devices(session, row.id)}
    by_id = {d.id: d for d in selected.devices}
    in_plan = set(_reached(state, selected.population))
    control_ids = [d for d in by_id if d not in in_plan and d not in reached]
    treatment = await read(spec.version, started, now, sorted(reached))
    # The versions each device ran before: its baseline's, and the control's now.
    ran: dict[str, str] = {}
    for device_id, r in reached.items():
        version = _version_of(r.previous_bundle, spec.name)
        if version is not None:
            ran[device_id] = version
    for device_id in control_ids:
        version = _version_of(by_id[device_id].active_bundle, spec.name)
        if version is not None:
            ran[device_id] = version
    control: dict[str, DeviceAggregates] = {}
    baseline: dict[str, DeviceAggregates] = {}
    for version in sorted(set(ran.values())):
        ids = sorted(d for d, v in ran.items() if v == version)
        baseline[version] = await read(version, started - BASELINE, started, ids)
        control[version] = await read(version, started, now, [d for d in ids if d in control_ids])
    calibrations = {
        v: await _calibration(session, manifests, spec.name, v)
        for v in {spec.version, *ran.values()}
    }
    devices: list[DeviceAggregate] = []
    for device_id in sorted(reached):
        before = ran.get(device_id, "")
        devices.append(
            _aggregate(
                device_id, "treatment", treatment, baseline.get(before),
                calibrations[spec.version], calibrations.get(before),
            )
        )  # fmt: skip
    for device_id in control_ids:
        version = ran.get(device_id)
        if version is None:
            continue
        calibration = calibrations[version]
        devices.append(
            _aggregate(
                device_id, "control", control[version], baseline[version], calibration, calibration
            )
        )
    devices = [d for d in devices if d.windows > 0]
    # A reached device that left the selection (decommissioned, retagged) no longer counts.
    still = [r for r in reached.values() if r.device_id in by_id]
    outcomes = await _install_events(session, [(r.device_id, as_utc(r.assigned_at)) for r in still])
    records = [
        _install(by_id[r.device_id], as_utc(r.assigned_at), spec, outcomes.get(r.device_id))
        for r in still
    ]
    installs = install_tally(records, now, INSTALL_TIMEOUT)
    specs = gate_specs(spec.gates, shadow=spec.shadow is not None)
    others = [s.name for s in specs if s.name not in SHADOW_GATES]
    evaluations = evaluate_all(specs, gather(devices, installs), only=others)
    # Only devices that run the release can report on it: the test's treatment arm is
    # those that committed it, so installs still under way are no mismatch; its control
    # arm, alike, the devices alive since the start (a device the fleet never hears from
    # would count against the control only, and never commits an install).
    installed = {r.device_id for r in records if r.result == "committed"}
    reporting = [d for d in devices if d.arm == "control" or d.device_id in installed]
    alive = [d for d in control_ids if d in ran and _seen_since(by_id[d], started)]
    srm = _srm(reporting, len(installed & set(by_id)), len(alive))
    return evaluations, srm


async def _evaluate_shadow(
    session: AsyncSession,
    row: RolloutRow,
    spec: RolloutSpec,
    state: RolloutState,
    selected: Selected,
    now: datetime,
) -> tuple[list[GateEvaluation], float | None]:
    """The shadow stage's evaluations and SRM test at ``now``.

    The shadow gates: each device holding the shadow, the shadow sections of its
    windows since the stage started against its active model's windows of the
    same hours. The install gate: the holders' shadow installs
    (:func:`~fleet_server.rollouts.evidence.shadow_install_tally`; a
    ``shadow-refused`` is a failed install). The SRM test: the holders that
    installed it reporting shadow requests against the selected devices outside
    wave 1 reporting windows (:func:`~fleet_server.rollouts.evidence.shadow_reporting`).
    """
    started = as_utc(state.stage_started_at or row.created_at)
    holders = [d for d in selected.devices if d.shadow_rollout == row.id]
    ids = [d.id for d in holders]
    shadow = await store.shadow_aggregates(session, spec.name, spec.version, started, now, ids)
    at = shadow.index()
    in_plan = set(_reached(state, selected.population))
    control_ids = {
        d.id for d in selected.devices if d.id not in in_plan and d.shadow_rollout is None
    }
    by_version: dict[str, list[str]] = {}
    for d in selected.devices:
        if d.id not in control_ids and d.shadow_rollout != row.id:
            continue
        version = _version_of(d.active_bundle, spec.name)
        if version is not None and version != spec.version:
            by_version.setdefault(version, []).append(d.id)
    active: dict[str, tuple[DeviceAggregates, int]] = {}
    for version, members in sorted(by_version.items()):
        sums = await store.device_aggregates(session, spec.name, version, started, now, members)
        for device_id, row_of in sums.index().items():
            active[device_id] = (sums, row_of)
    devices: dict[str, ShadowDevice] = {}
    for device_id in ids:
        mine = active.get(device_id)
        i = at.get(device_id)
        p95 = quantile(shadow.latency_histogram(i), 0.95) if i is not None else None
        devices[device_id] = ShadowDevice(
            device_id=device_id,
            requests=int(shadow.requests[i]) if i is not None else 0,
            agreements=int(shadow.agreements[i]) if i is not None else 0,
            errors=int(shadow.errors[i]) if i is not None else 0,
            log_p95=float(np.log(p95)) if p95 is not None and p95 > 0 else None,
            active_requests=int(mine[0].requests[mine[1]]) if mine else 0,
            active_errors=int(mine[0].errors[mine[1]]) if mine else 0,
            active_log_p95=_log_p95(*mine) if mine else None,
        )
    given = await _shadows_given(session, row.id, ids, started)
    outcomes = await _shadow_events(session, given, f"{spec.name} {spec.version}")
    installs = []
    for d in holders:
        since = given[d.id]
        result, installed_at = outcomes.get(d.id, (None, None))
        last_seen = as_utc(d.last_seen_at) if d.last_seen_at is not None else None
        installs.append(
            ShadowInstall(
                device_id=d.id,
                started_at=since,
                result=result,
                installed_at=installed_at,
                last_seen=last_seen if last_seen is not None and last_seen >= since else None,
                shadow_requests=devices[d.id].requests,
                active_requests=devices[d.id].active_requests,
            )
        )
    tally = shadow_install_tally(installs, now, INSTALL_TIMEOUT)
    evidence = {
        **gather_shadow([d for d in devices.values() if d.requests > 0]),
        INSTALL_FAILURES: tally,
    }
    specs = gate_specs(spec.gates, shadow=True)
    evaluations = evaluate_all(specs, evidence, only=SHADOW_GATES | {INSTALL_FAILURES})
    # Only a shadow that installed can run: installs under way are no mismatch.
    installed = [devices[s.device_id] for s in installs if s.result == "installed"]
    versioned = {d for members in by_version.values() for d in members}
    control = [
        DeviceAggregate(d, "control", windows=int(active[d][0].windows[active[d][1]]))
        if d in active
        else DeviceAggregate(d, "control")
        for d in sorted(control_ids & versioned)
    ]
    (shadow_arm, control_arm), (assigned_shadow, assigned_control) = shadow_reporting(
        installed, control
    )
    srm = None
    if assigned_shadow and assigned_control:
        total = assigned_shadow + assigned_control
        srm = srm_log_e(
            [shadow_arm, control_arm], [assigned_shadow / total, assigned_control / total]
        )
    return evaluations, srm


async def _shadows_given(
    session: AsyncSession, rollout_id: str, ids: Sequence[str], stage_start: datetime
) -> dict[str, datetime]:
    """When the rollout last gave each of ``ids`` its shadow (its ``assignment.shadow``
    audit entries); the stage's start for one it names in none."""
    given = dict.fromkeys(ids, stage_start)
    if not ids:
        return given
    wanted = set(ids)
    entries = await session.execute(
        select(AuditEntry.at, AuditEntry.details)
        .where(AuditEntry.action == "assignment.shadow", AuditEntry.subject == rollout_id)
        .order_by(AuditEntry.seq)
    )
    for at, details in entries:
        for device_id in (details or {}).get("devices") or []:
            if device_id in wanted:
                given[device_id] = max(as_utc(at), stage_start)
    return given


_SHADOW_EVENTS = ("shadow-installed", "shadow-refused")


async def _shadow_events(
    session: AsyncSession, given: dict[str, datetime], label: str
) -> dict[str, tuple[Literal["installed", "refused"], datetime]]:
    """Each device's latest ``shadow-installed`` or ``shadow-refused`` since it was given
    the shadow, naming ``label`` (``"NAME VERSION"``) or no bundle (a refusal of the
    director's answer), and when."""
    if not given:
        return {}
    latest: dict[str, tuple[Literal["installed", "refused"], datetime]] = {}
    ids = sorted(given)
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        rows = await session.execute(
            select(DeviceEventRow.device_id, DeviceEventRow.event, DeviceEventRow.at,
                   DeviceEventRow.details)
            .where(
                DeviceEventRow.device_id.in_(chunk),
                DeviceEventRow.event.in_(_SHADOW_EVENTS),
                DeviceEventRow.at >= min(given[d] for d in chunk),
            )
            .order_by(DeviceEventRow.at, DeviceEventRow.id)
        )  # fmt: skip
        for device_id, event, at, details in rows:
            bundle = (details or {}).get("bundle")
            if as_utc(at) < given[device_id] or bundle not in (None, label):
                continue
            latest[device_id] = (
                "installed" if event == "shadow-installed" else "refused",
                as_utc(at),
            )
    return latest


def _aggregate(
    device_id: str,
    arm: Any,
    sums: DeviceAggregates,
    pre: DeviceAggregates | None,
    calibration: Calibration | None = None,
    pre_calibration: Calibration | None = None,
) -> DeviceAggregate:
    i = sums.index().get(device_id)
    j = pre.index().get(device_id) if pre is not None else None
    if i is None:
        return DeviceAggregate(device_id, arm)
    requests = int(sums.requests[i])
    fallbacks = int(sums.fallbacks[i])
    pre_rate = None
    pre_p95 = pre_accuracy = None
    if pre is not None and j is not None:
        pre_accuracy = _accuracy(pre, j, pre_calibration)
        pre_requests = int(pre.requests[j])
        # A device that never fell back gets a rate from one fallback in its history.
        pre_rate = (int(pre.fallbacks[j]) + 1) / (pre_requests + 1)
        pre_p95 = _log_p95(pre, j)
    expected = requests * pre_rate if pre_rate is not None else 0.0
    return DeviceAggregate(
        device_id=device_id,
        arm=arm,
        requests=requests,
        fallbacks=fallbacks,
        expected_fallbacks=expected,
        log_p95=_log_p95(sums, i),
        pre_log_p95=pre_p95,
        accuracy=_accuracy(sums, i, calibration),
        pre_accuracy=pre_accuracy,
        labelled=int(sums.labelled_rows[i]),
        correct=int(sums.labelled_correct[i]),
        windows=int(sums.windows[i]),
        classes=tuple(int(c) for c in sums.predicted[i]) if sums.classes is not None else (),
    )


def _accuracy(sums: DeviceAggregates, i: int, calibration: Calibration | None) -> float | None:
    """CBPE's estimate of device ``i``'s accuracy with its version's own calibration."""
    scores = sums.score_histogram(i)
    if calibration is None or scores is None or scores.classes != calibration.classes:
        return None
    try:
        return estimate_accuracy(calibration, scores).accuracy
    except ValueError:  # a histogram of another layout than the calibration's
        return None


def _log_p95(sums: DeviceAggregates, i: int) -> float | None:
    p95 = quantile(sums.latency_histogram(i), 0.95)
    return float(np.log(p95)) if p95 is not None and p95 > 0 else None


# The installer's events that end an install, and what each means for the release.
_OUTCOME_EVENTS: dict[str, Literal["committed", "failed"]] = {
    "committed": "committed",
    "refused": "failed",
    "rolled-back": "failed",
    "fleet-rolled-back": "failed",
}


async def _calibration(
    session: AsyncSession, manifests: ManifestCache | None, name: str, version: str
) -> Calibration | None:
    """The calibration in the manifest of ``name@version``, ``None`` if it has none."""
    if manifests is None:
        return None
    try:
        manifest = await manifests.get(session, name, version)
    except DriftError as exc:
        log.warning("rollout: no calibration for %s@%s: %s", name, version, exc)
        return None
    return manifest.baseline.calibration


async def _install_events(
    session: AsyncSession, reached: Sequence[tuple[str, datetime]]
) -> dict[str, tuple[str, str | None]]:
    """Each device's latest install outcome event since it was reached: the event and the
    bundle it names (``"NAME VERSION"``)."""
    if not reached:
        return {}
    since = dict(reached)
    latest: dict[str, tuple[str, str | None]] = {}
    ids = sorted(since)
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        rows = await session.execute(
            select(DeviceEventRow.device_id, DeviceEventRow.event, DeviceEventRow.at,
                   DeviceEventRow.details)
            .where(
                DeviceEventRow.device_id.in_(chunk),
                DeviceEventRow.event.in_(sorted(_OUTCOME_EVENTS)),
                DeviceEventRow.at >= min(since[d] for d in chunk),
            )
            .order_by(DeviceEventRow.at, DeviceEventRow.id)
        )  # fmt: skip
        for device_id, event, at, details in rows:
            if as_utc(at) >= since[device_id]:
                bundle = (details or {}).get("bundle")
                latest[device_id] = (event, bundle if isinstance(bundle, str) else None)
    return latest


def _install(
    device: Device,
    started: datetime,
    spec: RolloutSpec,
    event: tuple[str, str | None] | None = None,
) -> InstallRecord:
    """A reached device's install, as its latest outcome event (or else its latest reported
    state) tells it: committed, failed (refused, rolled back by itself or by the fleet), or
    none yet."""
    last_seen = as_utc(device.last_seen_at) if device.last_seen_at is not None else None
    seen = last_seen if last_seen is not None and last_seen >= started else None
    label = f"{spec.name} {spec.version}"
    if event is not None and (event[1] in (None, label) or event[0] == "fleet-rolled-back"):
        return InstallRecord(device.id, started, _OUTCOME_EVENTS[event[0]], seen)
    outcome = (device.reported or {}).get("last_outcome") or {}
    bundle = outcome.get("bundle") or {}
    result: Literal["committed", "failed"] | None = None
    if bundle.get("name") == spec.name and bundle.get("version") == spec.version:
        result = "committed" if outcome.get("result") == "committed" else "failed"
    elif device.active_bundle == label and device.phase == "idle":
        result = "committed"  # past its trial: a device still in it has no outcome yet
    if device.assigned_rollback_of is not None:  # rolled back by the fleet: it failed here
        result = "failed"
    return InstallRecord(device.id, started, result, seen)


def _seen_since(device: Device, at: datetime) -> bool:
    return device.last_seen_at is not None and as_utc(device.last_seen_at) >= at


def _srm(devices: Sequence[DeviceAggregate], treatment: int, control: int) -> float | None:
    """The SRM test over the devices reporting in each arm, against their assigned shares."""
    if treatment == 0 or control == 0:
        return None
    reporting = [
        sum(1 for d in devices if d.arm == "treatment"),
        sum(1 for d in devices if d.arm == "control"),
    ]
    total = treatment + control
    return srm_log_e(reporting, [treatment / total, control / total])


def _version_of(bundle: str | None, name: str) -> str | None:
    """The version of ``bundle`` (``"NAME VERSION"``, as devices report it) if it is ``name``."""
    if bundle is None:
        return None
    found, _, version = bundle.partition(" ")
    return version if found == name and version else None


def _is_postgres(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


# -- reading --------------------------------------------------------------------------


async def _row(session: AsyncSession, rollout_id: str) -> RolloutRow:
    row = await store.get_rollout(session, rollout_id)
    if row is None:
        raise RolloutNotFound(f"no rollout {rollout_id}; `fleetctl rollout list` shows them")
    return row


async def _matching(session: AsyncSession, spec: RolloutSpec) -> list[Device]:
    """The devices (not decommissioned) the selector matches now, by id."""
    query = select(Device).where(Device.decommissioned_at.is_(None)).order_by(Device.id)
    if spec.select.hardware:
        query = query.where(Device.hardware_id.in_(spec.select.hardware))
    if spec.select.region:
        query = query.where(Device.region.in_(spec.select.region))
    rows = (await session.scalars(query)).all()
    return [d for d in rows if matches(spec.select, _facts(d))]


def _facts(device: Device) -> DeviceFacts:
    return DeviceFacts(device.id, device.hardware_id, device.region, frozenset(device.tags or ()))


async def _selected(session: AsyncSession, rollout_id: str, spec: RolloutSpec) -> Selected:
    devices = await _matching(session, spec)
    return Selected(devices, Population.of(rollout_id, [_facts(d) for d in devices]))


async def _devices(session: AsyncSession, ids: Sequence[str]) -> list[Device]:
    found: list[Device] = []
    listed = sorted(ids)
    for start in range(0, len(listed), 5000):
        chunk = listed[start : start + 5000]
        found.extend((await session.scalars(select(Device).where(Device.id.in_(chunk)))).all())
    return sorted(found, key=lambda d: d.id)


def _reached(state: RolloutState, population: Population) -> list[str]:
    if not state.plan.strata:
        return []
    return [population.ids[i] for i in np.flatnonzero(waves(state.plan, population))]


async def _view(session: AsyncSession, row: RolloutRow) -> RolloutView:
    spec = RolloutSpec.model_validate(row.spec)
    state = RolloutState.from_json(row.state)
    selected = await _selected(session, row.id, spec)
    stage_of = (
        waves(state.plan, selected.population)
        if state.plan.strata
        else np.zeros(len(selected.population), dtype=np.intp)
    )
    stages = [
        StageView(
            stage=k,
            share=float(share) * 100,
            devices=int(np.count_nonzero((stage_of > 0) & (stage_of <= k))),
            started=state.stage >= k,
        )
        for k, share in enumerate(spec.shares, start=1)
    ]
    assigned = len(await store.reached_devices(session, row.id))
    latest = next((d for d in reversed(state.history) if d.evaluations), None)
    shadow = None
    if spec.shadow is not None:
        holding = await session.scalar(
            select(func.count()).select_from(Device).where(Device.shadow_rollout == row.id)
        )
        shadow = ShadowStageView(
            duration=format_duration(spec.shadow),
            holding=int(holding or 0),
            gates=[
                GateSettingView(
                    gate=g.name,
                    severity=g.severity,
                    direction=g.direction,
                    harm_at=g.bounds[0],
                    margin=g.bounds[1],
                    min_devices=g.min_devices,
                    min_requests=g.min_requests,
                )
                for g in gate_specs(spec.gates, shadow=True)
                if g.name in SHADOW_GATES
            ],
        )
    return RolloutView(
        id=row.id,
        spec=spec,
        phase=state.phase.value,
        stage=state.stage,
        shares=[float(s) * 100 for s in spec.shares],
        reason=state.reason,
        missing=dict(state.missing),
        matched=len(selected.population),
        reached=int(np.count_nonzero(stage_of)),
        assigned=assigned,
        stages=stages,
        shadow=shadow,
        evaluations=[_gate_view(e) for e in latest.evaluations] if latest else [],
        evaluated_at=latest.at if latest else None,
        decisions=[_decision_view(d) for d in state.history],
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _gate_view(e: GateEvaluation) -> GateView:
    return GateView(
        gate=e.gate,
        severity=e.severity,
        decision=e.decision,
        n_devices=e.n_devices,
        n_control=e.n_control,
        n_requests=e.n_requests,
        estimate=finite_or_none(e.estimate),
        low=finite_or_none(e.low),
        high=finite_or_none(e.high),
        margin=e.margin,
        harm_at=e.harm_at,
        missing=e.missing,
    )


def _decision_view(d: DecisionRecord) -> DecisionView:
    return DecisionView(
        seq=d.seq,
        at=d.at,
        event=d.event,
        by=d.by,
        from_phase=d.from_phase.value,
        phase=d.phase.value,
        stage=d.stage,
        rule=d.rule,
        action=d.action,
        reason=d.reason,
        warnings=list(d.warnings),
        matched=d.matched,
        reached=d.reached,
    )
