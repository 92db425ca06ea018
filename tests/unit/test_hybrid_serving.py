"""The agent follows a hybrid plan: real models, the real runtime, real HTTP cloud endpoints.

The device serves ``v2.tflite``; the cloud endpoint runs ``cloud.tflite``, either in a tiny
Open Inference Protocol server whose faults are switched by the test (429 with Retry-After,
500, slow, garbage, held) or in the agent's own local API (a real answer path). The clocks
(monotonic and wall) are fakes; nothing asserts timing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from aiohttp import web

from agent.api.http import LocalApi
from agent.metrics import AgentMetrics
from agent.serving import (
    AuditResult,
    ChainConfig,
    CloudStage,
    FallbackChain,
    ModelSlot,
    TokenBucket,
)
from agent.serving.cloud import CloudRateLimited, rate_limited
from agent.serving.hybrid import confidence_bin, request_confidence
from agent.telemetry import WindowPolicy, WindowRecorder
from model_runtime import LoadedModel, default_runtime
from protocol.bundle import read_bundle
from protocol.hybrid import (
    CONFIDENCE_BINS,
    HybridPlan,
    PlanMode,
    calibrated_confidence,
)
from protocol.hybrid import confidence_bin as protocol_confidence_bin
from protocol.inference import InferenceRequest, decode_inputs, encode_response
from protocol.manifest import Manifest
from protocol.window import decode_window, encode_window
from testbed.images import MODELS, make_bundle
from tests.support.agent_toml import AGENT_HEAD

BASELINE = np.load(MODELS / "baseline.npy")
RUNTIME = default_runtime()
DEVICE = "pump-0042"
SECRET = "s3cret-of-pump-0042"
ISSUED = datetime(2026, 12, 7, 0, 0, tzinfo=UTC)


def load(model: str) -> LoadedModel:
    return RUNTIME.load(MODELS / f"{model}.tflite")


def read_manifest(path: Path) -> Manifest:
    with path.open("rb") as f:
        return read_bundle(f)[0]


@pytest.fixture(scope="module")
def v2(bundles: dict[str, Path]) -> ModelSlot:
    return ModelSlot(read_manifest(bundles["v2"]), load("v2"))


@pytest.fixture(scope="module")
def v3_bad(tmp_path_factory: pytest.TempPathFactory) -> ModelSlot:
    """A device model that answers NaN for an idle machine (shaft_rpm 0)."""
    bundle = make_bundle(tmp_path_factory.mktemp("v3"), "v3-bad", "3.0.0")
    return ModelSlot(read_manifest(bundle), load("v3-bad"))


@pytest.fixture(scope="module")
def rows() -> dict[str, npt.NDArray[np.float32]]:
    """Rows v2 is unsure about (top score < 0.6), fairly sure (0.85-0.95) and sure (> 0.97)."""
    top = load("v2").run({"features": BASELINE[:1000]})["scores"].max(axis=1)
    unsure, sure = np.flatnonzero(top < 0.6), np.flatnonzero(top > 0.97)
    fair = np.flatnonzero((top > 0.85) & (top < 0.95))
    assert unsure.size >= 4 and sure.size >= 20 and fair.size >= 1
    return {
        "unsure": BASELINE[unsure[:4]].astype(np.float32),
        "fair": BASELINE[fair[:1]].astype(np.float32),
        "sure": BASELINE[sure[:20]].astype(np.float32),
    }


def plan(mode: PlanMode = "escalate", **fields: Any) -> HybridPlan:
    values: dict[str, Any] = {
        "plan_id": "p-0123456789ab",
        "device_id": DEVICE,
        "mode": mode,
        "temperature": 1.0,
        "tau": 0.8,
        "quota_rate": 0.0,
        "quota_burst": 100,
        "audit_rate": 0.0,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(hours=1),
        **fields,
    }
    return HybridPlan.model_validate(values)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FaultyCloud:
    """An Open Inference Protocol endpoint running ``cloud.tflite``, with faults switched by mode.

    Modes: ``ok``; ``429`` (quota, ``Retry-After: 7`` and ``retry_after_s`` 5 in the body);
    ``429-header`` (only the header, 3 s); ``500``; ``slow`` (answers after ``delay_s``);
    ``garbage`` (HTML); ``held`` (answers once ``release`` is set).
    """

    def __init__(self) -> None:
        self.model = load("cloud")
        self.mode = "ok"
        self.delay_s = 1.0
        self.requests = 0
        self.authorizations: list[str | None] = []
        self.models: list[str] = []
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FaultyCloud:
        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.authorizations.append(request.headers.get("Authorization"))
        self.models.append(request.match_info["name"])
        if self.mode == "429":
            body = {"error": "over the quota", "retry_after_s": 5.0, "reason": "quota"}
            return web.json_response(body, status=429, headers={"Retry-After": "7"})
        if self.mode == "429-header":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "3"})
        if self.mode == "500":
            return web.json_response({"error": "the cloud model crashed"}, status=500)
        if self.mode == "garbage":
            return web.Response(body=b"<html>proxy error</html>", content_type="text/html")
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        if self.mode == "held":
            await self.release.wait()
        parsed = InferenceRequest.model_validate_json(await request.read())
        outputs = self.model.run(decode_inputs(parsed))
        answer = encode_response(
            outputs, model_name=request.match_info["name"], model_version="9.0.0", stage="active"
        ).model_dump_json()
        return web.Response(body=answer, content_type="application/json")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest_asyncio.fixture
async def cloud() -> AsyncIterator[FaultyCloud]:
    async with FaultyCloud() as server:
        yield server


class Device:
    """A chain as the daemon wires it: windows, metrics, fake clocks."""

    def __init__(self, slot: ModelSlot, url: str, *, timeout_s: float = 2.0, **config: Any):
        self.clock = Clock(1000.0)
        self.wall = Clock((ISSUED + timedelta(minutes=1)).timestamp())
        self.metrics = AgentMetrics()
        self.chain = FallbackChain(
            slot,
            cloud=CloudStage(url, timeout_s=timeout_s, username=DEVICE, password=SECRET),
            config=ChainConfig(**config),
            clock=self.clock,
            wall_clock=self.wall,
            counter=self.metrics.inference,
            hybrid_counter=self.metrics.hybrid,
            seed=7,
        )
        self.recorder = WindowRecorder(
            slot.manifest, DEVICE, WindowPolicy(max_overhead=None), clock=self.wall
        )
        self.audits: list[AuditResult] = []
        self.chain.on_answer(
            lambda inputs, answer, seconds: self.recorder.record(
                inputs,
                answer.outputs,
                answer.stage,
                seconds,
                model_version=answer.model_version,
                hybrid=answer.hybrid,
            )
        )
        self.chain.on_audit(self._audit)
        self.metrics.watch(chain=self.chain)

    def _audit(self, result: AuditResult) -> None:
        self.audits.append(result)
        self.recorder.record_audit(result)

    def windows(self) -> list[Any]:
        self.recorder.close_window()
        out = []
        while (w := self.recorder.poll()) is not None:
            out.append(decode_window(encode_window(w)))  # as the server reads them
        return out


# -- escalation, calibration, quota ------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_unsure_request_goes_to_the_cloud_and_a_sure_one_stays_local(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan(tau=0.8))
    unsure = await device.chain.infer({"features": rows["unsure"][:1]})
    assert (unsure.stage, unsure.model_version, unsure.escalated) == ("cloud", "9.0.0", True)
    expected = load("cloud").run({"features": rows["unsure"][:1]})["scores"]
    np.testing.assert_allclose(unsure.outputs["scores"], expected, rtol=1e-6)
    assert unsure.hybrid is not None and unsure.hybrid.route == "escalated"
    assert "is below tau 0.8; escalated" in (unsure.attempts[0].reason or "")
    sure = await device.chain.infer({"features": rows["sure"][:1]})
    assert (sure.stage, sure.escalated) == ("active", False)
    assert sure.hybrid is not None and sure.hybrid.route == "local"
    assert cloud.requests == 1
    # HTTP Basic with the device id and its credential; the model is the served one's name.
    token = base64.b64encode(f"{DEVICE}:{SECRET}".encode()).decode()
    assert cloud.authorizations == [f"Basic {token}"]
    assert cloud.models == [v2.manifest.name]


@pytest.mark.asyncio
async def test_a_batch_is_as_confident_as_its_least_confident_row(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan(tau=0.8, cloud_model="pump-health-large"))
    batch = np.concatenate([rows["sure"][:3], rows["unsure"][:1]])
    answer = await device.chain.infer({"features": batch})
    assert answer.stage == "cloud" and answer.outputs["scores"].shape == (4, 4)
    scores = load("v2").run({"features": batch})["scores"]
    assert answer.hybrid is not None
    assert answer.hybrid.confidence == pytest.approx(float(calibrated_confidence(scores, 1).min()))
    assert cloud.models == ["pump-health-large"]  # the plan names the cloud's model


@pytest.mark.asyncio
async def test_the_plan_temperature_calibrates_the_confidence_compared_with_tau(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    sure = rows["fair"]
    scores = load("v2").run({"features": sure})["scores"]
    t = next(t for t in (2.0, 3.0, 5.0, 10.0) if calibrated_confidence(scores, t)[0] < 0.8)
    hot = float(calibrated_confidence(scores, t)[0])
    assert hot < 0.8 < float(scores.max())  # T > 1 flattens a fairly sure answer below tau
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan(tau=0.8, temperature=1.0))
    assert (await device.chain.infer({"features": sure})).stage == "active"
    device.chain.set_hybrid_plan(plan(plan_id="p-hot", tau=0.8, temperature=t))
    answer = await device.chain.infer({"features": sure})
    assert answer.stage == "cloud"
    assert answer.hybrid is not None and answer.hybrid.confidence == pytest.approx(hot)


@pytest.mark.asyncio
async def test_past_the_quota_an_unsure_request_is_kept_local_until_a_token_comes(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan(quota_rate=0.5, quota_burst=2))
    unsure = {"features": rows["unsure"][:1]}
    routes = [(await device.chain.infer(unsure)).hybrid for _ in range(4)]
    assert [r.route for r in routes if r is not None] == [
        "escalated",
        "escalated",
        "kept_local_quota",
        "kept_local_quota",
    ]
    assert cloud.requests == 2
    kept = await device.chain.infer(unsure)
    assert kept.stage == "active"
    assert kept.attempts[-1].reason == "the plan's quota is spent"
    device.clock.now += 2.0  # 0.5 tokens a second: one more
    assert (await device.chain.infer(unsure)).stage == "cloud"
    assert (await device.chain.infer(unsure)).stage == "active"
    assert cloud.requests == 3
    # The same plan delivered again keeps its bucket; a new plan starts full.
    device.chain.set_hybrid_plan(plan(quota_rate=0.5, quota_burst=2))
    assert (await device.chain.infer(unsure)).stage == "active"
    device.chain.set_hybrid_plan(plan(plan_id="p-next", quota_rate=0.5, quota_burst=2))
    assert (await device.chain.infer(unsure)).stage == "cloud"


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.tokens(0.25) == pytest.approx(0.5)
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert bucket.tokens(100.0) == 3.0


@pytest.mark.asyncio
async def test_cloud_first_sends_every_request_while_the_quota_allows(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan("cloud_first", quota_burst=2))
    sure = {"features": rows["sure"][:1]}
    stages = [(await device.chain.infer(sure)).stage for _ in range(3)]
    assert stages == ["cloud", "cloud", "active"]
    (window,) = device.windows()
    assert window.hybrid is not None
    assert (window.hybrid.escalated, window.hybrid.kept_local_quota) == (2, 1)
    # The local answer was made first: agreement is known for both escalations.
    assert (window.hybrid.escalated_compared, window.hybrid.escalated_agreements) == (2, 2)


# -- no plan, an expired plan, a local plan ----------------------------------------------------


@pytest.mark.asyncio
async def test_an_expired_plan_serves_locally_and_sends_nothing(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan("cloud_first"))
    assert device.chain.hybrid_plan is not None
    device.wall.now = (ISSUED + timedelta(hours=1)).timestamp()  # expires_at
    answer = await device.chain.infer({"features": rows["unsure"][:1]})
    assert (answer.stage, answer.hybrid) == ("active", None)
    assert device.chain.hybrid_plan is None
    assert cloud.requests == 0
    assert b"edgefleet_agent_hybrid_plan_info{" not in device.metrics.exposition()
    (window,) = device.windows()
    assert (window.plan_id, window.hybrid) == (None, None)


@pytest.mark.asyncio
async def test_a_local_plan_sends_nothing_even_when_both_local_models_fail(
    v3_bad: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v3_bad, cloud.url)
    idle = rows["sure"][:1].copy()
    idle[0, 0] = 0.0  # shaft_rpm 0: v3-bad answers NaN
    without_plan = await device.chain.infer({"features": idle})
    assert without_plan.stage == "cloud"  # the fallback of the chain, as configured
    device.chain.set_hybrid_plan(plan("local"))
    answer = await device.chain.infer({"features": idle})
    assert answer.stage == "safe_default"
    assert answer.hybrid is not None and answer.hybrid.route == "local"
    assert cloud.requests == 1


@pytest.mark.asyncio
async def test_under_a_plan_a_failing_local_model_still_falls_back_to_the_cloud(
    v3_bad: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v3_bad, cloud.url)
    device.chain.set_hybrid_plan(plan(quota_burst=1))
    idle = rows["sure"][:1].copy()
    idle[0, 0] = 0.0
    first = await device.chain.infer({"features": idle})
    assert first.stage == "cloud"
    assert first.hybrid is not None and first.hybrid.route == "escalated"
    second = await device.chain.infer({"features": idle})  # the quota is spent
    assert second.stage == "safe_default"
    assert second.hybrid is not None and second.hybrid.route == "kept_local_quota"


# -- faults: every request answered, errors by kind, back-off ---------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("500", "server_error"),
        ("slow", "timeout"),
        ("garbage", "bad_answer"),
        ("closed", "unavailable"),
        ("429", "rate_limited"),
    ],
)
@pytest.mark.parametrize("plan_mode", ["escalate", "cloud_first"])
async def test_every_request_is_answered_locally_whatever_the_cloud_does(
    v2: ModelSlot,
    rows: dict[str, npt.NDArray[np.float32]],
    cloud: FaultyCloud,
    mode: str,
    kind: str,
    plan_mode: PlanMode,
) -> None:
    cloud.mode = mode
    url = closed_port_url() if mode == "closed" else cloud.url
    device = Device(v2, url, timeout_s=0.2, failure_threshold=3)
    device.chain.set_hybrid_plan(plan(plan_mode))
    local = load("v2")
    for x in rows["unsure"]:
        answer = await device.chain.infer({"features": x[None]})
        assert (answer.stage, answer.model_version) == ("active", "2.0.0")
        np.testing.assert_allclose(
            answer.outputs["scores"], local.run({"features": x[None]})["scores"]
        )
    (window,) = device.windows()
    hybrid = window.hybrid
    assert hybrid is not None and hybrid.requests == window.requests == 4
    # A 429 backs off at once; other faults open the breaker after three in a row.
    sent = 1 if mode == "429" else 3
    assert hybrid.cloud_errors == {kind: sent}
    assert (hybrid.escalated, hybrid.kept_local_quota, hybrid.cloud_answered) == (sent, 4 - sent, 0)
    text = device.metrics.exposition().decode()
    assert f'edgefleet_agent_hybrid_cloud_errors_total{{kind="{kind}"}} {sent}.0' in text
    assert f'edgefleet_agent_hybrid_requests_total{{route="kept_local_quota"}} {4 - sent}.0' in text


@pytest.mark.asyncio
async def test_a_429_is_honoured_for_as_long_as_it_says_then_requests_go_again(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan())
    unsure = {"features": rows["unsure"][:1]}
    cloud.mode = "429"
    refused = await device.chain.infer(unsure)
    assert refused.stage == "active"
    assert refused.hybrid is not None and refused.hybrid.cloud_error == "rate_limited"
    assert "HTTP 429 (quota): over the quota; retry after 5 s" in (
        refused.attempts[-1].reason or ""
    )
    assert device.chain.backing_off_s == pytest.approx(5.0)  # the body's retry_after_s
    cloud.mode = "ok"
    device.clock.now += 4.9
    waiting = await device.chain.infer(unsure)
    assert waiting.stage == "active"
    assert waiting.hybrid is not None and waiting.hybrid.route == "kept_local_quota"
    assert "backing off" in (waiting.attempts[-1].reason or "")
    assert cloud.requests == 1
    device.clock.now += 0.1
    assert (await device.chain.infer(unsure)).stage == "cloud"
    # Without retry_after_s in the body, the Retry-After header says how long.
    cloud.mode = "429-header"
    await device.chain.infer(unsure)
    assert device.chain.backing_off_s == pytest.approx(3.0)
    assert cloud.requests == 3
    # The same plan again keeps the back-off; a new plan (a new quota, granted after the
    # 429) ends it, and the next unsure request goes to the cloud at once.
    device.chain.set_hybrid_plan(plan())
    assert device.chain.backing_off_s == pytest.approx(3.0)
    cloud.mode = "ok"
    device.chain.set_hybrid_plan(plan(plan_id="p-0123456789ac"))
    assert device.chain.backing_off_s == 0.0
    assert (await device.chain.infer(unsure)).stage == "cloud"
    assert cloud.requests == 4


def test_a_429_is_parsed_into_its_wait_and_reason() -> None:
    body = json.dumps({"error": "capacity", "retry_after_s": 2.5, "reason": "capacity"}).encode()
    error = rate_limited({"retry-after": "3"}, body)
    assert isinstance(error, CloudRateLimited)
    assert (error.kind, error.retry_after_s, error.reason) == ("rate_limited", 2.5, "capacity")
    assert rate_limited({"retry-after": "4"}, b"no").retry_after_s == 4.0
    assert rate_limited({}, b"").retry_after_s == 1.0  # said nothing: a second
    assert rate_limited({"retry-after": "86400"}, b"").retry_after_s == 600.0
    assert rate_limited({"retry-after": "-3"}, b"{}").retry_after_s == 1.0


# -- audits ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audits_go_after_the_answer_and_never_hold_it(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url, max_audits_in_flight=2)
    device.chain.set_hybrid_plan(plan(audit_rate=1.0, tau=0.5))
    cloud.mode = "held"  # the cloud answers nothing until released
    answers = [await device.chain.infer({"features": x[None]}) for x in rows["sure"][:5]]
    # Every answer is the local one, made while the audits wait for the cloud.
    assert [a.stage for a in answers] == ["active"] * 5
    assert device.audits == []
    assert device.chain.audits_skipped == 3  # two in flight at most
    cloud.release.set()
    await device.chain.audits_idle()
    assert len(device.audits) == 2 and all(a.agreed for a in device.audits)
    (window,) = device.windows()
    hybrid = window.hybrid
    assert hybrid is not None
    assert (hybrid.local, hybrid.audits, hybrid.audit_compared, hybrid.audit_agreements) == (
        5,
        2,
        2,
        2,
    )
    assert hybrid.audit_confidence_sum == pytest.approx(sum(a.confidence for a in device.audits))
    text = device.metrics.exposition().decode()
    assert 'edgefleet_agent_hybrid_requests_total{route="audit"} 2.0' in text


@pytest.mark.asyncio
async def test_an_audit_rate_audits_about_that_share_and_an_audit_spends_quota(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url, max_audits_in_flight=1)
    device.chain.set_hybrid_plan(plan(audit_rate=0.25, tau=0.5, quota_burst=1000))
    for _ in range(10):
        for x in rows["sure"]:
            await device.chain.infer({"features": x[None]})
            await device.chain.audits_idle()
    assert 30 <= len(device.audits) <= 70  # 200 draws at 0.25: 50 expected
    device.chain.set_hybrid_plan(plan(plan_id="p-poor", audit_rate=1.0, tau=0.5, quota_burst=1))
    for x in rows["sure"][:3]:
        await device.chain.infer({"features": x[None]})
        await device.chain.audits_idle()
    assert sum(a.plan_id == "p-poor" for a in device.audits) == 1


# -- windows -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_window_counts_add_up_and_a_new_plan_closes_the_window(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    device = Device(v2, cloud.url)
    device.chain.set_hybrid_plan(plan(quota_burst=3, audit_rate=0.5, tau=0.8))
    mixed = [*rows["unsure"], *rows["sure"][:8]]
    confidences = []
    for x in mixed:
        answer = await device.chain.infer({"features": x[None]})
        assert answer.hybrid is not None and answer.hybrid.confidence is not None
        confidences.append(answer.hybrid.confidence)
        await device.chain.audits_idle()
    device.chain.set_hybrid_plan(plan(plan_id="p-second", mode="local"))
    await device.chain.infer({"features": rows["sure"][:1]})
    device.chain.set_hybrid_plan(None)
    await device.chain.infer({"features": rows["sure"][:1]})
    first, second, third = device.windows()

    assert (first.plan_id, second.plan_id, third.plan_id) == ("p-0123456789ab", "p-second", None)
    hybrid = first.hybrid
    assert hybrid is not None and hybrid.plan_id == first.plan_id and hybrid.mode == "escalate"
    assert hybrid.local + hybrid.escalated + hybrid.kept_local_quota == first.requests == 12
    assert sum(hybrid.confidence) == 12
    expected = [0] * CONFIDENCE_BINS
    for b in protocol_confidence_bin(np.array(confidences)):
        expected[b] += 1
    assert hybrid.confidence == expected
    assert hybrid.local_latency_ms.count == 12
    # Three tokens: spent by the four unsure requests and the audits drawn, in order.
    assert hybrid.escalated + hybrid.audits == 3
    assert hybrid.cloud_answered == hybrid.escalated == hybrid.escalated_compared
    assert hybrid.cloud_latency_ms.count == hybrid.escalated + hybrid.audits
    assert first.served.get("cloud", 0) == hybrid.cloud_answered
    assert second.hybrid is not None and (second.hybrid.mode, second.hybrid.local) == ("local", 1)
    assert third.hybrid is None


def test_one_confidence_bin_is_the_protocol_s() -> None:
    values = [0.0, 0.019, 0.02, 0.5, 0.999, 1.0, float("nan")]
    assert [confidence_bin(v) for v in values] == protocol_confidence_bin(np.array(values)).tolist()


# -- a real Open Inference Protocol answer path --------------------------------------------------


@pytest.mark.asyncio
async def test_escalations_are_answered_by_a_real_open_inference_protocol_server(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]]
) -> None:
    # The agent's own local API serving cloud.tflite stands in for the cloud endpoint.
    big = ModelSlot(v2.manifest.model_copy(update={"version": "9.1.0"}), load("cloud"))
    async with LocalApi(FallbackChain(big), port=0) as api:
        device = Device(v2, f"http://127.0.0.1:{api.port}")
        device.chain.set_hybrid_plan(plan(tau=0.8))
        answer = await device.chain.infer({"features": rows["unsure"]})
    assert (answer.stage, answer.model_version) == ("cloud", "9.1.0")
    expected = load("cloud").run({"features": rows["unsure"]})["scores"]
    np.testing.assert_allclose(answer.outputs["scores"], expected, rtol=1e-6)
    assert answer.hybrid is not None and answer.hybrid.agreed is not None


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7, 4.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_the_request_confidence_is_the_protocol_s_calibrated_confidence(
    v2: ModelSlot, temperature: float, batch: int
) -> None:
    rng = np.random.default_rng(int(temperature * 10) + batch)
    scores = rng.dirichlet(np.ones(4), size=batch).astype(np.float32)
    scores[0, 1] = 0.0  # a class the model rules out
    got = request_confidence(v2.manifest, {"scores": scores}, batch, temperature)
    assert got == pytest.approx(float(calibrated_confidence(scores, temperature).min()), abs=1e-9)
    nan = scores.copy()
    nan[-1, 0] = np.nan
    assert request_confidence(v2.manifest, {"scores": nan}, batch, temperature) == 0.0


# -- the daemon's wiring -------------------------------------------------------------------------

AGENT_TOML = (
    AGENT_HEAD
    + """[director]
url = "http://fleet.example/director"
root = "trust/director-root.json"
[credentials]
password_file = "password"
[cloud]
url = "{url}"
timeout_s = 2.0
"""
)


@pytest.mark.asyncio
async def test_the_agent_asks_the_cloud_with_the_credential_of_its_mqtt_connection(
    tmp_path: Path, v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]], cloud: FaultyCloud
) -> None:
    from agent.config import AgentConfig, ConfigError
    from agent.daemon import AgentDaemon

    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML.format(url=cloud.url))
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"credentials\.password_file: cannot read"):
        AgentDaemon(AgentConfig.load(path), path)
    (tmp_path / "password").write_text("hunter2-of-pump-17\n")
    daemon = AgentDaemon(AgentConfig.load(path), path)
    try:
        assert daemon.recorder is not None
        daemon.chain.set_models(active=v2, previous=None)  # as an install publishes them
        daemon.recorder.set_manifest(v2.manifest)
        expires = datetime.now(UTC) + timedelta(hours=1)
        daemon.chain.set_hybrid_plan(plan(device_id="pump-17", expires_at=expires))
        answer = await daemon.chain.infer({"features": rows["unsure"][:1]})
    finally:
        if daemon.outbox is not None:
            daemon.outbox.close()
    assert answer.stage == "cloud"
    token = base64.b64encode(b"pump-17:hunter2-of-pump-17").decode()
    assert cloud.authorizations == [f"Basic {token}"]
    assert cloud.models == [v2.manifest.name]  # no [cloud] model: the served model's name
    text = daemon.metrics.exposition().decode()
    assert 'edgefleet_agent_hybrid_requests_total{route="escalated"} 1.0' in text
    assert 'edgefleet_agent_hybrid_plan_info{mode="escalate",plan_id="p-0123456789ab"} 1.0' in text
    daemon.recorder.close_window()
    window = daemon.recorder.poll()
    assert window is not None and window.hybrid is not None and window.hybrid.escalated == 1


def test_requests_left_out_of_the_summaries_are_still_counted_in_the_hybrid_section(
    v2: ModelSlot, rows: dict[str, npt.NDArray[np.float32]]
) -> None:
    from agent.serving import Route
    from agent.serving.hybrid import RouteName

    ticks = iter(range(10**9))
    recorder = WindowRecorder(
        v2.manifest,
        DEVICE,
        WindowPolicy(max_requests=5000, max_overhead=0.2),
        clock=Clock(1.0e9),
        timer=lambda: next(ticks) * 1e-3,  # summarising looks costly: most requests sampled out
        seed=3,
    )
    x = {"features": rows["sure"][:1]}
    outputs = {"scores": load("v2").run(x)["scores"]}
    routes: list[RouteName] = ["local", "escalated", "kept_local_quota"]
    for i in range(3000):
        route = Route("p-1", "escalate", routes[i % 3], 0.9, 1e-5)
        recorder.record(x, outputs, "active", 1e-5, hybrid=route)
    recorder.close_window()
    window = recorder.poll()
    assert window is not None and window.hybrid is not None
    assert window.unsummarised_requests > 1000  # the fast path took most of them
    assert window.hybrid.requests == window.requests == 3000
    assert (window.hybrid.local, window.hybrid.escalated, window.hybrid.kept_local_quota) == (
        1000,
        1000,
        1000,
    )
    assert window.plan_id == "p-1" and sum(window.hybrid.confidence) == 3000
