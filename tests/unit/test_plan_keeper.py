"""The hybrid plan's keeper and its report: what the serving side is told, and the state says.

The keeper's answers are the fetcher's own answer messages (what the child
process prints); the clock is pinned.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, create_model

from agent.config import AgentConfig
from agent.mqtt.reports import reported_state, state_payload
from agent.ota.answers import PlanAnswer, PlanRead, Unavailable, Why, parse_plan_answer
from agent.ota.journal import Journal
from agent.ota.plan import PlanKeeper, PlanState, expire, follow, reported
from protocol.hybrid import HybridPlan
from protocol.messages import DEVICE_MESSAGE, HybridPlanState, ReportedState

T0 = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)


def make_plan(plan_id: str = "p-0123456789ab", ttl_s: float = 600) -> HybridPlan:
    return HybridPlan(
        plan_id=plan_id,
        device_id="pump-7",
        mode="escalate",
        temperature=1.3,
        tau=0.7,
        quota_rate=1.0,
        quota_burst=3,
        issued_at=T0,
        expires_at=T0 + timedelta(seconds=ttl_s),
    )


class Director:
    """The fetcher's answers, in order (the last one repeated)."""

    def __init__(self, *answers: PlanAnswer) -> None:
        self.answers = list(answers)

    async def plan(self) -> PlanAnswer:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class Device:
    """A keeper with a pinned clock, and what it told the serving side and the event log."""

    def __init__(self, *answers: PlanAnswer) -> None:
        self.now = T0.timestamp()
        self.told: list[tuple[str | None, str | None]] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.keeper = PlanKeeper(
            fetcher=Director(*answers),
            on_plan=lambda plan, why: self.told.append(
                (plan.plan_id if plan else None, why.reason if why else None)
            ),
            report=lambda kind, details: self.events.append((kind, details)),
            clock=lambda: self.now,
        )

    def poll(self) -> PlanState:
        return asyncio.run(self.keeper.poll())


def refused(reason: str, message: str = "why") -> PlanRead:
    return PlanRead(refusal=Why(reason=reason, message=message))


def test_a_new_plan_is_handed_over_once_and_reported_followed() -> None:
    plan = make_plan()
    device = Device(PlanRead(plan=plan, expires=T0 + timedelta(days=1)))
    assert device.poll().plan == plan
    device.poll()
    assert device.told == [("p-0123456789ab", None)]
    expires_at = plan.expires_at.timestamp()
    assert device.events == [
        ("plan-followed", {"plan": "p-0123456789ab", "mode": "escalate", "expires_at": expires_at})
    ]
    assert device.keeper.state.until == plan.expires_at


def test_a_refusal_is_one_event_however_often_it_is_read_and_replaces_the_plan() -> None:
    device = Device(
        PlanRead(plan=make_plan()), refused("plan-wrong-device", "plan p-2 is for device pump-8")
    )
    device.poll()
    for _ in range(3):
        device.poll()
    assert device.told == [("p-0123456789ab", None), (None, "plan-wrong-device")]
    assert [kind for kind, _ in device.events] == ["plan-followed", "plan-refused"]
    details = device.events[1][1]
    assert details == {
        "reason": "plan-wrong-device",
        "message": "plan p-2 is for device pump-8",
        "plan": "p-0123456789ab",
    }
    assert device.keeper.metrics.refusals["plan-wrong-device"] == 1


def test_a_failed_fetcher_keeps_the_plan_until_it_expires_on_the_clock() -> None:
    plan = make_plan(ttl_s=60)
    device = Device(
        PlanRead(plan=plan), Unavailable(reason="fetcher-failed", message="exited with status 1")
    )
    device.poll()
    device.poll()
    assert device.keeper.plan == plan
    device.now += 59
    device.keeper.tick()
    assert device.keeper.plan == plan
    device.now += 1
    device.keeper.tick()
    assert device.keeper.plan is None
    assert device.told[-1] == (None, "plan-expired")
    kind, details = device.events[-1]
    assert kind == "plan-refused" and details["reason"] == "plan-expired"
    assert details["plan"] == "p-0123456789ab"
    device.keeper.tick()
    assert len(device.told) == 2, "an expired plan is dropped once"


def test_a_withdrawn_plan_means_local_only_with_nothing_refused() -> None:
    device = Device(PlanRead(plan=make_plan()), PlanRead())
    device.poll()
    device.poll()
    assert device.told == [("p-0123456789ab", None), (None, None)]
    assert [kind for kind, _ in device.events] == ["plan-followed"]
    assert reported(device.keeper.state) is None


def test_a_refresh_that_fails_keeps_the_trusted_plan_and_drops_it_once_that_is_untrusted() -> None:
    plan = make_plan()
    failed = Why(reason="untrusted-metadata", message="not signed by enough trusted keys")
    state = follow(PlanState(), PlanRead(plan=plan))
    assert follow(state, PlanRead(plan=plan, refresh_failed=failed)) == state
    dropped = follow(state, PlanRead(refresh_failed=failed))
    assert dropped.plan is None and dropped.refusal is not None
    assert dropped.refusal.reason == "untrusted-metadata"
    assert "p-0123456789ab is no longer followed" in dropped.refusal.message
    # Without a plan before, nothing is dropped and nothing refused: the check says it.
    assert follow(PlanState(), PlanRead(refresh_failed=failed)) == PlanState()


def test_the_plan_lives_no_longer_than_its_metadata() -> None:
    plan = make_plan(ttl_s=3600)
    state = follow(PlanState(), PlanRead(plan=plan, expires=T0 + timedelta(minutes=5)))
    assert state.until == T0 + timedelta(minutes=5)
    gone = expire(state, T0 + timedelta(minutes=5))
    assert gone.refusal is not None and "director metadata that carried it" in gone.refusal.message


def test_a_serving_side_that_fails_never_breaks_the_keeper() -> None:
    def broken(plan: HybridPlan | None, why: Why | None) -> None:
        raise RuntimeError("chain busy")

    keeper = PlanKeeper(
        fetcher=Director(PlanRead(plan=make_plan())),
        on_plan=broken,
        report=lambda kind, details: None,
        clock=lambda: T0.timestamp(),
    )
    asyncio.run(keeper.poll())
    assert keeper.plan is not None


def test_the_plan_answer_round_trips_through_the_fetchers_line() -> None:
    answer = PlanRead(
        plan=make_plan(),
        expires=T0 + timedelta(days=1),
        refresh_failed=Why(reason="repository-unavailable", message="connection refused"),
    )
    assert parse_plan_answer(answer.model_dump_json()) == answer
    with pytest.raises(ValueError, match="not a plan answer"):
        parse_plan_answer('{"status": "assigned"}')


# -- the reported state ------------------------------------------------------------------------


def _state(plan: HybridPlanState | None) -> ReportedState:
    return reported_state(
        device_id="pump-7",
        hardware_id="rpi4-arm64",
        agent_version="0.1.0",
        journal=Journal(),
        active=None,
        previous=None,
        sent_at=1_800_000_000.0,
        hybrid_plan=plan,
    )


def _older_server_model() -> type[BaseModel]:
    """ReportedState as servers read it before the plan: unknown fields refused."""
    base = {"v", "device_id", "message_id", "sent_at"}
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in ReportedState.model_fields.items()
        if name != "hybrid_plan" and name not in base
    }
    older = create_model(  # type: ignore[call-overload]
        "OlderReportedState", __base__=ReportedState.__mro__[1], **fields
    )
    assert older.model_config["extra"] == "forbid"
    return older  # type: ignore[no-any-return]


def test_the_state_names_the_plan_followed_or_why_none_is() -> None:
    plan = make_plan()
    followed = reported(PlanState(plan=plan, until=plan.expires_at))
    assert followed == HybridPlanState(
        plan_id="p-0123456789ab", mode="escalate", expires_at=plan.expires_at.timestamp()
    )
    why = Why(reason="plan-hash-mismatch", message="plan p-1: its canonical JSON does not match")
    refusal = reported(PlanState(refusal=why))
    assert refusal is not None and refusal.plan_id is None
    assert (refusal.refused, refusal.message) == (why.reason, why.message)
    parsed = DEVICE_MESSAGE.validate_json(state_payload(_state(followed)))
    assert isinstance(parsed, ReportedState) and parsed.hybrid_plan == followed


def test_an_older_server_takes_the_state_of_a_device_the_director_gave_no_plan() -> None:
    payload = state_payload(_state(None))
    assert "hybrid_plan" not in json.loads(payload)
    _older_server_model().model_validate_json(payload)
    # And a newer server reads an older device's state (no key at all) as no plan.
    parsed = DEVICE_MESSAGE.validate_json(payload)
    assert isinstance(parsed, ReportedState) and parsed.hybrid_plan is None


# -- the one place the plan reaches the serving chain ------------------------------------------


def test_the_daemon_hands_the_plan_to_the_chain_and_reports_it(tmp_path: Path) -> None:
    from agent.daemon import AgentDaemon

    config = AgentConfig.model_validate(
        {
            "device_id": "pump-7",
            "hardware_id": "rpi4-arm64",
            "data_dir": str(tmp_path / "data"),
            "image_repository": {"url": str(tmp_path / "repo"), "root": str(tmp_path / "r.json")},
            "director": {"url": str(tmp_path / "director"), "root": str(tmp_path / "d.json")},
            "api": {"host": "127.0.0.1", "port": 0},
        }
    )
    config.data_dir.mkdir(parents=True)
    daemon = AgentDaemon(config, tmp_path / "agent.toml")
    assert daemon.plan is not None
    handed: list[HybridPlan | None] = []
    setattr(daemon.chain, "set_hybrid_plan", handed.append)  # noqa: B010
    plan = make_plan()
    daemon.plan.fetcher = Director(PlanRead(plan=plan), refused("plan-duplicate"))
    daemon.plan.clock = lambda: T0.timestamp()
    asyncio.run(daemon.plan.poll())
    assert handed == [plan]
    state = daemon._plan_state()
    assert state is not None and state.plan_id == "p-0123456789ab"
    asyncio.run(daemon.plan.poll())
    assert handed == [plan, None]
    state = daemon._plan_state()
    assert state is not None and (state.plan_id, state.refused) == (None, "plan-duplicate")
    assert b"edgefleet_agent_plan_refusals_total" in daemon.metrics.exposition()
