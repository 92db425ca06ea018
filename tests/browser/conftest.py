"""A real ``fleet-server`` process with a populated fleet, and headless Debian chromium.

The fleet is written first through an in-process server (releases, devices, their
reported states and events through the server's own ingest, windows, labels for some,
an open drift alert, a rollout ticked into its first wave with gate evaluations), then
served by a ``fleet-server`` process on the same data folder, as an operator would run
it. The
browser is Debian's ``/usr/bin/chromium`` driven by Playwright; a missing browser
fails these tests (it is installed by ``.ci/run``), never skips them.

Screenshots of every page are written to ``$EDGEFLEET_SCREENSHOTS`` (by default
``edgefleet-dashboard-screenshots-HASH`` in the system's temporary folder, a folder per
checkout, so two checkouts tested at once on one machine keep apart), emptied at the
start of each run; the run's summary prints where.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from fleet_server.mqtt.ingest import Accepted, classify, write_batch
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from fleet_server.rollouts import service as rollout_service
from protocol.bundle import read_manifest
from protocol.histogram import ExponentialHistogram, record
from protocol.hybrid import CONFIDENCE_BINS, HybridSummary
from protocol.messages import BundleRef, DeviceEvent, InstallOutcome, ReportedState
from protocol.summary import score_histogram
from protocol.topics import windows_topic
from protocol.versioning import default_release_counter
from protocol.window import WindowSummary, encode_window
from testbed.api_server import ServerThread, repository_files
from testbed.images import HARDWARE
from testbed.server_process import ServerProcess
from tests.support.drift_fleet import MODELS, DriftFleet, V

CHROMIUM = os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium")
SHARED_BROKER = "mqtt://127.0.0.1:1883"  # isolated by the server's own namespace
MODEL = "pump-health"
C1 = default_release_counter("1.0.0")
C2 = default_release_counter("2.0.0")
CLASSES = ["normal", "imbalance", "bearing_wear", "overheating"]
WAVE_TAG = "line-a"
DRIFT_TAG = "line-b"
HYBRID_DEVICE = "pump-11"
STOPPED_TAG = "line-c"
_CHECKOUT = hashlib.sha256(str(Path(__file__).resolve().parents[2]).encode()).hexdigest()[:8]
# Where each run leaves its screenshots of every page (the run's summary names it).
SCREENSHOTS = Path(
    os.environ.get("EDGEFLEET_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / f"edgefleet-dashboard-screenshots-{_CHECKOUT}"
)
STARTED = time.time()


@dataclass
class Served:
    """The running server, its tokens, and what the fleet was populated with."""

    server: ServerProcess
    admin: str
    operator: str
    viewer: str
    rollout_id: str
    stopped_id: str
    refusing_device: str
    drifting_device: str
    screenshots: Path

    def api(self, path: str, token: str | None = None) -> Any:
        return self.server.api("GET", path, token or self.admin)


def _state(device_id: str, version: str, counter: int, **more: Any) -> Accepted:
    ref = BundleRef(name=MODEL, version=version, release_counter=counter)
    outcome = more.pop("outcome", None)
    state = ReportedState(
        device_id=device_id,
        message_id=uuid.uuid4().hex,
        sent_at=time.time(),
        agent_version="0.1.0",
        hardware_id=HARDWARE,
        active=ref,
        previous=BundleRef(name=MODEL, version="1.0.0", release_counter=C1)
        if version != "1.0.0"
        else None,
        installed_counter=counter,
        last_outcome=InstallOutcome(result=outcome, bundle=ref, at=time.time())
        if outcome
        else None,
        **{"phase": "idle", **more},
    )
    return Accepted(device_id, "state", state)


def _event(device_id: str, event: str, **details: Any) -> Accepted:
    return Accepted(
        device_id,
        "events",
        DeviceEvent(
            device_id=device_id,
            message_id=uuid.uuid4().hex,
            sent_at=time.time(),
            event=event,
            at=time.time(),
            details=details,
        ),
    )


def _window(
    device_id: str,
    version: str,
    end: float,
    seed: int,
    requests: int = 60,
    hybrid: HybridSummary | None = None,
) -> Accepted:
    rng = np.random.default_rng(seed)
    w = WindowSummary(
        window_id=uuid.uuid4().hex,
        device_id=device_id,
        model_name=MODEL,
        model_version=version,
        baseline_id="b1",
        start=end - 60,
        end=end,
        requests=requests,
        errors=0,
        served={"active": requests - 2, "previous": 2},
        features=[],
        scores=score_histogram(rng.dirichlet([1.0] * len(CLASSES), size=requests), CLASSES),
        latency_ms=record(ExponentialHistogram(), rng.lognormal(3.5, 0.3, size=requests)),
        hybrid=hybrid,
    )
    verdict = classify(windows_topic("dash", device_id), encode_window(w), 65536, namespace="dash")
    assert isinstance(verdict, Accepted), verdict
    return verdict


def _populate(api: ServerThread, keys: KeyStore, bundles: dict[str, Path], tmp: Path) -> Any:
    """Releases, devices, reports, events, windows (some labelled), an alert and a ticked
    rollout."""
    admin = api.admin_token
    repo = ImageRepository(tmp / "repo")
    repo.create(keys)
    for name in ("v1", "v2"):
        repo.add_bundle(bundles[name], keys)
    r = api.request(
        "POST", f"{V}/releases", token=admin, json={"files": repository_files(repo.path)}
    )
    assert r.status == 201, r.data
    with bundles["v1"].open("rb") as source:
        manifest = read_manifest(source)
    fleet = DriftFleet(api, admin, manifest, np.load(MODELS / "baseline.npy").astype(np.float64))

    wave = [f"pump-{n:02d}" for n in range(12)]
    others = ["press-01", "press-02", "press-03"]
    for device_id in wave:
        fleet.register(device_id, WAVE_TAG, region="north")
    for device_id in others:
        fleet.register(device_id, DRIFT_TAG, region="south")

    def write(batch: list[Accepted]) -> None:
        assert not api.call(write_batch(api.server.db, batch, "test")).dropped

    write([_state(d, "1.0.0", C1) for d in wave + others])
    write([_window(d, "1.0.0", time.time() - 3600, i) for i, d in enumerate(wave)])
    # press-02 refused a bundle, press-03 rolled one back, press-01 is mid-download.
    write(
        [
            _state("press-02", "1.0.0", C1, outcome="refused"),
            _state("press-03", "1.0.0", C1, outcome="rolled_back"),
            _state("press-01", "1.0.0", C1, phase="downloading"),
            _event("press-02", "refused", reason="signature-invalid", bundle="pump-health 2.0.0"),
            _event("press-03", "rolled_back", reason="self-test-failed"),
        ]
    )
    # Drift in press-01's windows opens an alert.
    now = datetime.now(UTC).replace(microsecond=0)
    # The windows carry the model's scores, so CBPE estimates their accuracy.
    scores = np.random.default_rng(4).dirichlet([0.5] * len(CLASSES), size=1000)
    end = now - timedelta(minutes=1)
    drifted = fleet.upload("press-01", fleet.shifted(1000, seed=5), end, scores=scores)
    fleet.upload("press-02", fleet.in_distribution(1000, seed=6), end, scores=scores)
    # Labels arrive for press-01's windows: a little less right each minute.
    fleet.label({window_id: (160 - 10 * k, 40 + 10 * k) for k, window_id in enumerate(drifted)})
    fleet.run_pass(now)

    server = api.server

    def tick(at: datetime) -> None:
        api.call(
            rollout_service.tick(
                server.db, server.assignments, at, server.manifests, server.kept_aggregates
            )
        )

    def create(tag: str, **more: str) -> str:
        spec = {"release": f"{MODEL}@2.0.0", "select": f"tag={tag}", "waves": "25%,100%"}
        status, created = fleet.send("POST", "/rollouts", {**spec, "bake": "30m", **more})
        assert status == 201, created
        return str(created["id"])

    # A rollout stopped by its gates: its first wave installs, then goes silent past the
    # install timeout; harm is shown and the wave is rolled back. Its ticks run first (the
    # other rollout's, at earlier times, are replays to it).
    mills = [f"mill-{n:02d}" for n in range(24)]
    for device_id in mills:
        fleet.register(device_id, STOPPED_TAG, region="east")
    write([_state(d, "1.0.0", C1) for d in mills])
    write([_window(d, "1.0.0", time.time() - 3600, 500 + i) for i, d in enumerate(mills)])
    stopped_id = create(STOPPED_TAG, on_failure="rollback")
    start = datetime.now(UTC)
    tick(start)
    stopped_wave = [
        d for d in mills if fleet.get(f"/devices/{d}")[1]["assigned_target"] is not None
    ]
    write([_state(d, "2.0.0", C2, outcome="committed") for d in stopped_wave])
    write([_window(d, "2.0.0", time.time(), 600 + i) for i, d in enumerate(stopped_wave)])
    tick(start + timedelta(hours=2))
    stopped = fleet.get(f"/rollouts/{stopped_id}")[1]
    assert stopped["phase"] in ("rolling_back", "rolled_back"), json.dumps(
        [stopped["spec"], stopped["decisions"][-1]]
    )

    rollout_id = create(WAVE_TAG)
    start = datetime.now(UTC)
    tick(start)
    shown = fleet.get(f"/rollouts/{rollout_id}")[1]
    reached = [d for d in wave if fleet.get(f"/devices/{d}")[1]["assigned_target"] is not None]
    assert shown["phase"] == "baking" and reached, shown
    write([_state(d, "2.0.0", C2, outcome="committed") for d in reached])
    for minute in (3, 6, 9, 12):
        end = time.time()
        write([_window(d, "2.0.0", end, minute * 100 + i) for i, d in enumerate(reached)])
        write(
            [
                _window(d, "1.0.0", end, minute * 100 + 50 + i)
                for i, d in enumerate(wave)
                if d not in reached
            ]
        )
        tick(start + timedelta(minutes=minute))

    # The cloud's capacity set: the planner plans every device; one follows its plan and
    # reports what it offloaded.
    status, _ = fleet.send("PUT", "/cloud/capacity", {"capacity": 6, "headroom": 0.5})
    assert status == 200
    api.call(server.plans.step(server.db, datetime.now(UTC)))
    plan = fleet.get(f"/plans/{HYBRID_DEVICE}")[1]
    # Offloading what the plan expects, so the server has no reason to plan it again.
    escalated = round(plan["expected_offload"] * 120)
    confidence = [0] * CONFIDENCE_BINS
    confidence[5], confidence[45] = escalated, 120 - escalated
    summary = HybridSummary(
        plan_id=plan["plan_id"],
        mode=plan["mode"],
        local=120 - escalated,
        escalated=escalated,
        cloud_answered=escalated,
        cloud_latency_ms=record(ExponentialHistogram(), np.full(max(escalated, 1), 50.0)),
        confidence=confidence,
    )
    write([_window(HYBRID_DEVICE, "1.0.0", time.time(), 7, requests=120, hybrid=summary)])
    return fleet, rollout_id, stopped_id


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, session_keys: KeyStore, bundles: dict[str, Path]
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("dashboard")
    replica = "dashboard-server"
    data = tmp / replica
    data.mkdir()
    api = ServerThread(data, f"sqlite:///{data.resolve() / 'fleet.db'}")
    try:
        fleet, rollout_id, stopped_id = _populate(api, session_keys, bundles, tmp)
        tokens = {role: fleet.token(f"dash-{role}", role) for role in ("operator", "viewer")}
        admin = api.admin_token
    finally:
        api.close()
    server = ServerProcess(tmp, db_url=None, broker=SHARED_BROKER, replica_id=replica)
    screenshots = SCREENSHOTS
    screenshots.mkdir(parents=True, exist_ok=True)
    for old in screenshots.glob("*.png"):
        old.unlink(missing_ok=True)
    server.start()
    try:
        yield Served(
            server=server,
            admin=admin,
            operator=tokens["operator"],
            viewer=tokens["viewer"],
            rollout_id=rollout_id,
            stopped_id=stopped_id,
            refusing_device="press-02",
            drifting_device="press-01",
            screenshots=screenshots,
        )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Browser]:
    # After ``served``: Playwright's sync API keeps an event loop running in this thread,
    # and the fleet's set-up runs asyncio.run.
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), "
            "as .ci/run does; the dashboard's browser tests need it"
        )
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """A logged-in page and the console errors it has seen."""

    page: Page
    context: BrowserContext
    errors: list[str]


def log_in(browser: Browser, served: Served, token: str, **context: Any) -> Tab:
    """A new browser context logged in to the dashboard with ``token``."""
    ctx = browser.new_context(viewport={"width": 1366, "height": 768}, **context)
    ctx.set_default_timeout(15_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "response",
        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    page.goto(f"{served.server.url}/dashboard")
    assert page.url.startswith(f"{served.server.url}/dashboard/login"), page.url
    page.get_by_label("Token (ID.SECRET)").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{served.server.url}/dashboard")
    return Tab(page, ctx, errors)


def screenshot(served: Served, page: Page, name: str) -> None:
    path = served.screenshots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Read from the folder: under pytest-xdist the screenshots are taken by a worker.
    taken = [p for p in SCREENSHOTS.glob("*.png") if p.stat().st_mtime >= STARTED]
    if taken:
        terminalreporter.write_line(f"dashboard screenshots ({len(taken)}): {SCREENSHOTS}")


__all__ = ["Served", "Tab", "json", "log_in", "screenshot"]
