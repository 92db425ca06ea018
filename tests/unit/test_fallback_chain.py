"""The fallback chain with real models, the real runtime and a real HTTP cloud endpoint."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from aiohttp import web

from agent.serving import (
    Answer,
    ChainConfig,
    ChainNotReady,
    CloudStage,
    FallbackChain,
    InvalidInput,
    ModelSlot,
    ModelStage,
    UnknownVersion,
)
from model_runtime import LoadedModel, default_runtime
from protocol.bundle import read_bundle
from protocol.inference import InferenceRequest, decode_inputs, encode_response
from protocol.manifest import Manifest, TensorSpec
from testbed.images import MODELS, make_bundle

BASELINE = np.load(MODELS / "baseline.npy")
RUNTIME = default_runtime()


def load(model: str) -> LoadedModel:
    return RUNTIME.load(MODELS / f"{model}.tflite")


def read_manifest(path: Path) -> Manifest:
    with path.open("rb") as f:
        return read_bundle(f)[0]


@pytest.fixture(scope="module")
def manifests(
    bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Manifest]:
    bad = make_bundle(tmp_path_factory.mktemp("v3"), "v3-bad", "3.0.0")
    return {
        "v1": read_manifest(bundles["v1"]),
        "v2": read_manifest(bundles["v2"]),
        "v3-bad": read_manifest(bad),
    }


def slot(manifests: dict[str, Manifest], model: str, version: str | None = None) -> ModelSlot:
    manifest = manifests[model]
    if version is not None:
        manifest = manifest.model_copy(update={"version": version})
    return ModelSlot(manifest, load(model))


def running_rows(n: int = 2) -> npt.NDArray[np.float32]:
    return np.array(BASELINE[:n], dtype=np.float32)


def with_idle_row(n: int = 3, idle: int = 1) -> npt.NDArray[np.float32]:
    x = running_rows(n)
    x[idle, 0] = 0.0  # shaft_rpm == 0: an idle machine, which v3-bad scores as NaN
    return x


class Observed:
    """Records every (stage, version, ok, reason) the chain reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, bool, str | None]] = []

    def __call__(self, stage: str, version: str | None, ok: bool, reason: str | None) -> None:
        self.events.append((stage, version, ok, reason))


class CountingModel:
    """A real model that counts its runs, and can be held back to keep a request in flight."""

    def __init__(self, model: LoadedModel, delay_s: float = 0.0) -> None:
        self.model = model
        self.runs = 0
        self.delay_s = delay_s

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.model.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.model.outputs

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.runs += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.model.run(inputs)


class HeldModel(CountingModel):
    """A model whose run starts (``started`` is set) and then waits until ``release`` is set."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.runs += 1
        self.started.set()
        assert self.release.wait(30), "the held model was never released"
        return self.model.run(inputs)


class CloudServer:
    """A real Open Inference Protocol endpoint running ``cloud.tflite``, with switchable faults."""

    def __init__(self) -> None:
        self.model = load("cloud")
        self.mode = "ok"  # ok | error | nan | slow | garbage
        self.delay_s = 0.5
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> CloudServer:
        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.mode == "error":
            return web.json_response({"error": "the cloud is overloaded"}, status=503)
        if self.mode == "garbage":
            return web.Response(body=b"<html>proxy error</html>", content_type="text/html")
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        parsed = InferenceRequest.model_validate_json(await request.read())
        outputs = self.model.run(decode_inputs(parsed))
        if self.mode == "nan":
            outputs = {k: np.full_like(v, np.nan) for k, v in outputs.items()}
        body = encode_response(
            outputs,
            model_name=request.match_info["name"],
            model_version="9.0.0-cloud",
            stage="active",
        ).model_dump_json()
        return web.Response(body=body, content_type="application/json")


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest_asyncio.fixture
async def cloud() -> AsyncIterator[CloudServer]:
    """A real cloud endpoint on a free port, on the test's event loop."""
    async with CloudServer() as server:
        yield server


# -- local stages ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_healthy_active_model_answers(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v2"), slot(manifests, "v1"))
    x = running_rows(3)
    answer = await chain.infer({"features": x})
    assert (answer.stage, answer.model_version, answer.escalated) == ("active", "2.0.0", False)
    assert [(a.stage, a.ok) for a in answer.attempts] == [("active", True)]
    np.testing.assert_allclose(answer.outputs["scores"], load("v2").run({"features": x})["scores"])
    assert chain.counters["active"].served == 1


@pytest.mark.asyncio
async def test_nan_from_the_active_model_passes_the_request_to_the_previous(
    manifests: dict[str, Manifest],
) -> None:
    chain = FallbackChain(slot(manifests, "v3-bad"), slot(manifests, "v2"))
    observed = Observed()
    chain.subscribe(observed)
    x = with_idle_row(3, idle=1)
    answer = await chain.infer({"features": x})
    assert (answer.stage, answer.model_version) == ("previous", "2.0.0")
    np.testing.assert_allclose(answer.outputs["scores"], load("v2").run({"features": x})["scores"])
    assert np.isfinite(answer.outputs["scores"]).all()
    reason = "output 'scores' is NaN or Inf in 1 of 3 rows (first: row 1)"
    assert observed.events == [
        ("active", "3.0.0", False, reason),
        ("previous", "2.0.0", True, None),
    ]
    counters = chain.counters
    assert (counters["active"].failed, counters["previous"].served) == (1, 1)


@pytest.mark.asyncio
async def test_v3_bad_still_serves_running_machines_itself(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v3-bad"), slot(manifests, "v2"))
    answer = await chain.infer({"features": running_rows(4)})
    assert (answer.stage, answer.model_version) == ("active", "3.0.0")


@pytest.mark.asyncio
async def test_an_invalid_request_runs_no_stage(manifests: dict[str, Manifest]) -> None:
    model = CountingModel(load("v2"))
    chain = FallbackChain(ModelSlot(manifests["v2"], model))
    observed = Observed()
    chain.subscribe(observed)
    x = running_rows(1)
    x[0, 2] = np.nan
    with pytest.raises(InvalidInput, match="ambient_temp_c"):
        await chain.infer({"features": x})
    assert model.runs == 0
    assert observed.events == []


@pytest.mark.asyncio
async def test_a_raising_observer_does_not_break_serving(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v2"))

    def broken(*args: object) -> None:
        raise RuntimeError("observer bug")

    chain.subscribe(broken)
    assert (await chain.infer({"features": running_rows()})).stage == "active"


@pytest.mark.asyncio
async def test_an_unsubscribed_observer_hears_nothing(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v2"))
    observed = Observed()
    unsubscribe = chain.subscribe(observed)
    unsubscribe()
    await chain.infer({"features": running_rows()})
    assert observed.events == []


@pytest.mark.asyncio
async def test_a_local_model_over_its_timeout_passes_the_request_on(
    manifests: dict[str, Manifest],
) -> None:
    # The timeout is generous for the previous model's first run, which goes to a worker
    # thread and may wait for a CPU on a busy machine; the slow model is far beyond it.
    slow = CountingModel(load("v2"), delay_s=1.5)
    chain = FallbackChain(
        ModelSlot(manifests["v2"], slow),
        slot(manifests, "v1"),
        config=ChainConfig(local_timeout_s=0.3),
    )
    answer = await chain.infer({"features": running_rows()})
    assert (answer.stage, answer.model_version) == ("previous", "1.0.0")
    assert answer.attempts[0].reason == "no answer within 0.3 s"


# -- cloud and safe default ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_both_local_models_failing_passes_the_request_to_the_cloud(
    manifests: dict[str, Manifest], cloud: CloudServer
) -> None:
    chain = FallbackChain(
        slot(manifests, "v3-bad"),
        slot(manifests, "v3-bad", version="2.9.0"),
        cloud=CloudStage(cloud.url, "pump-health", timeout_s=2.0),
    )
    x = with_idle_row(2, idle=0)
    answer = await chain.infer({"features": x})
    assert (answer.stage, answer.model_version) == ("cloud", "9.0.0-cloud")
    assert [(a.stage, a.model_version, a.ok) for a in answer.attempts] == [
        ("active", "3.0.0", False),
        ("previous", "2.9.0", False),
        ("cloud", "9.0.0-cloud", True),
    ]
    expected = load("cloud").run({"features": x})["scores"]
    np.testing.assert_allclose(answer.outputs["scores"], expected, rtol=1e-6)
    assert answer.outputs["scores"].dtype == np.float32
    assert cloud.requests == 1


def safe_default_rows(manifest: Manifest, rows: int) -> npt.NDArray[np.float32]:
    one = np.asarray(manifest.fallback.safe_default["scores"], dtype=np.float32)
    return np.tile(one, (rows, 1))


def assert_safe_default(answer: Answer, manifest: Manifest, rows: int) -> None:
    assert (answer.stage, answer.model_version) == ("safe_default", manifest.version)
    np.testing.assert_array_equal(answer.outputs["scores"], safe_default_rows(manifest, rows))
    assert answer.outputs["scores"].shape == (rows, 4)


@pytest.mark.asyncio
async def test_an_unreachable_cloud_leaves_the_safe_default(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(
        slot(manifests, "v3-bad"),
        slot(manifests, "v3-bad", version="2.9.0"),
        cloud=CloudStage(closed_port_url(), "pump-health", timeout_s=2.0),
    )
    answer = await chain.infer({"features": with_idle_row(3, idle=2)})
    assert_safe_default(answer, manifests["v3-bad"], 3)
    cloud_attempt = answer.attempts[2]
    assert (cloud_attempt.stage, cloud_attempt.ok) == ("cloud", False)
    assert "cannot reach the cloud" in (cloud_attempt.reason or "")
    assert answer.attempts[3].stage == "safe_default"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("slow", "no answer within 0.2 s"),
        ("error", "HTTP 503: the cloud is overloaded"),
        ("nan", "NaN or Inf in 1 of 1 rows"),
        ("garbage", "not an inference response"),
    ],
)
async def test_a_failing_cloud_leaves_the_safe_default(
    manifests: dict[str, Manifest], mode: str, reason: str, cloud: CloudServer
) -> None:
    cloud.mode = mode
    chain = FallbackChain(
        slot(manifests, "v3-bad"),
        cloud=CloudStage(cloud.url, "pump-health", timeout_s=0.2),
    )
    started = time.monotonic()
    answer = await chain.infer({"features": with_idle_row(1, idle=0)})
    assert time.monotonic() - started < 0.8
    assert_safe_default(answer, manifests["v3-bad"], 1)
    assert answer.attempts[1].stage == "cloud"
    assert reason in (answer.attempts[1].reason or "")


@pytest.mark.asyncio
async def test_a_slot_whose_model_cannot_run_is_served_by_its_safe_default(
    manifests: dict[str, Manifest],
) -> None:
    chain = FallbackChain(ModelSlot(manifests["v2"], None))
    assert chain.ready
    assert chain.readiness()[1] == "only the safe default can answer"
    answer = await chain.infer({"features": running_rows(2)})
    assert_safe_default(answer, manifests["v2"], 2)


@pytest.mark.asyncio
async def test_a_chain_without_any_model_is_not_ready() -> None:
    chain = FallbackChain()
    assert not chain.ready
    with pytest.raises(ChainNotReady):
        await chain.infer({"features": running_rows()})


# -- circuit breakers ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_the_breaker_stops_calling_a_failing_model_and_probes_it_later(
    manifests: dict[str, Manifest],
) -> None:
    bad = CountingModel(load("v3-bad"))
    clock = FakeClock()
    chain = FallbackChain(
        ModelSlot(manifests["v3-bad"], bad),
        slot(manifests, "v2"),
        config=ChainConfig(failure_threshold=3, reset_after_s=30.0),
        clock=clock,
    )
    idle = {"features": with_idle_row(1, idle=0)}

    for _ in range(5):
        assert (await chain.infer(idle)).stage == "previous"
    assert bad.runs == 3  # opened after three failures; two requests skipped it
    skipped = await chain.infer(idle)
    assert skipped.attempts[0].reason == "circuit breaker is open"
    assert chain.counters["active"].skipped == 3
    clock.now += 30
    assert (await chain.infer(idle)).stage == "previous"  # the probe fails
    assert bad.runs == 4
    assert (await chain.infer(idle)).attempts[0].reason == "circuit breaker is open"
    clock.now += 30
    probe = await chain.infer({"features": running_rows(1)})  # the probe succeeds
    assert (probe.stage, bad.runs) == ("active", 5)
    assert (await chain.infer({"features": running_rows(1)})).stage == "active"
    assert bad.runs == 6


@pytest.mark.asyncio
async def test_the_cloud_breaker_stops_calls_to_a_down_cloud(
    manifests: dict[str, Manifest], cloud: CloudServer
) -> None:
    cloud.mode = "error"
    chain = FallbackChain(
        slot(manifests, "v3-bad"),
        cloud=CloudStage(cloud.url, "pump-health"),
        config=ChainConfig(failure_threshold=2, reset_after_s=60.0),
    )
    for _ in range(4):
        answer = await chain.infer({"features": with_idle_row(1, idle=0)})
        assert answer.stage == "safe_default"
    assert cloud.requests == 2
    assert chain.counters["cloud"].skipped == 2


# -- without a hybrid plan (tests/unit/test_hybrid_serving.py has the plans) -------------------


@pytest.mark.asyncio
async def test_without_a_plan_an_unsure_answer_is_not_sent_to_the_cloud(
    manifests: dict[str, Manifest], cloud: CloudServer
) -> None:
    top = load("v2").run({"features": BASELINE[:500]})["scores"].max(axis=1)
    unsure = BASELINE[int(np.argmin(top)) :][:1].copy()
    chain = FallbackChain(slot(manifests, "v2"), cloud=CloudStage(cloud.url, "pump-health"))
    answer = await chain.infer({"features": unsure})
    assert (answer.stage, answer.escalated, answer.hybrid) == ("active", False, None)
    assert cloud.requests == 0


# -- model swaps, version pins, scheduling ------------------------------------------------------


@pytest.mark.asyncio
async def test_models_swapped_mid_stream_serve_the_next_requests(
    manifests: dict[str, Manifest],
) -> None:
    v1, v2 = slot(manifests, "v1"), slot(manifests, "v2")
    chain = FallbackChain(v1)

    versions = []
    for i in range(6):
        if i == 3:
            chain.set_models(active=v2, previous=v1)  # an install switched slots
        versions.append((await chain.infer({"features": running_rows()})).model_version)
    assert versions == ["1.0.0"] * 3 + ["2.0.0"] * 3
    assert chain.versions == ["2.0.0", "1.0.0"]


@pytest.mark.asyncio
async def test_a_request_in_flight_finishes_on_the_models_it_started_with(
    manifests: dict[str, Manifest],
) -> None:
    held = HeldModel(load("v2"))  # keeps the first request in flight until released
    chain = FallbackChain(ModelSlot(manifests["v2"], held), slot(manifests, "v1"))

    in_flight = asyncio.create_task(chain.infer({"features": running_rows()}))
    try:
        assert await asyncio.to_thread(held.started.wait, 30), "the request never started"
        assert held.runs == 1
        chain.set_models(active=slot(manifests, "v3-bad"), previous=slot(manifests, "v1"))
        after = await chain.infer({"features": running_rows()})
    finally:
        held.release.set()
    before = await in_flight
    assert (before.stage, before.model_version) == ("active", "2.0.0")
    assert (after.stage, after.model_version) == ("active", "3.0.0")


@pytest.mark.asyncio
async def test_a_breaker_belongs_to_its_model_and_a_new_model_starts_closed(
    manifests: dict[str, Manifest],
) -> None:
    previous = slot(manifests, "v2")
    chain = FallbackChain(
        slot(manifests, "v3-bad"), previous, config=ChainConfig(failure_threshold=1)
    )
    await chain.infer({"features": with_idle_row(1, idle=0)})
    breaker, previous_breaker = chain.breaker("active"), chain.breaker("previous")
    assert breaker is not None and not breaker.allow()
    chain.set_models(active=slot(manifests, "v1"), previous=previous)
    assert chain.breaker("active") is not breaker
    assert chain.breaker("previous") is previous_breaker  # same model, same breaker
    assert (await chain.infer({"features": running_rows()})).model_version == "1.0.0"


@pytest.mark.asyncio
async def test_a_pinned_version_is_served_by_that_model(manifests: dict[str, Manifest]) -> None:
    chain = FallbackChain(slot(manifests, "v2"), slot(manifests, "v1"))
    answer = await chain.infer({"features": running_rows()}, version="1.0.0")
    assert (answer.stage, answer.model_version) == ("previous", "1.0.0")
    assert (await chain.infer({"features": running_rows()}, version="2.0.0")).stage == "active"
    with pytest.raises(UnknownVersion, match=r"'7\.0\.0'"):
        await chain.infer({"features": running_rows()}, version="7.0.0")


@pytest.mark.asyncio
async def test_a_fast_model_runs_on_the_event_loop_and_a_slow_one_in_a_thread() -> None:
    fast = ModelStage("active", "2.0.0", load("v2"))
    slow = ModelStage("active", "2.0.0", CountingModel(load("v2"), delay_s=0.05))
    for stage in (fast, slow):
        assert not stage.runs_inline  # unknown cost: the first run goes to a thread
        for _ in range(3):
            await stage.infer({"features": running_rows()})
    assert fast.runs_inline
    assert not slow.runs_inline
