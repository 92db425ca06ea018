"""The cloud endpoint end to end: real HTTP, real database, real signed bundles and real models.

The cloud model is ``firmware_images/models/cloud.tflite`` built into a bundle
released for hardware ``cloud`` in an image repository signed with real keys
and served over HTTP; devices are registered in a real SQLite (and
PostgreSQL) database; requests are real Open Inference Protocol bodies sent
over sockets. Only the clocks of quotas would be faked, and here they are
real: the quotas in these tests are far from any rate the test reaches.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from fleet_server.cloud import CloudConfig, CloudEndpoint
from fleet_server.cloud.cli import main as cloud_main
from fleet_server.cloud.models import Loader, ModelSource
from fleet_server.db.engine import Database, migrate
from fleet_server.db.models import CloudSettings, HybridPlanRow
from fleet_server.devices.store import create_device
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from model_runtime import LoadedModel, TFLiteRuntime
from protocol.bundle import file_entry, read_bundle, write_bundle
from protocol.golden import unpack_golden
from protocol.inference import (
    AnswerParameters,
    InferenceResponse,
    decode_outputs,
    encode_request,
)
from testbed.http_repo import RepositoryServer
from testbed.images import make_bundle
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

MODEL = "pump-health"


@pytest.fixture(scope="module")
def cloud_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample cloud model as two releases for hardware ``cloud``, and one for a device."""
    tmp = tmp_path_factory.mktemp("cloud-bundles")
    return {
        "9.0.0": make_bundle(tmp, "cloud", "9.0.0", hardware=("cloud",)),
        "9.1.0": make_bundle(tmp, "cloud", "9.1.0", hardware=("cloud",)),
        "10.0.0-device": make_bundle(tmp, "v2", "10.0.0"),
    }


@pytest.fixture(scope="module")
def golden(cloud_bundles: dict[str, Path]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The cloud bundle's golden inputs and the outputs the model gives for them."""
    with cloud_bundles["9.0.0"].open("rb") as f:
        _, members = read_bundle(f)
    inputs, outputs = unpack_golden(members["golden.npz"])
    return inputs["features"], outputs["scores"]


@dataclass
class Fleet:
    endpoint: CloudEndpoint
    database: Database
    repo: ImageRepository
    keys: KeyStore
    passwords: dict[str, str]
    repository_server: RepositoryServer

    @property
    def url(self) -> str:
        return self.endpoint.url

    def auth(self, device_id: str) -> dict[str, str]:
        """The HTTP Basic header of ``device_id`` with the credential the test holds for it."""
        token = base64.b64encode(f"{device_id}:{self.passwords[device_id]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def set_plan(self, device_id: str, rate: float, burst: int) -> None:
        now = datetime.now(UTC)
        async with self.database.session() as session:
            row = await session.get(HybridPlanRow, device_id)
            if row is None:
                row = HybridPlanRow(device_id=device_id, plan_id=f"p-{device_id}", inputs={})
                session.add(row)
            row.mode = "escalate"
            row.quota_rate = rate
            row.quota_burst = burst
            row.issued_at = now
            row.expires_at = now + timedelta(hours=1)
            row.plan = {}
        await self.endpoint.refresh_settings()

    async def set_capacity(self, capacity: float) -> None:
        async with self.database.session() as session:
            session.add(
                CloudSettings(id=1, capacity=capacity, headroom=0.1, updated_at=datetime.now(UTC))
            )
        await self.endpoint.refresh_settings()


def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    with database_url(kind, tmp_path) as url:
        migrate(url)
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield from _database("sqlite", tmp_path)


@pytest.fixture(params=DATABASES)
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _database(request.param, tmp_path)


async def _fleet(
    url: str,
    tmp_path: Path,
    keys: KeyStore,
    bundles: dict[str, Path],
    devices: int = 4,
    loader: Loader | None = None,
    **settings: Any,
) -> AsyncIterator[Fleet]:
    repo = ImageRepository(tmp_path / "repo")
    repo.create(keys)
    repo.add_bundle(bundles["9.0.0"], keys)
    repo.add_bundle(bundles["10.0.0-device"], keys)  # a device's release: not the cloud's
    server = RepositoryServer(repo.path)
    database = Database(url)
    passwords = {}
    async with database.session() as session:
        for i in range(devices):
            _, password = await create_device(
                session, device_id=f"dev-{i}", hardware_id="rpi4-arm64", actor="test"
            )
            passwords[f"dev-{i}"] = password
    config = CloudConfig(
        db_url=url,
        repository=server.url,
        trusted_root=repo.trusted_root_path,
        metadata_dir=tmp_path / "cloud-metadata",
        http_port=0,
        model_refresh_s=3600,
        settings_refresh_s=3600,
        **{"capacity": 1000.0, **settings},
    )
    endpoint = CloudEndpoint(config, database=database, loader=loader)
    await endpoint.start()
    try:
        yield Fleet(endpoint, database, repo, keys, passwords, server)
    finally:
        await endpoint.stop()
        await database.close()
        server.close()


@pytest_asyncio.fixture
async def fleet(
    sqlite_url: str, tmp_path: Path, session_keys: KeyStore, cloud_bundles: dict[str, Path]
) -> AsyncIterator[Fleet]:
    async for f in _fleet(sqlite_url, tmp_path, session_keys, cloud_bundles, max_batch_wait_s=0.05):
        yield f


def _body(rows: npt.NDArray[Any], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "features",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.reshape(-1).tolist(),
            }
        ],
        **extra,
    }


async def _post(
    http: aiohttp.ClientSession,
    fleet: Fleet,
    device: str | None,
    body: Any,
    model: str = MODEL,
    version: str | None = None,
) -> tuple[int, dict[str, Any], Any]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        fleet.url + path,
        data=data,
        headers={"Content-Type": "application/json", **(fleet.auth(device) if device else {})},
    ) as response:
        return response.status, await response.json(), response.headers


async def _metrics(http: aiohttp.ClientSession, fleet: Fleet) -> str:
    async with http.get(fleet.url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def _scores(answer: dict[str, Any]) -> npt.NDArray[np.float64]:
    (output,) = answer["outputs"]
    assert output["name"] == "scores"
    return np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])


@pytest.mark.asyncio
async def test_concurrent_requests_from_several_devices_share_batches_and_get_their_own_rows(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, expected = golden
    for device in fleet.passwords:
        await fleet.set_plan(device, rate=100.0, burst=100)
    # Requests of 1, 2 and 3 rows from four devices; each asks for different golden rows.
    picks = [[(i + k) % 8 for k in range(1 + i % 3)] for i in range(16)]
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(
            *(
                _post(http, fleet, f"dev-{i % 4}", _body(inputs[rows], id=f"r{i}"))
                for i, rows in enumerate(picks)
            )
        )
        metrics = await _metrics(http, fleet)
    for rows, (status, answer, _) in zip(picks, answers, strict=True):
        assert status == 200, answer
        np.testing.assert_allclose(_scores(answer), expected[rows], rtol=1e-3, atol=1e-4)
        assert answer["model_name"] == MODEL
        assert answer["model_version"] == "9.0.0"
        assert answer["parameters"] == {
            "stage": "cloud",
            "model_version": "9.0.0",
            "escalated": False,
        }
    assert [a[1]["id"] for a in answers] == [f"r{i}" for i in range(16)]
    batches = _sample(metrics, "edgefleet_cloud_batch_size_count", model=MODEL)
    rows_run = _sample(metrics, "edgefleet_cloud_batch_size_sum", model=MODEL)
    assert rows_run == sum(len(p) for p in picks)
    assert batches < len(picks), "some requests should have shared an interpreter call"
    assert _sample(metrics, "edgefleet_cloud_requests_total", model=MODEL, outcome="ok") == 16


@pytest.mark.asyncio
async def test_a_request_encoded_as_the_agent_does_is_answered_as_the_agent_reads_it(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, expected = golden
    request = encode_request({"features": inputs[:3].astype(np.float32)}, id="agent-1")
    body = request.model_dump_json(exclude_none=True).encode()
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _post(http, fleet, "dev-0", body)
    assert status == 200
    response = InferenceResponse.model_validate(answer)
    assert response.answer() == AnswerParameters(stage="cloud", model_version="9.0.0")
    outputs = decode_outputs(response)
    np.testing.assert_allclose(outputs["scores"], expected[:3], rtol=1e-3, atol=1e-4)


@pytest.mark.asyncio
async def test_a_bad_request_is_refused_by_name_and_does_not_spoil_the_batch_it_came_with(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, expected = golden
    for device in fleet.passwords:
        await fleet.set_plan(device, rate=100.0, burst=100)
    one = _body(inputs[:1])["inputs"][0]
    with_null = [None if i == 3 else float(v) for i, v in enumerate(inputs[0])]
    bad_bodies: list[tuple[Any, str]] = [
        ({"inputs": [one | {"name": "temperature"}]}, "'temperature'"),
        ({"inputs": [one | {"shape": [1, 15]}]}, "'features'"),
        ({"inputs": [one | {"datatype": "FP64"}]}, "FP64"),
        ({"inputs": [one | {"data": with_null}]}, "NaN"),
        ({"inputs": []}, "inputs"),
        (b"{not json", "not valid JSON"),
        (_body(inputs[:1], outputs=[{"name": "logits"}]), "'logits'"),
        (_body(np.repeat(inputs[:1], 40, axis=0)), "max_batch_size"),
    ]
    async with aiohttp.ClientSession() as http:
        good = [_post(http, fleet, "dev-0", _body(inputs[i : i + 1])) for i in range(4)]
        bad = [_post(http, fleet, "dev-1", body) for body, _ in bad_bodies]
        answers = await asyncio.gather(*good, *bad)
    for i, (status, answer, _) in enumerate(answers[:4]):
        assert status == 200
        np.testing.assert_allclose(_scores(answer), expected[i : i + 1], rtol=1e-3, atol=1e-4)
    for (status, answer, _), (_, fault) in zip(answers[4:], bad_bodies, strict=True):
        assert status == 400, answer
        assert fault in answer["error"]


@pytest.mark.asyncio
async def test_a_device_over_its_quota_gets_429_while_another_is_served(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, _ = golden
    await fleet.set_plan("dev-0", rate=0.01, burst=2)
    async with aiohttp.ClientSession() as http:
        assert (await _post(http, fleet, "dev-0", _body(inputs[:1])))[0] == 200
        assert (await _post(http, fleet, "dev-0", _body(inputs[:1])))[0] == 200
        status, answer, headers = await _post(http, fleet, "dev-0", _body(inputs[:1]))
        assert status == 429
        assert answer["reason"] == "quota"
        assert "dev-0" in answer["error"] and "quota" in answer["error"]
        assert answer["retry_after_s"] > 1
        assert int(headers["Retry-After"]) >= 1
        # dev-1 has no plan: the default quota (burst 2) still serves it.
        assert (await _post(http, fleet, "dev-1", _body(inputs[:1])))[0] == 200
        assert (await _post(http, fleet, "dev-1", _body(inputs[:1])))[0] == 200
        status, answer, _ = await _post(http, fleet, "dev-1", _body(inputs[:1]))
        assert (status, answer["reason"]) == (429, "quota")
        metrics = await _metrics(http, fleet)
    assert _sample(metrics, "edgefleet_cloud_rate_limited_total", reason="quota") == 2


@pytest.mark.asyncio
async def test_the_endpoint_refuses_beyond_its_capacity_from_the_database(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, _ = golden
    for device in fleet.passwords:
        await fleet.set_plan(device, rate=100.0, burst=100)
    await fleet.set_capacity(0.01)  # a burst of one request, then one a hundred seconds
    async with aiohttp.ClientSession() as http:
        assert (await _post(http, fleet, "dev-0", _body(inputs[:1])))[0] == 200
        status, answer, headers = await _post(http, fleet, "dev-1", _body(inputs[:1]))
        metrics = await _metrics(http, fleet)
    assert status == 429
    assert answer["reason"] == "capacity"
    assert "capacity of 0.01 requests a second" in answer["error"]
    assert int(headers["Retry-After"]) >= 1
    assert _sample(metrics, "edgefleet_cloud_rate_limited_total", reason="capacity") == 1
    assert _sample(metrics, "edgefleet_cloud_capacity") == 0.01


class _HeldModel:
    """Injected fault: the real model, whose calls wait while ``held`` (a model that is slow)."""

    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        self.released = threading.Event()
        self.released.set()
        self.entered = threading.Event()
        self.inputs = model.inputs
        self.outputs = model.outputs

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.entered.set()
        self.released.wait(timeout=60)
        return self._model.run(inputs)


@pytest.mark.asyncio
async def test_a_full_queue_is_429_for_capacity_and_the_queued_requests_are_answered(
    sqlite_url: str,
    tmp_path: Path,
    session_keys: KeyStore,
    cloud_bundles: dict[str, Path],
    golden: tuple[npt.NDArray[Any], Any],
) -> None:
    inputs, _ = golden
    held: list[_HeldModel] = []

    def load(content: bytes) -> LoadedModel:
        held.append(_HeldModel(TFLiteRuntime().load(content)))
        return held[-1]

    async for fleet in _fleet(
        sqlite_url, tmp_path, session_keys, cloud_bundles, loader=load, max_queue=1
    ):
        for device in fleet.passwords:
            await fleet.set_plan(device, rate=100.0, burst=100)
        (model,) = held
        model.released.clear()
        model.entered.clear()
        batcher = fleet.endpoint.service.batchers[MODEL]
        async with aiohttp.ClientSession() as http:
            running = asyncio.create_task(_post(http, fleet, "dev-0", _body(inputs[:1])))
            await asyncio.to_thread(model.entered.wait, 30)  # its batch is in the interpreter
            queued = asyncio.create_task(_post(http, fleet, "dev-1", _body(inputs[1:2])))
            while batcher.depth < 1:
                await asyncio.sleep(0.01)
            status, answer, headers = await _post(http, fleet, "dev-2", _body(inputs[2:3]))
            assert status == 429
            assert answer["reason"] == "capacity"
            assert "queue of model 'pump-health' is full" in answer["error"]
            assert int(headers["Retry-After"]) >= 1
            model.released.set()
            assert (await running)[0] == 200
            assert (await queued)[0] == 200
            # The refused request's tokens were given back: dev-2 still has its burst.
            assert fleet.endpoint.service.book._devices["dev-2"].tokens == pytest.approx(
                100, abs=0.5
            )


@pytest.mark.asyncio
async def test_an_expired_plan_falls_back_to_the_default_quota(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], Any]
) -> None:
    inputs, _ = golden
    await fleet.set_plan("dev-0", rate=100.0, burst=100)
    assert fleet.endpoint.service.book.quota_of("dev-0").burst == 100
    async with fleet.database.session() as session:
        row = await session.get(HybridPlanRow, "dev-0")
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await fleet.endpoint.refresh_settings()
    assert fleet.endpoint.service.book.quota_of("dev-0").burst == 2  # the default
    async with aiohttp.ClientSession() as http:
        statuses = [(await _post(http, fleet, "dev-0", _body(inputs[:1])))[0] for _ in range(4)]
    # The plan's tokens it held are kept up to the default's burst, then 429.
    assert statuses[:2] == [200, 200] and statuses[-1] == 429


@pytest.mark.asyncio
async def test_unknown_models_and_versions_are_404_and_bad_credentials_401(
    fleet: Fleet, golden: tuple[npt.NDArray[Any], npt.NDArray[Any]]
) -> None:
    inputs, _ = golden
    body = _body(inputs[:1])
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _post(http, fleet, "dev-0", body, model="fan-health")
        assert status == 404 and "'fan-health'" in answer["error"]
        status, answer, _ = await _post(http, fleet, "dev-0", body, version="8.0.0")
        assert status == 404 and "9.0.0, not 8.0.0" in answer["error"]
        assert (await _post(http, fleet, "dev-0", body, version="9.0.0"))[0] == 200
        fleet.passwords["dev-2"] = "not-its-credential"
        status, answer, headers = await _post(http, fleet, "dev-2", body)
        assert status == 401 and "dev-2" in answer["error"]
        assert headers["WWW-Authenticate"].startswith("Basic")
        status, answer, _ = await _post(http, fleet, None, body)
        assert status == 401 and "HTTP Basic" in answer["error"]
        fleet.passwords["ghost"] = "x"
        assert (await _post(http, fleet, "ghost", body))[0] == 401


@pytest.mark.asyncio
async def test_health_metadata_and_metrics_follow_the_protocol(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(fleet.url + "/v2/health/live") as response:
            assert response.status == 200 and (await response.json())["live"] is True
        async with http.get(fleet.url + "/v2/health/ready") as response:
            assert response.status == 200 and (await response.json())["ready"] is True
        async with http.get(fleet.url + f"/v2/models/{MODEL}", headers=fleet.auth("dev-0")) as r:
            meta = await r.json()
        assert meta["name"] == MODEL and meta["versions"] == ["9.0.0"]
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]
        async with http.get(fleet.url + f"/v2/models/{MODEL}") as response:
            assert response.status == 401
        metrics = await _metrics(http, fleet)
    assert _sample(metrics, "edgefleet_cloud_model_info", model=MODEL, version="9.0.0") == 1
    assert _sample(metrics, "edgefleet_cloud_model_loads_total", model=MODEL) == 1


@pytest.mark.asyncio
async def test_a_new_release_is_served_and_a_tampered_one_is_refused_keeping_the_old(
    fleet: Fleet, cloud_bundles: dict[str, Path], golden: tuple[npt.NDArray[Any], Any]
) -> None:
    inputs, _ = golden
    released = fleet.repo.add_bundle(cloud_bundles["9.1.0"], fleet.keys)
    (stored,) = fleet.repo.targets_dir.rglob(f"*{Path(released.target_path).name}")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the bytes on the repository's disk are not the signed ones
    stored.write_bytes(bytes(data))
    await fleet.endpoint.refresh_models()
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _post(http, fleet, "dev-0", _body(inputs[:1]))
        assert (status, answer["model_version"]) == (200, "9.0.0")
        metrics = await _metrics(http, fleet)
        assert _sample(metrics, "edgefleet_cloud_model_refusals_total", reason="download") == 1
        # Repaired: the same signed release now verifies and replaces 9.0.0.
        stored.write_bytes(cloud_bundles["9.1.0"].read_bytes())
        await fleet.endpoint.refresh_models()
        status, answer, _ = await _post(http, fleet, "dev-0", _body(inputs[:1]))
        assert (status, answer["model_version"]) == (200, "9.1.0")
        metrics = await _metrics(http, fleet)
    assert _sample(metrics, "edgefleet_cloud_model_info", model=MODEL, version="9.1.0") == 1
    assert _sample(metrics, "edgefleet_cloud_model_info", model=MODEL, version="9.0.0") == 0


def _with_model_of(bundle: Path, model: Path, version: str, out: Path) -> Path:
    """``bundle`` re-built as ``version`` around another model: its golden vectors do not hold."""
    with bundle.open("rb") as f:
        manifest, members = read_bundle(f)
    members[manifest.model_file] = model.read_bytes()
    counter = manifest.release_counter + 1
    files = dict(manifest.files) | {manifest.model_file: file_entry(members[manifest.model_file])}
    changed = manifest.model_copy(
        update={"version": version, "release_counter": counter, "files": files}
    )
    with out.open("wb") as f:
        write_bundle(f, changed, members)
    return out


@pytest.mark.asyncio
async def test_a_release_failing_its_golden_vectors_or_an_unreachable_repository_keep_the_model(
    fleet: Fleet, cloud_bundles: dict[str, Path], models_dir: Path, tmp_path: Path
) -> None:
    wrong = _with_model_of(
        cloud_bundles["9.0.0"], models_dir / "v2.tflite", "9.2.0", tmp_path / "wrong.bundle"
    )
    fleet.repo.add_bundle(wrong, fleet.keys)  # signed: only the endpoint's own checks catch it
    await fleet.endpoint.refresh_models()
    await fleet.endpoint.refresh_models()  # refused once, not downloaded and counted again
    fleet.repository_server.close()
    await fleet.endpoint.refresh_models()
    async with aiohttp.ClientSession() as http:
        async with http.get(
            fleet.url + f"/v2/models/{MODEL}", headers=fleet.auth("dev-0")
        ) as response:
            assert (await response.json())["versions"] == ["9.0.0"]
        metrics = await _metrics(http, fleet)
    assert _sample(metrics, "edgefleet_cloud_model_refusals_total", reason="golden") == 1
    assert _sample(metrics, "edgefleet_cloud_model_refusals_total", reason="metadata") == 1
    assert _sample(metrics, "edgefleet_cloud_model_info", model=MODEL, version="9.0.0") == 1


@pytest.mark.asyncio
async def test_devices_and_quotas_come_from_either_database(
    any_url: str,
    tmp_path: Path,
    session_keys: KeyStore,
    cloud_bundles: dict[str, Path],
    golden: tuple[npt.NDArray[Any], Any],
) -> None:
    inputs, _ = golden
    async for fleet in _fleet(any_url, tmp_path, session_keys, cloud_bundles, devices=2):
        await fleet.set_plan("dev-0", rate=0.01, burst=1)
        async with aiohttp.ClientSession() as http:
            assert (await _post(http, fleet, "dev-0", _body(inputs[:1])))[0] == 200
            status, answer, _ = await _post(http, fleet, "dev-0", _body(inputs[:1]))
            assert (status, answer["reason"]) == (429, "quota")
            assert (await _post(http, fleet, "dev-1", _body(inputs[:1])))[0] == 200
            fleet.passwords["dev-1"] += "x"
            assert (await _post(http, fleet, "dev-1", _body(inputs[:1])))[0] == 401


def test_a_trust_store_refuses_a_root_other_than_the_one_it_was_provisioned_with(
    tmp_path: Path, session_keys: KeyStore, cloud_bundles: dict[str, Path]
) -> None:
    first = ImageRepository(tmp_path / "first")
    first.create(session_keys)
    first.add_bundle(cloud_bundles["9.0.0"], session_keys)
    other = ImageRepository(tmp_path / "other")
    other.create(init_keys(tmp_path / "other-keys"))

    def source(root: Path) -> ModelSource:
        return ModelSource(
            repository=str(first.path),
            trusted_root=root,
            metadata_dir=tmp_path / "store",
            hardware_id="cloud",
            loader=TFLiteRuntime().load,
        )

    report = source(first.trusted_root_path).refresh()
    assert [m.version for m in report.loaded] == ["9.0.0"] and report.refused == []
    report = source(other.trusted_root_path).refresh()
    assert report.loaded == []
    ((_, refusal),) = report.refused
    assert refusal.reason == "metadata"
    assert "is not the one the trust store" in str(refusal)
    # A store that never verified this repository's root refuses its metadata outright.
    stranger = ModelSource(
        repository=str(first.path),
        trusted_root=other.trusted_root_path,
        metadata_dir=tmp_path / "stranger",
        hardware_id="cloud",
        loader=TFLiteRuntime().load,
    ).refresh()
    assert stranger.loaded == [] and stranger.refused[0][1].reason == "metadata"


def test_the_cli_names_a_bad_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")
    code = cloud_main(
        ["--data", str(tmp_path), "--trusted-root", str(root), "--max-batch-size", "0"]
    )
    assert code == 2
    assert "--max-batch-size" in capsys.readouterr().err
    code = cloud_main(["--data", str(tmp_path), "--trusted-root", str(tmp_path / "missing.json")])
    assert code == 2
    assert "--trusted-root" in capsys.readouterr().err
