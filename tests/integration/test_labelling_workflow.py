"""The labelling workflow end to end, as the README tells it: a real fleet-server process and
broker, a device uploading windows, and fleetctl processes that list the device's windows,
post labels for them from a CSV file and show the accuracy measured beside the estimate."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from firmware_images.datagen import tilted
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from model_runtime import TFLiteRuntime
from protocol.bundle import read_manifest
from protocol.manifest import Manifest
from protocol.summary import score_histogram, summarize
from protocol.topics import windows_topic
from protocol.window import WindowSummary, encode_window
from testbed.images import HARDWARE, MODELS
from testbed.server_process import DeviceClient, ServerProcess, private_broker, wait_until

pytestmark = pytest.mark.integration

ROWS_PER_WINDOW = 250


@dataclass
class Workflow:
    server: ServerProcess
    broker: str
    token: str
    manifest: Manifest

    def fleetctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "EDGEFLEET_SERVER": self.server.url,
            "EDGEFLEET_TOKEN": self.token,
        }
        return subprocess.run(
            [sys.executable, "-m", "fleet_server.fleetctl", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            env=env,
        )

    def ok(self, *args: str) -> str:
        result = self.fleetctl(*args)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout


@pytest.fixture(scope="module")
def workflow(
    tmp_path_factory: pytest.TempPathFactory, session_keys: KeyStore, bundles: dict[str, Path]
) -> Iterator[Workflow]:
    tmp_path = tmp_path_factory.mktemp("labelling")
    repo = ImageRepository(tmp_path / "repo")
    repo.create(session_keys)
    repo.add_bundle(bundles["v1"], session_keys)
    with private_broker(tmp_path / "broker") as broker:
        server = ServerProcess(
            tmp_path, db_url=None, broker=broker.url, replica_id=f"labels-{secrets.token_hex(3)}"
        )
        try:
            server.start()
            with bundles["v1"].open("rb") as source:
                manifest = read_manifest(source)
            flow = Workflow(server, broker.url, server.admin_token(), manifest)
            flow.ok("release", "push", "--repo", str(repo.path))
            yield flow
        finally:
            server.stop()


def _windows(
    manifest: Manifest, device_id: str, X: npt.NDArray[np.float64], scores: npt.NDArray[Any]
) -> list[WindowSummary]:
    """Consecutive one-minute windows of ``X`` ending a minute ago, oldest first."""
    edges = [f.edges for f in manifest.baseline.features]
    ranges = [(f.valid_min, f.valid_max) for f in manifest.features]
    count = X.shape[0] // ROWS_PER_WINDOW
    now = time.time()
    out = []
    for k in range(count):
        part = slice(k * ROWS_PER_WINDOW, (k + 1) * ROWS_PER_WINDOW)
        end = now - 60.0 * (count - k)
        out.append(
            WindowSummary(
                window_id=uuid.uuid4().hex,
                device_id=device_id,
                model_name=manifest.name,
                model_version=manifest.version,
                baseline_id=manifest.baseline.id,
                start=end - 60.0,
                end=end,
                requests=ROWS_PER_WINDOW,
                features=summarize(X[part], edges, ranges),
                scores=score_histogram(scores[part], manifest.classes or []),
            )
        )
    return out


def _publish_and_wait(workflow: Workflow, device: str, sent: list[WindowSummary]) -> None:
    """Publish ``sent`` as the device would, and wait until the server lists all of them."""
    client = DeviceClient(workflow.broker, device)
    try:
        for window in sent:
            client.publish(windows_topic(workflow.server.namespace, device), encode_window(window))
        client.flush()
    finally:
        client.close()
    path = f"/devices/{device}/windows"
    wait_until(
        f"{device}'s windows stored",
        lambda: len(workflow.server.api("GET", path, workflow.token)["windows"]) == len(sent),
    )


def test_list_windows_write_labels_post_them_and_see_measured_accuracy(
    workflow: Workflow, tmp_path: Path
) -> None:
    device = "labelled-pump-1"
    workflow.server.api(
        "POST", "/devices", workflow.token, {"device_id": device, "hardware_id": HARDWARE}
    )
    X, y = tilted({"bearing_temp_c": 1.0}, 6 * ROWS_PER_WINDOW, 301)
    scores = np.asarray(TFLiteRuntime().load(MODELS / "v1.tflite").run({"features": X})["scores"])
    predicted = scores.argmax(axis=1)
    sent = _windows(workflow.manifest, device, X.astype(np.float64), scores)
    _publish_and_wait(workflow, device, sent)

    # 1. The device's windows, newest first: their ids, ranges, versions and request counts.
    windows = json.loads(workflow.ok("devices", "windows", device, "--json"))
    assert [w["window_id"] for w in windows] == [w.window_id for w in reversed(sent)]
    assert all(
        (w["model"], w["version"], w["requests"], w["labelled"])
        == ("pump-health", "1.0.0", ROWS_PER_WINDOW, False)
        for w in windows
    )
    table = workflow.ok("devices", "windows", device, "--limit", "2")
    assert table.splitlines()[0].split() == [
        *("WINDOW", "START", "END", "MODEL", "REQUESTS", "ERRORS", "LABELLED")
    ]
    assert len(table.splitlines()) == 4 and "(more: --limit 4" in table
    ids = workflow.ok("devices", "windows", device, "--limit", "2", "--ids")
    assert ids == "".join(f"{w.window_id}\n" for w in list(reversed(sent))[:2])
    # --json replaces the ids as it replaces the table: the windows, as data.
    as_json = json.loads(
        workflow.ok("devices", "windows", device, "--limit", "2", "--ids", "--json")
    )
    assert as_json == windows[:2]
    assert workflow.ok("devices", "windows", device, "--until", "2000-01-01", "--ids") == ""

    # 2. Labels for three windows, one row per labelled prediction.
    labelled = sent[:3]
    lines = ["window_id,actual,predicted"]
    classes = workflow.manifest.classes or []
    for k, window in enumerate(labelled):
        for i in range(k * ROWS_PER_WINDOW, (k + 1) * ROWS_PER_WINDOW):
            lines.append(f"{window.window_id},{classes[y[i]]},{classes[predicted[i]]}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")

    # 3. Posted.
    out = workflow.ok("labels", "post", str(labels))
    rows = 3 * ROWS_PER_WINDOW
    right = int((predicted[:rows] == y[:rows]).sum())
    assert f"Labels of 3 windows stored (0 replaced earlier ones): {rows} predictions" in out

    # 4. Drift shows the accuracy measured on them beside the estimate.
    out = workflow.ok("drift", "--device", device)
    line = next(x for x in out.splitlines() if x.strip().startswith("accuracy:"))
    assert "estimated" in line
    assert f"measured {right / rows:.1%} on {rows} labelled predictions in 3 windows" in line
    after = json.loads(workflow.ok("devices", "windows", device, "--json"))
    assert sorted(w["window_id"] for w in after if w["labelled"]) == sorted(
        w.window_id for w in labelled
    )


def test_windows_are_paged_newest_first_and_an_unknown_device_is_refused(
    workflow: Workflow,
) -> None:
    device = "paged-pump-1"
    workflow.server.api(
        "POST", "/devices", workflow.token, {"device_id": device, "hardware_id": HARDWARE}
    )
    X, _ = tilted({}, 5 * ROWS_PER_WINDOW, 302)
    scores = np.asarray(TFLiteRuntime().load(MODELS / "v1.tflite").run({"features": X})["scores"])
    sent = _windows(workflow.manifest, device, X.astype(np.float64), scores)
    _publish_and_wait(workflow, device, sent)
    path = f"/devices/{device}/windows"
    first = workflow.server.api("GET", f"{path}?limit=3", workflow.token)
    assert first["next_before"] is not None
    second = workflow.server.api(
        "GET", f"{path}?limit=3&before={first['next_before']}", workflow.token
    )
    assert second["next_before"] is None
    ids = [w["window_id"] for w in first["windows"] + second["windows"]]
    assert ids == [w.window_id for w in reversed(sent)]
    # since/until select by the window's end.
    middle = sent[2]
    ranged = workflow.server.api(
        "GET",
        f"{path}?since={sent[1].end + 0.5:.3f}&until={middle.end + 0.5:.3f}",
        workflow.token,
    )
    assert [w["window_id"] for w in ranged["windows"]] == [middle.window_id]

    other = workflow.server.api("GET", f"{path}?version=9.9.9&model=pump-health", workflow.token)
    assert other["windows"] == [] and other["next_before"] is None
    r = workflow.server.request("GET", f"/api/v1{path}?before=garbage", token=workflow.token)
    assert r.status == 422 and b"query before" in r.data
    result = workflow.fleetctl("devices", "windows", "nobody-here")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fleetctl: ") and "nobody-here" in line
