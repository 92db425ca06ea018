"""The hybrid plan's keeper: which plan the device follows now, and why not when none.

The plan comes signed in the device's director metadata (read and checked by
the fetcher's ``plan`` command, :func:`agent.ota.fetch_worker.run_plan`). The
keeper asks for it at every update poll and hands what it should follow to
the serving side through one callback, ``on_plan(plan, refusal)``: the plan
(``None``: serve locally only) and, when a plan was listed but is not
followed, why (a :class:`~agent.ota.answers.Why`). The rules, in
:func:`follow` and :func:`expire` (pure functions):

- the director's answer replaces the plan: a new plan, the same one, a
  refused one (local only, with the refusal) or none (local only);
- a fetcher that failed says nothing new: the plan in force stays, until it
  expires;
- a director that could not be refreshed is answered from the metadata
  trusted before (verified again); a plan is followed no longer than its own
  ``expires_at`` and the expiry of the director metadata that carried it
  (``until``), checked at every tick of the agent's clock;
- when the stored metadata cannot be trusted either, the plan in force is
  dropped, saying why.

Each new refusal is recorded as a ``plan-refused`` event (with ``reason``,
``message`` and the ``plan`` when known), each new plan followed as
``plan-followed``. Nothing is stored: after a restart the plan is read again
from the director metadata python-tuf keeps on disk, if still valid.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Protocol

from agent.ota.answers import PLAN_EXPIRED, PLAN_REFUSALS, PlanAnswer, PlanRead, Why
from agent.ota.errors import refusal_kinds
from protocol.hybrid import HybridPlan
from protocol.messages import HybridPlanState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

PLAN_REFUSED: Final = "plan-refused"
PLAN_FOLLOWED: Final = "plan-followed"

# Hands the serving side the plan to follow (None: local only) and why a listed one is not.
OnPlan = Callable[[HybridPlan | None, Why | None], None]
ReportEvent = Callable[[str, dict[str, object]], None]


class PlanFetcher(Protocol):
    """Asks the director for this device's plan (:meth:`~agent.ota.parts.ProcessFetcher.plan`)."""

    async def plan(self) -> PlanAnswer: ...


@dataclass(frozen=True)
class PlanState:
    """The plan followed (``None``: local only), until when, and why a listed one is not."""

    plan: HybridPlan | None = None
    until: datetime | None = None
    refusal: Why | None = None


def follow(state: PlanState, answer: PlanAnswer) -> PlanState:
    """The plan to follow after the fetcher's ``answer``."""
    if not isinstance(answer, PlanRead):
        return state  # the fetcher failed: nothing new is known
    plan, refusal = answer.plan, answer.refusal
    if plan is None and refusal is None and state.plan is not None and answer.refresh_failed:
        failed = answer.refresh_failed
        refusal = Why(
            reason=failed.reason,
            message=f"plan {state.plan.plan_id} is no longer followed: the director cannot be "
            f"refreshed and the metadata trusted before no longer holds it ({failed.message})",
        )
    if plan is None:
        return PlanState(refusal=refusal)
    until = plan.expires_at
    if answer.expires is not None and answer.expires < until:
        until = answer.expires
    return PlanState(plan=plan, until=until, refusal=None)


def reported(state: PlanState) -> HybridPlanState | None:
    """The plan as the device's reported state names it: the plan followed, or why none is.

    ``None`` (left out of the state) when there is neither: the director lists no plan.
    """
    plan, refusal = state.plan, state.refusal
    if plan is None and refusal is None:
        return None
    return HybridPlanState(
        plan_id=plan.plan_id if plan else None,
        mode=plan.mode if plan else None,
        expires_at=plan.expires_at.timestamp() if plan else None,
        refused=refusal.reason[:256] if refusal else None,
        message=refusal.message[:2000] if refusal else None,
    )


def expire(state: PlanState, now: datetime) -> PlanState:
    """``state`` at ``now``: a plan past its ``until`` is dropped, refused as expired."""
    if state.plan is None or state.until is None or now < state.until:
        return state
    plan = state.plan
    if state.until < plan.expires_at:
        message = (
            f"plan {plan.plan_id} is no longer followed: the director metadata that carried "
            f"it expired at {state.until.isoformat()}"
        )
    else:
        message = f"plan {plan.plan_id} expired at {plan.expires_at.isoformat()}"
    return PlanState(refusal=Why(reason=PLAN_EXPIRED, message=message))


class PlanKeeper:
    """Asks for the plan, keeps the one in force, and tells ``on_plan`` of every change.

    ``report`` records an event; ``clock`` is the agent's (seconds since the epoch).
    """

    def __init__(
        self,
        *,
        fetcher: PlanFetcher,
        on_plan: OnPlan,
        report: ReportEvent,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetcher = fetcher
        self.on_plan = on_plan
        self.report = report
        self.clock = clock
        self.state = PlanState()
        self.metrics = PlanMetrics()
        self._lock = asyncio.Lock()

    @property
    def plan(self) -> HybridPlan | None:
        """The plan followed now (``None``: local only)."""
        return self.state.plan

    async def poll(self) -> PlanState:
        """Ask the director for the plan and follow its answer."""
        async with self._lock:
            answer = await self.fetcher.plan()
            if isinstance(answer, PlanRead) and answer.refresh_failed is not None:
                log.info(
                    "plan: the director could not be refreshed (%s: %s); using the metadata "
                    "trusted before",
                    answer.refresh_failed.reason,
                    answer.refresh_failed.message,
                )
            self._move(expire(follow(self.state, answer), self._now()))
            return self.state

    def tick(self) -> None:
        """Drop the plan once past its expiry (or its metadata's)."""
        self._move(expire(self.state, self._now()))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _move(self, after: PlanState) -> None:
        before, self.state = self.state, after
        same_plan = before.plan == after.plan
        if same_plan and before.refusal == after.refusal:
            return  # at most a later ``until`` (re-signed metadata): nothing to tell
        if after.plan is not None and not same_plan:
            plan = after.plan
            log.info(
                "plan: following %s (mode %s, tau %.3f) until %s",
                plan.plan_id,
                plan.mode,
                plan.tau,
                after.until.isoformat() if after.until else "?",
            )
            expires_at = plan.expires_at.timestamp()
            self.report(
                PLAN_FOLLOWED, {"plan": plan.plan_id, "mode": plan.mode, "expires_at": expires_at}
            )
        refusal = after.refusal
        if refusal is not None and refusal != before.refusal:
            log.warning("plan: %s: %s; serving locally only", refusal.reason, refusal.message)
            self.metrics.refused(refusal.reason)
            details: dict[str, object] = {"reason": refusal.reason, "message": refusal.message}
            if before.plan is not None and after.plan is None:
                details["plan"] = before.plan.plan_id
            self.report(PLAN_REFUSED, details)
        elif after.plan is None and before.plan is not None and refusal is None:
            log.info("plan: the director lists no plan any more; serving locally only")
        try:
            self.on_plan(after.plan, refusal)
        except Exception:  # the serving side must never break the update loop
            log.exception("plan: handing the plan to the serving side failed")


def plan_refusal_reasons() -> tuple[str, ...]:
    """Every reason a plan can be refused or dropped for, and ``other``."""
    codes = set(PLAN_REFUSALS) | {cls.reason for cls in refusal_kinds()}
    return (*sorted(codes), "other")


class PlanMetrics:
    """Plans refused by reason, as a Prometheus family: ``edgefleet_agent_plan_refusals_total``.

    The plan followed is the serving chain's ``edgefleet_agent_hybrid_plan_info``
    (:mod:`agent.metrics`).
    """

    def __init__(self) -> None:
        self._refusals: dict[str, int] = dict.fromkeys(plan_refusal_reasons(), 0)

    def refused(self, reason: str) -> None:
        self._refusals[reason if reason in self._refusals else "other"] += 1

    @property
    def refusals(self) -> Mapping[str, int]:
        return dict(self._refusals)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily

        refusals = CounterMetricFamily(
            "edgefleet_agent_plan_refusals",
            "Hybrid plans refused or dropped (the device then serves locally only), by reason",
            labels=["reason"],
        )
        for reason, count in self._refusals.items():
            refusals.add_metric([reason], count)
        yield refusals
