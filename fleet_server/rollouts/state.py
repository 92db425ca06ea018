"""What the rollout controller keeps between ticks: plain data, written to JSON and read back equal.

:class:`RolloutState` is everything :func:`~fleet_server.rollouts.controller.decide`
needs to take the next step — the phase, the stage, when it started, the wave
plan, the installs granted, the reason of the last pause or stop — and the
latest of its decisions. The service stores it after every step
(:meth:`RolloutState.to_json`) and reads it back on start-up, so a controller
restarted anywhere takes the step it would have taken.

Stages are numbered as in :mod:`~fleet_server.rollouts.waves`: stage ``k``
(1…K) reaches the cumulative share ``spec.shares[k - 1]`` (the waves, then the
holdback's release); stage 0 is the time before the first wave serves — the
shadow stage when the spec asks for one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from fleet_server.rollouts.verdicts import GateEvaluation
from fleet_server.rollouts.waves import WavePlan, plan_from_json, plan_to_json

STATE_VERSION = 1
# Decisions kept in the state itself; the store keeps every one (RecordDecision).
HISTORY_LIMIT = 20


class Phase(StrEnum):
    """Where a rollout is in its life."""

    PENDING = "pending"  # created, not started
    SHADOW = "shadow"  # wave 1 runs the release beside the active model, serving none of it
    BAKING = "baking"  # a stage is served and its gates are watched
    PAUSED = "paused"  # assigning nothing until an operator resumes, promotes or aborts
    STOPPED = "stopped"  # a stop-gate showed harm; devices keep what they have
    ROLLING_BACK = "rolling_back"  # a stop-gate showed harm; every device reached goes back
    COMPLETED = "completed"
    ABORTED = "aborted"


# Phases no event leads out of.
FINAL_PHASES = frozenset({Phase.ROLLING_BACK, Phase.COMPLETED, Phase.ABORTED})


@dataclass(frozen=True)
class DecisionRecord:
    """One step of the controller: what it saw, the rule that fired and what it did."""

    seq: int  # 1, 2, … per rollout: the store's key, so a replayed record is stored once
    at: datetime
    event: str  # start, tick, pause, resume, promote, abort
    by: str | None  # the operator, for an operator's action
    from_phase: Phase
    phase: Phase
    stage: int
    rule: str
    action: str
    reason: str | None = None
    evaluations: tuple[GateEvaluation, ...] = ()
    srm_log_e: float | None = None
    warnings: tuple[str, ...] = ()
    matched: int | None = None  # devices the selector matches
    reached: int | None = None  # of them, devices the plan reaches

    def to_json(self) -> dict[str, Any]:
        """The record as strict JSON data (a non-finite number as a string such as ``"inf"``)."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "event": self.event,
            "by": self.by,
            "from_phase": self.from_phase.value,
            "phase": self.phase.value,
            "stage": self.stage,
            "rule": self.rule,
            "action": self.action,
            "reason": self.reason,
            "evaluations": [evaluation_to_json(e) for e in self.evaluations],
            "srm_log_e": _number(self.srm_log_e),
            "warnings": list(self.warnings),
            "matched": self.matched,
            "reached": self.reached,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionRecord:
        return cls(
            seq=int(data["seq"]),
            at=datetime.fromisoformat(data["at"]),
            event=str(data["event"]),
            by=data["by"],
            from_phase=Phase(data["from_phase"]),
            phase=Phase(data["phase"]),
            stage=int(data["stage"]),
            rule=str(data["rule"]),
            action=str(data["action"]),
            reason=data["reason"],
            evaluations=tuple(evaluation_from_json(e) for e in data["evaluations"]),
            srm_log_e=_float(data["srm_log_e"]),
            warnings=tuple(data["warnings"]),
            matched=data["matched"],
            reached=data["reached"],
        )


@dataclass(frozen=True)
class RolloutState:
    """A rollout's controller state. A new rollout is ``RolloutState()``: pending, stage 0."""

    phase: Phase = Phase.PENDING
    stage: int = 0
    stage_started_at: datetime | None = None
    # The maximum bake and the install ramp count from here: the stage's start, or the last resume.
    watch_from: datetime | None = None
    plan: WavePlan = field(default_factory=WavePlan)
    reason: str | None = None  # why the rollout last paused or stopped
    missing: Mapping[str, str] = field(default_factory=dict)  # gate -> what it lacked, at a pause
    # Installs granted per stage (index = stage): the service starts at most this many.
    granted: tuple[int, ...] = ()
    ramp_base: int = 0  # of the current stage's grants, those made before watch_from
    known_gates: tuple[str, ...] = ()  # every stop-gate evaluated so far: none may go missing
    last_tick: datetime | None = None
    decisions: int = 0  # the seq of the last decision
    history: tuple[DecisionRecord, ...] = ()  # the latest HISTORY_LIMIT decisions

    def to_json(self) -> dict[str, Any]:
        """The state as strict JSON data; :meth:`from_json` reads it back equal."""
        return {
            "version": STATE_VERSION,
            "phase": self.phase.value,
            "stage": self.stage,
            "stage_started_at": _moment(self.stage_started_at),
            "watch_from": _moment(self.watch_from),
            "plan": plan_to_json(self.plan),
            "reason": self.reason,
            "missing": dict(self.missing),
            "granted": list(self.granted),
            "ramp_base": self.ramp_base,
            "known_gates": list(self.known_gates),
            "last_tick": _moment(self.last_tick),
            "decisions": self.decisions,
            "history": [d.to_json() for d in self.history],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        """The state :meth:`to_json` wrote; ``ValueError`` if ``data`` is not one."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"rollout state version {data.get('version')!r} is not {STATE_VERSION}"
            )
        try:
            return cls(
                phase=Phase(data["phase"]),
                stage=int(data["stage"]),
                stage_started_at=_parse_moment(data["stage_started_at"]),
                watch_from=_parse_moment(data["watch_from"]),
                plan=plan_from_json(data["plan"]),
                reason=data["reason"],
                missing={str(k): str(v) for k, v in data["missing"].items()},
                granted=tuple(int(n) for n in data["granted"]),
                ramp_base=int(data["ramp_base"]),
                known_gates=tuple(str(g) for g in data["known_gates"]),
                last_tick=_parse_moment(data["last_tick"]),
                decisions=int(data["decisions"]),
                history=tuple(DecisionRecord.from_json(d) for d in data["history"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a rollout state: {exc!r}") from None


_EVALUATION_FIELDS = tuple(f.name for f in fields(GateEvaluation))


def evaluation_to_json(evaluation: GateEvaluation) -> dict[str, Any]:
    """A gate's evaluation as strict JSON data (a non-finite number as ``"inf"``, ``"nan"``)."""
    values = ((name, getattr(evaluation, name)) for name in _EVALUATION_FIELDS)
    return {name: _number(v) if isinstance(v, float) else v for name, v in values}


_FLOAT_FIELDS = frozenset(
    {"estimate", "low", "high", "harm_at", "margin", "log_e_harm", "log_e_ni", "alpha", "beta"}
)


def evaluation_from_json(data: Mapping[str, Any]) -> GateEvaluation:
    values: dict[str, Any] = {
        name: _float(data[name]) if name in _FLOAT_FIELDS else data[name]
        for name in _EVALUATION_FIELDS
        if name in data
    }
    return GateEvaluation(**values)


def _number(value: float | None) -> float | str | None:
    # JSON has no infinity or NaN (PostgreSQL's jsonb refuses them): written as strings.
    if value is None or math.isfinite(value):
        return value
    return repr(value)


def _float(value: float | int | str | None) -> float | None:
    return None if value is None else float(value)


def _moment(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_moment(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
