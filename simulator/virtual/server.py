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

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
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
BATCH = 2000
"""Messages a write takes, at most: what the ingest takes from the broker at once."""
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

    def __init__(self, url: str, *, ingest_process: bool = False) -> None:
        self.db = _scratch(url)
        self._ingest: Ingest = IngestProcess(url) if ingest_process else Ingest(self.db)
        self._heard: list[WindowSummary | DeviceEvent] = []
        self.produced: set[str] = set()
        self.resent = 0
        self.running: dict[str, str] = {}  # the version each device last said it runs
        self.outcomes: dict[str, tuple[str, str | None, datetime]] = {}
        self.last_seen: dict[str, datetime] = {}
        self.facts: list[DeviceFacts] = []
        self.heard_at: datetime | None = None
        self.silent: dict[str, datetime] = {}  # devices whose link is down, since when

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
        self._ingest.window(summary.device_id, payload)
        self.produced.add(summary.window_id)
        self._heard.append(summary)

    def send_event(self, event: DeviceEvent) -> None:
        self._ingest.event(event)
        self._heard.append(event)

    async def flush(self) -> None:
        """Store what devices sent since the last flush, in batches as the ingest takes them."""
        await self._ingest.flush()
        heard, self._heard = self._heard, []
        for message in heard:
            self._seen(message)

    def heartbeats(self, at: datetime) -> None:
        """Every device has said it is alive by ``at``.

        A device heartbeats every minute or so: the heartbeats between two ticks are
        taken as heard at the tick rather than ingested one by one (10,000 devices would
        send 600,000 an hour), except from a device whose link is down
        (:attr:`silent`), last heard when it went down.
        """
        self.heard_at = at

    def seen(self, device_id: str) -> datetime | None:
        """The device's latest report of any kind."""
        seen = self.last_seen.get(device_id)
        heard = self.heard_at
        down = self.silent.get(device_id)
        if down is not None and heard is not None:
            heard = min(heard, down)
        if seen is None or (heard is not None and heard > seen):
            return heard
        return seen

    def _seen(self, message: WindowSummary | DeviceEvent) -> None:
        if isinstance(message, WindowSummary):
            self.last_seen[message.device_id] = datetime.fromtimestamp(message.end, UTC)
        else:
            at = datetime.fromtimestamp(message.at, UTC)
            bundle = message.details.get("bundle")
            label = bundle if isinstance(bundle, str) else None
            self.outcomes[message.device_id] = (message.event, label, at)
            if message.event in ("committed", "fleet-rolled-back") and label is not None:
                self.running[message.device_id] = label.rpartition(" ")[2]

    async def stored_windows(self) -> tuple[int, int]:
        """Rows in the windows table, and distinct window ids among them."""
        async with self.db.session() as session:
            rows = await session.scalar(select(func.count()).select_from(WindowRow))
            ids = await session.scalar(select(func.count(func.distinct(WindowRow.window_id))))
        return int(rows or 0), int(ids or 0)

    async def close(self) -> None:
        self._ingest.close()
        await self.db.close()


class Ingest:
    """The server's ingest of what devices send: :func:`classify` as each message arrives,
    :func:`write_batch` in batches of :data:`BATCH` at a flush."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[Accepted] = []

    def window(self, device_id: str, payload: bytes) -> None:
        self._pending.append(_classified(device_id, payload))

    def event(self, event: DeviceEvent) -> None:
        self._pending.append(Accepted(event.device_id, "events", event))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), BATCH):
            await _write(self.db, pending[start : start + BATCH])

    def close(self) -> None:
        return None


class IngestProcess(Ingest):
    """The same ingest in a process of its own, beside the devices: the server's side of the
    run takes the second core. The messages reach it in the order sent and are classified
    and written in the same batches as by :class:`Ingest`, so the database ends the same.
    A refusal is raised at the next flush."""

    def __init__(self, url: str) -> None:
        # A fresh interpreter (not multiprocessing's spawn, which runs the caller's main
        # module again), joined by a socket pair and importing this very package.
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        code = "import sys; sys.path.insert(0, sys.argv[1]); " \
            "from simulator.virtual.server import ingest_main; ingest_main()"  # fmt: skip
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, root, str(theirs.fileno()), url],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._outbox: list[tuple[str, bytes] | DeviceEvent] = []

    def window(self, device_id: str, payload: bytes) -> None:
        self._outbox.append((device_id, payload))
        if len(self._outbox) >= 256:
            self._send()

    def event(self, event: DeviceEvent) -> None:
        self._outbox.append(event)

    def _send(self) -> None:
        outbox, self._outbox = self._outbox, []
        try:
            self._conn.send(outbox)
        except OSError as exc:
            raise IngestRefused(f"the ingest process is gone: {exc}") from None

    async def flush(self) -> None:
        self._send()
        self._conn.send(None)
        try:
            problem = self._conn.recv()
        except EOFError:
            raise IngestRefused("the ingest process ended before the flush") from None
        if problem is not None:
            raise IngestRefused(problem)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()


def ingest_main() -> None:
    """The ingest process of :class:`IngestProcess`: ``ROOT FD URL`` in its arguments."""
    asyncio.run(_ingest_loop(sys.argv[3], Connection(int(sys.argv[2]))))


async def _ingest_loop(url: str, conn: Connection) -> None:
    db = _scratch(url)
    ingest = Ingest(db)
    problem: str | None = None
    try:
        while (message := conn.recv()) != "stop":
            if message is None:
                if problem is None:
                    try:
                        await ingest.flush()
                    except IngestRefused as exc:
                        problem = str(exc)
                conn.send(problem)
                problem = None
                continue
            for item in message:
                if problem is not None:
                    continue
                try:
                    if isinstance(item, DeviceEvent):
                        ingest.event(item)
                    else:
                        ingest.window(*item)
                    if len(ingest._pending) >= BATCH:
                        await ingest.flush()
                except IngestRefused as exc:
                    problem = str(exc)
                    ingest._pending = []
    except EOFError:
        pass  # the run is gone
    finally:
        await db.close()


def _classified(device_id: str, payload: bytes) -> Accepted:
    verdict = classify(
        windows_topic(NAMESPACE, device_id), payload, MAX_WINDOW_BYTES, namespace=NAMESPACE
    )
    if not isinstance(verdict, Accepted):
        raise IngestRefused(f"window of {device_id} refused: {verdict}")
    return verdict


async def _write(db: Database, batch: list[Accepted]) -> None:
    result = await write_batch(db, batch, "virtual")
    if result.dropped:
        raise IngestRefused(f"ingest dropped {result.dropped}")


def _scratch(url: str) -> Database:
    """The run's own scratch database: a crash loses the run anyway, so no fsync at all."""
    db = Database(url)
    event.listen(db.engine.sync_engine, "connect", _no_sync)
    return db


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
