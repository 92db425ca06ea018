"""The alert webhook: signed POSTs to a real HTTP receiver, retried with backoff on failures."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from fleet_server.cli import build_parser, config_from_args
from fleet_server.drift.webhook import Notification, WebhookNotifier
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from protocol.bundle import read_manifest
from testbed.api_server import ServerThread, repository_files
from testbed.server_process import ServerProcess, private_broker, wait_until
from tests.support.drift_fleet import HOUR, MODELS, DriftFleet, V, drift_fleet

pytestmark = pytest.mark.integration

SECRET = "a-shared-secret-of-the-receiver"


@dataclass
class Received:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An aiohttp server in a thread of its own that records every POST.

    It answers ``statuses`` in turn (then 200), so a test decides which attempts fail.
    """

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner, self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(
            30
        )
        self.url = f"http://127.0.0.1:{self.port}/hooks/edgefleet"

    async def _hook(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append(Received(status, dict(request.headers), await request.read()))
        return web.Response(status=status, text="ok" if status == 200 else "try again")

    async def _start(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/hooks/edgefleet", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, int(runner.addresses[0][1])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def verified(r: Received) -> bool:
    """What a receiver does: HMAC-SHA256 of the raw body under the shared secret."""
    expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, r.headers["X-Edgefleet-Signature"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module", params=["sqlite"])
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
    receiver: Receiver,
) -> Iterator[DriftFleet]:
    settings = {
        "alert_webhook_url": receiver.url,
        "alert_webhook_secret": SECRET,
        "alert_webhook_backoff_s": 0.01,
    }
    fleets = drift_fleet(request, tmp_path_factory, session_keys, bundles, **settings)
    fleet = next(fleets)
    notifier = fleet.api.server.notifier
    assert notifier is not None
    stop, task = fleet.api.call(_start(notifier))
    try:
        yield fleet
    finally:
        fleet.api.call(_finish(stop, task))
        fleets.close()


async def _start(notifier: WebhookNotifier) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """The server's notifier task, as :meth:`FleetServer.run` starts it."""
    stop = asyncio.Event()
    return stop, asyncio.create_task(notifier.run(stop))


async def _finish(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await task


def test_opened_and_closed_alerts_are_posted_signed_and_retried_until_delivered(
    fleet: DriftFleet, receiver: Receiver
) -> None:
    t0 = datetime(2033, 1, 1, 12, tzinfo=UTC)
    fleet.register("hook-1")
    data = fleet.in_distribution(1000, seed=201)
    data[:, 0] += 2.0 * fleet.rows[:, 0].std()
    fleet.upload("hook-1", data, t0)
    receiver.statuses[:] = [500, 500]  # the first two attempts fail
    server = fleet.api.server
    evaluation = fleet.run_pass(t0, server.notify_alert)
    opened = [row for change, row in evaluation.changes if change == "opened"]
    assert {(r.scope, r.kind) for r in opened} >= {("device", "drift"), ("fleet", "drift")}
    wait_until("every opened alert delivered", lambda: len(receiver.received) >= len(opened) + 2)

    first, second, third, *rest = receiver.received
    assert [first.status, second.status, third.status] == [500, 500, 200]
    assert all(r.status == 200 for r in rest)
    assert all(verified(r) for r in receiver.received)
    # The failed notification was tried again: the same delivery, attempts 1, 2, 3.
    delivery = first.headers["X-Edgefleet-Delivery"]
    assert [r.headers["X-Edgefleet-Delivery"] for r in (first, second, third)] == [delivery] * 3
    assert [r.payload["attempt"] for r in (first, second, third)] == [1, 2, 3]
    for r in receiver.received:
        assert r.headers["X-Edgefleet-Timestamp"] == str(r.payload["sent_at"])
        assert r.headers["X-Edgefleet-Event"] == r.payload["event"] == "alert.opened"
    delivered = {r.payload["alert"]["id"]: r.payload["alert"] for r in receiver.received}
    assert sorted(delivered) == sorted(r.id for r in opened)
    (device,) = [row for row in opened if row.scope == "device"]
    assert delivered[device.id]["scope_value"] == "hook-1"
    assert [f["name"] for f in delivered[device.id]["features"]] == ["shaft_rpm"]
    # A body altered on the way no longer matches its signature.
    assert not verified(Received(200, third.headers, third.body.replace(b"hook-1", b"hook-2")))
    metrics = fleet.api.request("GET", "/metrics").data.decode()
    assert f'edgefleet_alert_notifications_total{{result="delivered"}} {len(opened)}.0' in metrics

    # The device's alert is acknowledged: its closing is not posted; the others' are, in order.
    status, _ = fleet.send("POST", f"/alerts/{device.id}/ack", {"comment": "seen"})
    assert status == 200
    before = len(receiver.received)
    t1 = t0 + 2 * HOUR
    fleet.upload("hook-1", fleet.in_distribution(1000, seed=202), t1)
    evaluation = fleet.run_pass(t1, server.notify_alert)
    closed = [row.id for change, row in evaluation.changes if change == "closed"]
    assert device.id in closed
    wait_until("the closings posted", lambda: len(receiver.received) >= before + len(closed) - 1)
    posted = receiver.received[before:]
    assert all(r.payload["event"] == "alert.closed" and verified(r) for r in posted)
    # Notifications go out in order from one queue: a posted closing of the device's alert
    # would have come first.
    assert sorted(r.payload["alert"]["id"] for r in posted) == sorted(
        i for i in closed if i != device.id
    )


def test_delivery_backs_off_exponentially_and_gives_up_after_its_attempts(
    receiver: Receiver,
) -> None:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:  # the clock is the only fake
        delays.append(seconds)

    async def deliver(notifier: WebhookNotifier) -> bool:
        async with aiohttp.ClientSession() as http:
            return await notifier.deliver(http, Notification("alert.opened", {"id": 1}))

    notifier = WebhookNotifier(
        receiver.url, SECRET.encode(), attempts=4, backoff_s=0.5, sleep=sleep
    )
    before = len(receiver.received)
    receiver.statuses[:] = [503] * 10
    assert not asyncio.run(deliver(notifier))
    assert delays == [0.5, 1.0, 2.0]
    assert len(receiver.received) - before == 4

    # A refusal that is not the receiver's passing trouble (400) is not tried again.
    delays.clear()
    receiver.statuses[:] = [400]
    assert not asyncio.run(deliver(notifier))
    assert delays == [] and len(receiver.received) - before == 5
    receiver.statuses.clear()

    # Nothing listening: tried again too.
    dead = WebhookNotifier(
        "http://127.0.0.1:9/nothing-listens", SECRET.encode(), attempts=2, sleep=sleep
    )
    assert not asyncio.run(deliver(dead))
    assert delays == [1.0]


def test_the_webhook_flags_need_a_readable_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    args = build_parser().parse_args(
        [
            "--data",
            str(tmp_path),
            "--alert-webhook",
            "https://hooks.example/a",
            "--alert-webhook-secret-file",
            str(secret),
        ]
    )
    config = config_from_args(args)
    assert config.alert_webhook_url == "https://hooks.example/a"
    assert config.alert_webhook_secret is not None
    assert config.alert_webhook_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)

    empty = tmp_path / "empty"
    empty.write_text("\n")
    for extra, env, named in (
        (
            ["--alert-webhook", "https://hooks.example/a"],
            {},
            "--alert-webhook-secret-file: required",
        ),
        (
            ["--alert-webhook-secret-file", str(tmp_path / "missing")],
            {"EDGEFLEET_ALERT_WEBHOOK": "https://hooks.example/a"},
            "--alert-webhook-secret-file: cannot read",
        ),
        (
            [
                "--alert-webhook",
                "https://hooks.example/a",
                "--alert-webhook-secret-file",
                str(empty),
            ],
            {},
            "is empty",
        ),
        (
            [
                "--alert-webhook",
                "ftp://hooks.example/a",
                "--alert-webhook-secret-file",
                str(secret),
            ],
            {},
            "--alert-webhook:",
        ),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "fleet_server.cli", "--data", str(tmp_path / "data"), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        assert result.returncode != 0, (extra, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("fleet-server: ") and named in line, (extra, line)


def test_a_fleet_server_process_posts_the_alerts_it_opens(
    tmp_path: Path, session_keys: KeyStore, bundles: dict[str, Path], receiver: Receiver
) -> None:
    replica = "hooked-server"
    data = tmp_path / replica
    data.mkdir()
    # Windows that drift, stored before the server starts: its first alert pass finds them.
    api = ServerThread(data, f"sqlite:///{data.resolve() / 'fleet.db'}")
    try:
        repo = ImageRepository(tmp_path / "repo")
        repo.create(session_keys)
        repo.add_bundle(bundles["v1"], session_keys)
        files = repository_files(repo.path)
        r = api.request("POST", f"{V}/releases", token=api.admin_token, json={"files": files})
        assert r.status == 201, r.data
        with bundles["v1"].open("rb") as source:
            manifest = read_manifest(source)
        rows = np.load(MODELS / "baseline.npy").astype(np.float64)
        fleet = DriftFleet(api, api.admin_token, manifest, rows)
        fleet.register("process-hook-1")
        drifting = fleet.in_distribution(1000, seed=211)
        drifting[:, 0] += 2.0 * rows[:, 0].std()
        now = datetime.now(UTC).replace(microsecond=0)
        fleet.upload("process-hook-1", drifting, now - timedelta(minutes=1))
    finally:
        api.close()

    secret = tmp_path / "webhook-secret"
    secret.write_text(SECRET + "\n")
    before = len(receiver.received)
    with private_broker(tmp_path / "broker") as broker:
        server = ServerProcess(
            tmp_path,
            db_url=None,
            broker=broker.url,
            replica_id=replica,
            extra_args=[
                "--alert-webhook",
                receiver.url,
                "--alert-webhook-secret-file",
                str(secret),
            ],
        )
        try:
            server.start()

            def device_alert_posted() -> list[Received]:
                return [
                    r
                    for r in receiver.received[before:]
                    if r.payload["alert"]["scope_value"] == "process-hook-1"
                ]

            (posted,) = wait_until("the device's alert posted", device_alert_posted)
        finally:
            server.stop()
    assert verified(posted) and posted.status == 200
    assert posted.payload["event"] == "alert.opened"
    assert [f["name"] for f in posted.payload["alert"]["features"]] == ["shaft_rpm"]
    assert "drift alert" in server.log() and "opened: device:process-hook-1" in server.log()
