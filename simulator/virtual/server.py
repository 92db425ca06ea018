"""The server side of a virtual run: the real ingest into SQLite, the real rollout rules.

Windows and events go the server's own way in: :func:`fleet_server.mqtt.ingest.classify`
over the bytes a device sends (windows as :func:`protocol.window.encode_window`
encodes them) and :func:`fleet_server.mqtt.ingest.write_batch` into a database of
the run's own (SQLite in its folder, migrated to the newest schema): stored
once by window id and folded into the hourly device aggregates, hours by the
windows' own (simulated) times. The rollout is stepped by the real controller
(:func:`fleet_server.rollouts.controller.decide`) on the simulated clock, with
every gate's evaluation made as :mod:`fleet_server.rollouts.service` makes it:
the aggregates read back by :func:`fleet_server.rollouts.store.device_aggregates`,
each device's against its own baseline, the install tally, the sample-ratio test.

What the virtual server leaves out: the REST API, MQTT and the director's
signatures (a device assigned a release learns it at once and fetches it after a
drawn delay), maintenance windows and the shadow stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select

from fleet_server.db import Database
from fleet_server.db.engine import migrate
from fleet_server.db.models import Device, WindowRow
from fleet_server.mqtt.ingest import Accepted, classify, write_batch
from fleet_server.rollouts import store
from fleet_server.rollouts.aggregates import DeviceAggregates
from fleet_server.rollouts.controller import Event, decide
from fleet_server.rollouts.evidence import (
    SHADOW_GATES,
    DeviceAggregate,
    InstallRecord,
    gather,
    install_tally,
)
from fleet_server.rollouts.gates import evaluate_all, gate_specs
from fleet_server.rollouts.service import BASELINE, INSTALL_TIMEOUT, _aggregate, _srm
from fleet_server.rollouts.state import RolloutState
from fleet_server.rollouts.waves import DeviceFacts, Population, matches, reached
from protocol.api.rollouts import RolloutSpec
from protocol.cbpe import Calibration
from protocol.messages import DeviceEvent
from protocol.topics import windows_topic
from protocol.window import WindowSummary, encode_window
from simulator.virtual.fleet import NAME, Model

NAMESPACE = "virtual"
MAX_WINDOW_BYTES = 1 << 20
_OUTCOMES = {"committed": "committed", "rolled-back": "failed", "fleet-rolled-back": "failed"}


class IngestRefused(RuntimeError):
    """The server's ingest refused what a device sent: the simulation itself is wrong."""


@dataclass
class Reached:
    """A device the rollout assigned the release to: when, and the version it ran then."""

    assigned_at: datetime
    previous: str


def fresh_database(workdir: Path) -> str:
    """A new SQLite database in ``workdir`` at the newest schema (blocking: before the loop)."""
    path = workdir / "server.sqlite"
    path.unlink(missing_ok=True)
    url = f"sqlite+aiosqlite:///{path}"
    migrate(url)
    return url


class VirtualServer:
    """The run's database, its ingest, and the one rollout it steps."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        # The run's own scratch database: a crash loses the run anyway, so no fsync at all.
        event.listen(self.db.engine.sync_engine, "connect", _no_sync)
        self._pending: list[Accepted] = []
        self.produced: set[str] = set()
        self.resent = 0
        self.running: dict[str, str] = {}  # the version each device last said it runs
        self.outcomes: dict[str, tuple[str, str | None, datetime]] = {}
        self.last_seen: dict[str, datetime] = {}
        self.facts: list[DeviceFacts] = []
        self.heard_at: datetime | None = None

    async def register(self, facts: Sequence[DeviceFacts], version: str, at: datetime) -> None:
        self.facts = list(facts)
        rows = [
            {
                "id": f.id, "hardware_id": f.hardware_id, "region": f.region,
                "tags": sorted(f.tags), "enrolled_at": at, "installed_counter": 0,
                "online": True, "director_version": 0, "hybrid_weight": 1.0,
                "offload_opt_out": False,
            }
            for f in facts
        ]  # fmt: skip
        async with self.db.session() as session:
            for start in range(0, len(rows), 5000):
                await session.execute(insert(Device), rows[start : start + 5000])
        self.running = {f.id: version for f in facts}

    # -- ingest --------------------------------------------------------------------

    def send_window(self, summary: WindowSummary) -> None:
        """A window as the device publishes it: encoded, then classified by the server."""
        payload = encode_window(summary)
        verdict = classify(
            windows_topic(NAMESPACE, summary.device_id), payload, MAX_WINDOW_BYTES,
            namespace=NAMESPACE,
        )  # fmt: skip
        if not isinstance(verdict, Accepted):
            raise IngestRefused(f"window of {summary.device_id} refused: {verdict}")
        self.produced.add(summary.window_id)
        self._pending.append(verdict)

    def send_event(self, event: DeviceEvent) -> None:
        self._pending.append(Accepted(event.device_id, "events", event))

    async def flush(self) -> None:
        """Store what devices sent since the last flush, in batches as the ingest takes them."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), 2000):
            batch = pending[start : start + 2000]
            result = await write_batch(self.db, batch, "virtual")
            if result.dropped:
                raise IngestRefused(f"ingest dropped {result.dropped}")
            for item in batch:
                self._seen(item)

    def heartbeats(self, at: datetime) -> None:
        """Every device has said it is alive by ``at``.

        A device heartbeats every minute or so; the virtual run has no faults that
        silence one, so the heartbeats between two ticks are taken as heard at the
        tick rather than ingested one by one (10,000 devices would send 600,000 an hour).
        """
        self.heard_at = at

    def seen(self, device_id: str) -> datetime | None:
        """The device's latest report of any kind."""
        seen = self.last_seen.get(device_id)
        heard = self.heard_at
        if seen is None or (heard is not None and heard > seen):
            return heard
        return seen

    def _seen(self, item: Accepted) -> None:
        message = item.message
        if isinstance(message, WindowSummary):
            self.last_seen[item.device_id] = datetime.fromtimestamp(message.end, UTC)
        elif isinstance(message, DeviceEvent):
            at = datetime.fromtimestamp(message.at, UTC)
            bundle = message.details.get("bundle")
            label = bundle if isinstance(bundle, str) else None
            self.outcomes[item.device_id] = (message.event, label, at)
            if message.event in ("committed", "fleet-rolled-back") and label is not None:
                self.running[item.device_id] = label.rpartition(" ")[2]

    async def stored_windows(self) -> tuple[int, int]:
        """Rows in the windows table, and distinct window ids among them."""
        async with self.db.session() as session:
            rows = await session.scalar(select(func.count()).select_from(WindowRow))
            ids = await session.scalar(select(func.count(func.distinct(WindowRow.window_id))))
        return int(rows or 0), int(ids or 0)

    async def close(self) -> None:
        await self.db.close()


class VirtualRollout:
    """One rollout, stepped by the real controller on the simulated clock."""

    def __init__(self, spec: RolloutSpec, rollout_id: str, started: datetime) -> None:
        self.spec = spec
        self.rollout_id = rollout_id
        self.started = started
        self.state = RolloutState()
        self.reached: dict[str, Reached] = {}
        self.decisions: list[dict[str, object]] = []
        self._made: dict[tuple[str, str], tuple[tuple[object, ...], DeviceAggregate]] = {}

    def population(self, server: VirtualServer) -> tuple[list[DeviceFacts], Population]:
        selected = [f for f in server.facts if matches(self.spec.select, f)]
        return selected, Population.of(self.rollout_id, selected)

    def step(self, event: Event, now: datetime) -> list[object]:
        after, effects = decide(self.state, event, self.spec, now)
        self.state = after
        return list(effects)

    def waiting(self, population: Population) -> list[str]:
        """Devices the plan reaches that have not been assigned the release yet."""
        if not self.state.plan.strata:
            return []
        return [d for d in reached(self.state.plan, population) if d not in self.reached]

    async def evaluate(
        self, server: VirtualServer, selected: list[DeviceFacts], population: Population,
        now: datetime, calibrations: dict[str, Model],
    ) -> tuple[list[object], float | None]:  # fmt: skip
        """Every gate's evaluation and the SRM test's log e-value, as the service makes them."""
        spec, started = self.spec, self.started
        in_plan = set(reached(self.state.plan, population)) if self.state.plan.strata else set()
        ids = [f.id for f in selected]
        control_ids = [d for d in ids if d not in in_plan and d not in self.reached]
        ran: dict[str, str] = {d: r.previous for d, r in self.reached.items()}
        ran.update({d: server.running[d] for d in control_ids if d in server.running})
        async with server.db.session() as session:

            async def read(version: str, since: datetime, until: datetime,
                           devices: list[str]) -> DeviceAggregates:  # fmt: skip
                return await store.device_aggregates(session, NAME, version, since, until, devices)

            treatment = await read(spec.version, started, now, sorted(self.reached))
            control: dict[str, DeviceAggregates] = {}
            baseline: dict[str, DeviceAggregates] = {}
            control_set = set(control_ids)
            for version in sorted(set(ran.values())):
                members = sorted(d for d, v in ran.items() if v == version)
                baseline[version] = await read(version, started - BASELINE, started, members)
                control[version] = await read(
                    version, started, now, [d for d in members if d in control_set]
                )
        calibration = {v: m.manifest.baseline.calibration for v, m in calibrations.items()}
        devices: list[DeviceAggregate] = []
        for device_id in sorted(self.reached):
            before = ran.get(device_id, "")
            devices.append(
                self._aggregate(device_id, "treatment", (spec.version, treatment),
                                (before, baseline.get(before)), calibration)
            )  # fmt: skip
        for device_id in control_ids:
            was = ran.get(device_id)
            if was is None:
                continue
            devices.append(
                self._aggregate(device_id, "control", (was, control[was]),
                                (was, baseline[was]), calibration)
            )  # fmt: skip
        devices = [d for d in devices if d.windows > 0]
        records = [self._install(server, d, r) for d, r in sorted(self.reached.items())]
        installs = install_tally(records, now, INSTALL_TIMEOUT)
        specs = gate_specs(spec.gates)
        others = [s.name for s in specs if s.name not in SHADOW_GATES]
        evaluations = evaluate_all(specs, gather(devices, installs), only=others)
        installed = {r.device_id for r in records if r.result == "committed"}
        reporting = [d for d in devices if d.arm == "control" or d.device_id in installed]
        alive = [
            d for d in control_ids
            if d in ran and (server.seen(d) or started - timedelta(1)) >= started
        ]  # fmt: skip
        return list(evaluations), _srm(reporting, len(installed), len(alive))

    def _aggregate(
        self,
        device_id: str,
        arm: str,
        sums: tuple[str, DeviceAggregates],
        pre: tuple[str, DeviceAggregates | None],
        calibration: dict[str, Calibration | None],
    ) -> DeviceAggregate:
        """The service's ``_aggregate`` of the device, made again only when its rows changed.

        Windows are only ever added to the hourly rows, and the ranges read only
        grow (``until`` is the tick's time) or stay (the baseline), so a device
        whose window counts in both reads are as at an earlier tick has the
        same sums as then, and the same aggregate: most devices, at a tick
        shorter than their windows.
        """
        (version, now), (before, then) = sums, pre
        then_classes = then.classes if then is not None else None
        key = (version, now.classes, _counts(now, device_id),
               before, then_classes, _counts(then, device_id))  # fmt: skip
        last = self._made.get((device_id, arm))
        if last is not None and last[0] == key:
            return last[1]
        made = _aggregate(device_id, arm, now, then, calibration.get(version),
                          calibration.get(before))  # fmt: skip
        self._made[device_id, arm] = (key, made)
        return made

    def _install(self, server: VirtualServer, device_id: str, r: Reached) -> InstallRecord:
        """The device's install as its latest outcome event since it was assigned tells it."""
        seen = server.seen(device_id)
        seen = seen if seen is not None and seen >= r.assigned_at else None
        outcome = server.outcomes.get(device_id)
        label = f"{NAME} {self.spec.version}"
        if outcome is not None and outcome[2] >= r.assigned_at:
            event, bundle, _ = outcome
            if event == "fleet-rolled-back" or bundle in (None, label):
                result = _OUTCOMES.get(event)
                if result is not None:
                    return InstallRecord(device_id, r.assigned_at, result, seen)  # type: ignore[arg-type]
        return InstallRecord(device_id, r.assigned_at, None, seen)


def _counts(sums: DeviceAggregates | None, device_id: str) -> tuple[int, int] | None:
    """The device's windows and requests in ``sums`` (``None``: it has no rows there)."""
    i = sums.index().get(device_id) if sums is not None else None
    if i is None or sums is None:
        return None
    return int(sums.windows[i]), int(sums.requests[i])


def _no_sync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()
