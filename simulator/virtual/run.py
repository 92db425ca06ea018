"""A virtual run: the fleet and the server on one simulated clock, event by event.

No sleeping: a heap of the next events (a device's window ending, a download
finishing, an operator's step, the controller's tick, a sample), taken in order
of time and then of a fixed rank, so two runs of one scenario take the same
steps. The seed-derived events are drawn per device from ``(seed, device)``
and written to the trace as they are drawn; :func:`replay` takes them from a
trace instead and draws nothing.

Faults: a ``link-down`` holds a device's windows and events in its outbox and
its downloads unfinished until the link is back, and silences its heartbeats;
a ``power-cut`` loses the window under way (at a random moment of its span,
or in an install, which then resumes from its journal :data:`REBOOT_S` later).
Whom and when follow from the scenario's seed alone. The other kinds are
listed in the report as not applied, with why.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fleet_server.rollouts.controller import (
    AssignDevices,
    RecordDecision,
    RollbackReached,
    Start,
    Tick,
)
from fleet_server.rollouts.state import DecisionRecord, Phase
from fleet_server.rollouts.waves import DeviceFacts
from model_runtime.tflite import TFLiteRuntime
from protocol.api.rollouts import RolloutSpec
from protocol.messages import DeviceEvent
from protocol.window import WindowSummary
from simulator.report import Check, RunReport, Sample
from simulator.scenario import Fault, Scenario, Step
from simulator.virtual.fleet import (
    NAME,
    VERSIONS,
    Model,
    RowPool,
    VirtualDevice,
    build_model,
    hardware_ms,
    message_id,
)
from simulator.virtual.server import Reached, VirtualRollout, VirtualServer, fresh_database
from simulator.virtual.trace import Event, Fetched, StepTaken, TraceWriter, WindowSent, read_trace

EPOCH = datetime(2026, 6, 1, tzinfo=UTC)
"""The simulated clock's zero: the moment the run's traffic starts."""

FETCH_S = (30.0, 300.0)
"""A download's time after an assignment, drawn uniformly: the fetch, verification, staging."""

SAMPLES = 200
"""At most this many samples in the report's series."""

INGEST_PROCESS = 1_000
"""From this many devices the server's ingest runs in a process of its own, beside the
devices (the same steps, the same database: see :class:`~simulator.virtual.server.IngestProcess`);
a smaller fleet does not repay starting it."""

_RANK = {"step": 0, "fault": 1, "fetched": 2, "window": 3, "tick": 4, "sample": 5}

REBOOT_S = 30.0
"""How long an install cut by a power failure takes to resume from its journal."""

SIMULATED_FAULTS = ("link-down", "power-cut")
_EXPECTED = {
    "completed": Phase.COMPLETED,
    "rolled-back": Phase.ROLLING_BACK,
    "paused": Phase.PAUSED,
    "aborted": Phase.ABORTED,
}

Progress = Callable[[Sample], None]


def run_virtual(
    scenario: Scenario,
    workdir: Path,
    *,
    trace: Path | None = None,
    progress: Progress | None = None,
) -> RunReport:
    """Run ``scenario`` on the simulated clock in ``workdir``; write its events to ``trace``."""
    workdir.mkdir(parents=True, exist_ok=True)
    url = fresh_database(workdir)
    return asyncio.run(_Run(scenario, url, trace, None, progress).run())


def replay(trace: Path, workdir: Path) -> RunReport:
    """Run the scenario of ``trace`` again from its events (:class:`TraceError` for a bad one)."""
    recorded = read_trace(trace)
    workdir.mkdir(parents=True, exist_ok=True)
    url = fresh_database(workdir)
    return asyncio.run(_Run(recorded.scenario, url, None, recorded.events, None).run())


def same_report(a: RunReport, b: RunReport) -> bool:
    """Whether two reports say the same, apart from the wall clock's start and time taken."""

    def said(r: RunReport) -> dict[str, Any]:
        document = r.to_json()
        document.pop("started_at")
        document.pop("wall_s")
        document["figures"] = {k: v for k, v in document["figures"].items() if "wall" not in k}
        return document

    return said(a) == said(b)


@dataclass(order=True)
class _Next:
    t: float
    rank: int
    key: str
    event: Any = field(compare=False)


class _Run:
    def __init__(
        self,
        scenario: Scenario,
        url: str,
        trace: Path | None,
        events: list[Event] | None,
        progress: Progress | None,
    ) -> None:
        self.scenario = scenario
        self.url = url
        self.trace = TraceWriter(trace, scenario) if trace is not None else None
        self.replaying = events is not None
        self.progress = progress
        self.heap: list[_Next] = []
        self.window_s = scenario.traffic.window.total_seconds()
        self.end = scenario.duration.total_seconds()
        self.tick_s = scenario.server.tick.total_seconds()
        self.sample_s = max(self.end / SAMPLES, self.tick_s)
        self.runtime = TFLiteRuntime()
        self.models: dict[str, Model] = {}
        self.devices: dict[str, VirtualDevice] = {}
        self.rngs: dict[str, np.random.Generator] = {}
        self.server: VirtualServer | None = None
        self.rollout: VirtualRollout | None = None
        self.released: Model | None = None
        self.series: list[Sample] = []
        self.ticks = 0
        self.spent = {"devices": 0.0, "ingest": 0.0, "ticks": 0.0}  # wall seconds, by part
        self.recorded = events or []
        self.fault_report: list[dict[str, Any]] = []
        # Power cuts aimed at an install step: (fault index, from, until, devices hit).
        self.install_cuts: list[tuple[int, float, float, set[str]]] = []
        self.cut: set[tuple[int, str]] = set()  # (fault, device): each install cut once

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> RunReport:
        started_at = datetime.now(UTC).isoformat()
        wall = time.perf_counter()
        fleet = sum(c.devices for c in self.scenario.cohorts)
        self.server = server = VirtualServer(self.url, ingest_process=fleet >= INGEST_PROCESS)
        try:
            await self._start(server)
            while self.heap and self.heap[0].t <= self.end:
                item = heapq.heappop(self.heap)
                await self._handle(server, item)
            await server.flush()
            await self._sample(server, self.end)
            report = await self._report(server, started_at)
        finally:
            await server.close()
            if self.trace is not None:
                self.trace.close()
        report.wall_s = time.perf_counter() - wall
        report.figures["wall_s_per_simulated_hour"] = report.wall_s / max(self.end / 3600, 1e-9)
        for part, spent in self.spent.items():
            report.figures[f"wall_s_{part}"] = round(spent, 3)
        return report

    async def _start(self, server: VirtualServer) -> None:
        scenario = self.scenario
        initial = self._model(scenario.initial, VERSIONS[scenario.initial])
        pool = RowPool(scenario.seed)
        facts = []
        for cohort in scenario.cohorts:
            region = next(
                (t.partition("=")[2] for t in cohort.tags if t.startswith("region=")), None
            )
            tags = frozenset(t for t in cohort.tags if not t.startswith("region="))
            for device_id in scenario.device_ids()[cohort.name]:
                facts.append(DeviceFacts(device_id, cohort.hardware, region, tags))
                self.devices[device_id] = VirtualDevice(
                    device_id, cohort, hardware_ms(scenario, cohort), initial, EPOCH.timestamp(),
                    pool,
                )  # fmt: skip
        await server.register(facts, initial.version, EPOCH)
        for index, fault in enumerate(scenario.faults):
            self._plan_fault(index, fault)
        for event in self.recorded:
            self._queue(event)
        if not self.replaying:
            for device_id in self.devices:
                rng = self.rngs[device_id] = np.random.default_rng(
                    [scenario.seed, int(message_id(device_id)[:15], 16)]
                )
                first = float(rng.uniform(0.0, self.window_s)) or self.window_s
                self._draw(WindowSent(first, device_id, self._requests(device_id), _seed(rng)))
            for index, step in enumerate(scenario.steps):
                self._draw(StepTaken(step.at.total_seconds(), index))
        self._queue_at(0.0, "sample", "", None)

    def _requests(self, device_id: str) -> int:
        device = self.devices[device_id]
        rate = device.cohort.rate or self.scenario.traffic.rate
        return max(1, int(self.rngs[device_id].poisson(rate * self.window_s)))

    def _draw(self, event: Event) -> None:
        if self.trace is not None:
            self.trace.write(event)
        self._queue(event)

    def _queue(self, event: Event) -> None:
        if isinstance(event, WindowSent):
            self.devices[event.device].expect_window(event.t, event.requests, event.seed)
            self._queue_at(event.t, "window", event.device, event)
        elif isinstance(event, Fetched):
            self._queue_at(event.t, "fetched", event.device, event)
        else:
            self._queue_at(event.t, "step", f"{event.index:06d}", event)

    def _queue_at(self, t: float, kind: str, key: str, event: Any) -> None:
        heapq.heappush(self.heap, _Next(t, _RANK[kind], key, (kind, event)))

    async def _handle(self, server: VirtualServer, item: _Next) -> None:
        kind, event = item.event
        began = time.perf_counter()
        if kind == "window":
            self._window(server, event)
            self.spent["devices"] += time.perf_counter() - began
        elif kind == "fetched":
            self._fetched(server, event)
        elif kind == "step":
            await server.flush()
            self._step(server, event)
        elif kind == "tick":
            await server.flush()
            flushed = time.perf_counter()
            self.spent["ingest"] += flushed - began
            await self._tick(server, item.t)
            self.spent["ticks"] += time.perf_counter() - flushed
        elif kind == "fault":
            self._fault(server, item.t, event)
        elif kind == "sample":
            await server.flush()
            await self._sample(server, item.t)
            self._queue_at(item.t + self.sample_s, "sample", "", None)

    def _window(self, server: VirtualServer, sent: WindowSent) -> None:
        device = self.devices[sent.device]
        windows, events = device.end_window(sent.t, self.window_s)
        if device.links_down:
            device.held += windows
            device.held += events
        else:
            for summary in windows:
                server.send_window(summary)
            for event in events:
                server.send_event(event)
        if not self.replaying:
            rng = self.rngs[sent.device]
            nxt = sent.t + self.window_s
            if nxt <= self.end:
                self._draw(WindowSent(nxt, sent.device, self._requests(sent.device), _seed(rng)))

    def _fetched(self, server: VirtualServer, fetched: Fetched) -> None:
        """A download finished: the device installs it now, if it still wants it."""
        device = self.devices[fetched.device]
        if device.desired is None or device.desired.version != fetched.version:
            return
        if device.links_down:
            device.held_fetch = fetched.version  # it finishes when the link is back
            return
        for index, since, until, hit in self.install_cuts:
            cut = since <= fetched.t < until and fetched.device in hit
            if cut and (index, fetched.device) not in self.cut:
                # Power fails mid-install: the device boots, and its journal takes the
                # install up again where it stopped.
                self.cut.add((index, fetched.device))
                events: list[DeviceEvent] = []
                device.power_cut(fetched.t, self.window_s, events)
                self._send(server, device, events)
                again = Fetched(fetched.t + REBOOT_S, fetched.device, fetched.version)
                self._queue_at(again.t, "fetched", again.device, again)
                return
        device.fetched = True
        self._send(server, device, device.install(fetched.t, self.window_s))

    def _send(
        self, server: VirtualServer, device: VirtualDevice, events: list[DeviceEvent]
    ) -> None:
        if device.links_down:
            device.held += events
            return
        for said in events:
            server.send_event(said)

    # -- faults ----------------------------------------------------------------------

    def _plan_fault(self, index: int, fault: Fault) -> None:
        """Queue ``fault``'s moments; devices and moments follow from the seed alone, so a
        replay, which has the scenario, makes the same."""
        at, span = fault.at.total_seconds(), fault.duration.total_seconds()
        targets = self._targets(index, fault)
        entry: dict[str, Any] = {
            "kind": fault.kind, "at": at, "duration_s": span, "targets": len(targets),
        }  # fmt: skip
        self.fault_report.append(entry)
        if fault.kind not in SIMULATED_FAULTS:
            entry["applied"] = f"no: {fault.kind} is not simulated in virtual mode"
            return
        entry["applied"] = "yes"
        if fault.kind == "link-down":
            self._queue_at(at, "fault", f"{index:06d}", ("link-down", index, targets))
            self._queue_at(at + span, "fault", f"{index:06d}", ("link-up", index, targets))
        elif fault.step is not None:
            self.install_cuts.append((index, at, at + max(span, 1e-9), set(targets)))
        else:
            rng = np.random.default_rng([self.scenario.seed, index, 7])
            for device_id, u in zip(targets, rng.uniform(0.0, 1.0, len(targets)), strict=True):
                self._queue_at(
                    at + float(u) * span, "fault", device_id, ("power-cut", index, [device_id])
                )

    def _targets(self, index: int, fault: Fault) -> list[str]:
        """The devices ``fault`` hits: its target's, a seeded share of them if it says."""
        target = fault.target
        by_cohort = self.scenario.device_ids()
        ids = [d for c in self.scenario.cohorts for d in by_cohort[c.name]]
        if target.devices is not None:
            named = set(target.devices)
            ids = [d for d in ids if d in named]
        if target.cohort is not None:
            ids = [d for d in ids if d in set(by_cohort.get(target.cohort, []))]
        if target.share is not None and ids:
            rng = np.random.default_rng([self.scenario.seed, index])
            count = max(1, round(len(ids) * target.share))
            ids = sorted(str(d) for d in rng.choice(ids, count, replace=False))
        return ids

    def _fault(self, server: VirtualServer, t: float, fault: tuple[str, int, list[str]]) -> None:
        kind, _index, targets = fault
        now = EPOCH + timedelta(seconds=t)
        for device_id in targets:
            device = self.devices[device_id]
            if kind == "power-cut":
                events: list[DeviceEvent] = []
                device.power_cut(t, self.window_s, events)
                self._send(server, device, events)
            elif kind == "link-down":
                device.links_down += 1
                server.silent.setdefault(device_id, now)
            elif device.links_down:  # link-up
                device.links_down -= 1
                if device.links_down:
                    continue
                server.silent.pop(device_id, None)
                held, device.held = device.held, []
                for message in held:  # the outbox, oldest first
                    if isinstance(message, WindowSummary):
                        server.send_window(message)
                    else:
                        server.send_event(message)
                if device.held_fetch is not None:
                    version, device.held_fetch = device.held_fetch, None
                    self._fetched(server, Fetched(t, device_id, version))

    # -- the operator and the controller -------------------------------------------

    def _model(self, key: str, version: str) -> Model:
        if version not in self.models:
            self.models[version] = build_model(key, version, self.runtime)
        return self.models[version]

    def _step(self, server: VirtualServer, taken: StepTaken) -> None:
        step: Step = self.scenario.steps[taken.index]
        now = EPOCH + timedelta(seconds=taken.t)
        if step.action == "release" and step.model in VERSIONS:
            self.released = self._model(step.model, step.version or VERSIONS[step.model])
        elif step.action == "rollout":
            fields = dict(step.rollout or {})
            if self.released is not None:
                fields.setdefault("release", f"{NAME}@{self.released.version}")
            fields.setdefault(
                "select", ",".join(f"hardware={h.id}" for h in self.scenario.hardware)
            )
            spec = RolloutSpec.model_validate(fields)
            self.rollout = rollout = VirtualRollout(spec, f"virtual-{taken.index}", now)
            _selected, population = rollout.population(server)
            self._carry_out(server, rollout.step(Start(population), now), population, taken.t)
            self._queue_at(taken.t + self.tick_s, "tick", "", None)

    async def _tick(self, server: VirtualServer, t: float) -> None:
        rollout = self.rollout
        if rollout is None or rollout.state.phase in (Phase.COMPLETED, Phase.ABORTED):
            return
        now = EPOCH + timedelta(seconds=t)
        server.heartbeats(now)
        selected, population = rollout.population(server)
        evaluations, srm = await rollout.evaluate(server, selected, population, now, self.models)
        effects = rollout.step(Tick(evaluations, srm, population), now)  # type: ignore[arg-type]
        self.ticks += 1
        self._carry_out(server, effects, population, t)
        self._queue_at(t + self.tick_s, "tick", "", None)

    def _carry_out(
        self, server: VirtualServer, effects: list[object], population: Any, t: float
    ) -> None:
        rollout = self.rollout
        assert rollout is not None
        now = EPOCH + timedelta(seconds=t)
        release = self.models[rollout.spec.version]
        for effect in effects:
            if isinstance(effect, RecordDecision):
                _record(rollout.decisions, effect.record)
            elif isinstance(effect, AssignDevices):
                waiting = rollout.waiting(population)
                chosen = waiting if effect.limit is None else waiting[: effect.limit]
                for device_id in chosen:
                    rollout.reached[device_id] = Reached(now, server.running[device_id])
                    self._assign(device_id, release, t)
            elif isinstance(effect, RollbackReached):
                for device_id, was in sorted(rollout.reached.items()):
                    device = self.devices[device_id]
                    if device.active.version == release.version or device.desired is release:
                        self._assign(device_id, self.models[was.previous], t)

    def _assign(self, device_id: str, model: Model, t: float) -> None:
        device = self.devices[device_id]
        if device.active is model:
            device.desired, device.fetched = None, False
            return
        device.desired, device.fetched = model, False
        if not self.replaying:
            delay = float(self.rngs[device_id].uniform(*FETCH_S))
            self._draw(Fetched(t + delay, device_id, model.version))

    # -- the report ----------------------------------------------------------------

    async def _sample(self, server: VirtualServer, t: float) -> None:
        versions: dict[str, int] = {}
        for device in self.devices.values():
            versions[device.active.version] = versions.get(device.active.version, 0) + 1
        sample = Sample(
            t=round(t, 3),
            online=len(self.devices),
            serving=len(self.devices),
            installing=sum(1 for d in self.devices.values() if d.desired is not None or d.trial),
            requests=sum(d.served.answered for d in self.devices.values()),
            windows_produced=len(server.produced),
            windows_stored=(await server.stored_windows())[0],
            versions=";".join(f"{v}={n}" for v, n in sorted(versions.items())),
        )
        self.series.append(sample)
        if self.progress is not None:
            self.progress(sample)

    async def _report(self, server: VirtualServer, started_at: str) -> RunReport:
        scenario = self.scenario
        rows, distinct = await server.stored_windows()
        produced = len(server.produced)
        requests = sum(d.served.requests for d in self.devices.values())
        answered = sum(d.served.answered for d in self.devices.values())
        unserved = sum(d.served.unserved for d in self.devices.values())
        installs: dict[str, int] = {}
        for device in self.devices.values():
            for outcome, n in device.installs.items():
                installs[outcome] = installs.get(outcome, 0) + n
        checks = [
            Check("requests-answered", answered == requests,
                  f"{requests:,} requests, {answered:,} answered"),
            Check("windows-once", rows == distinct == produced,
                  f"{produced:,} windows produced, {rows:,} stored ({distinct:,} distinct)"),
            Check("verified-model", unserved == 0,
                  f"{len(self.devices):,} devices; {unserved:,} requests with no verified model"),
            self._expectations(),
        ]  # fmt: skip
        checks = [c for c in checks if c.name not in scenario.skip_checks]
        rollout = self.rollout
        return RunReport(
            scenario=scenario.name,
            mode="virtual",
            seed=scenario.seed,
            devices=len(self.devices),
            started_at=started_at,
            duration_s=self.end,
            checks=checks,
            series=self.series,
            figures={
                "requests": requests,
                "fallback_answers": sum(d.served.by_fallback for d in self.devices.values()),
                "windows_produced": produced,
                "windows_stored": rows,
                "installs": dict(sorted(installs.items())),
                "ticks": self.ticks,
                "rollout_phase": rollout.state.phase.value if rollout is not None else None,
                "rollout_stage": rollout.state.stage if rollout is not None else None,
                "reached": len(rollout.reached) if rollout is not None else 0,
                "power_cuts": sum(d.power_cuts for d in self.devices.values()),
                "requests_lost_in_power_cuts": sum(d.lost_requests for d in self.devices.values()),
                "windows_held": sum(len(d.held) for d in self.devices.values()),
            },
            faults=self.fault_report,
            decisions=rollout.decisions if rollout is not None else [],
        )

    def _expectations(self) -> Check:
        expect = self.scenario.expect
        rollout = self.rollout
        wanted: list[str] = []
        problems: list[str] = []
        if expect.rollout is not None:
            wanted.append(f"rollout {expect.rollout}")
            phase = rollout.state.phase if rollout is not None else None
            if phase != _EXPECTED[expect.rollout]:
                problems.append(f"the rollout ended {phase.value if phase else 'never started'}")
        if expect.rollout_stopped_in_wave is not None:
            wanted.append(f"stopped in wave {expect.rollout_stopped_in_wave}")
            stage = rollout.state.stage if rollout is not None else None
            stopped = rollout is not None and rollout.state.phase in (
                Phase.ROLLING_BACK,
                Phase.STOPPED,
                Phase.PAUSED,
            )
            if not stopped or stage != expect.rollout_stopped_in_wave:
                problems.append(
                    f"it was in wave {stage} ({rollout.state.phase.value if rollout else '-'})"
                )
        if not wanted:
            return Check("expectations", True, "nothing expected besides the checks")
        if problems:
            return Check(
                "expectations", False, f"expected {', '.join(wanted)}: {'; '.join(problems)}"
            )
        return Check("expectations", True, f"{', '.join(wanted)}, as expected")


def _record(decisions: list[dict[str, Any]], r: DecisionRecord) -> None:
    """The controller's decision as the report lists it; a tick that changes nothing and says
    what the one before said (a wave baking, a paused rollout waiting) is counted, not listed."""
    entry: dict[str, Any] = {
        "at": (r.at - EPOCH).total_seconds(),
        "event": r.event,
        "phase": r.phase.value,
        "stage": r.stage,
        "rule": r.rule,
        "action": r.action,
        "reason": r.reason,
        "gates": {e.gate: e.decision for e in r.evaluations},
        "repeated": 0,
    }
    last = decisions[-1] if decisions else None
    same = ("event", "phase", "stage", "rule", "action", "reason", "gates")
    if last is not None and all(last[k] == entry[k] for k in same):
        last["repeated"] += 1
        return
    decisions.append(entry)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))
