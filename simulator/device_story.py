"""The demo's device chapter: a real agent process installs, refuses and rolls back.

The operator's side is the director library (the fleet server's REST API and
``fleetctl`` assignments come later); the device is an ``edge-agent run``
process with its own data folder, talking HTTP to the repositories and
answering Open Inference Protocol requests on localhost.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import urllib3

from firmware_images.datagen import FieldConditions, generate
from fleet_server.director import DirectorRepository
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ImageRepository
from simulator.fleet_story import Device, wait_until

DEVICE = "pump-17"
HARDWARE = "rpi4-arm64"


def _say(text: str) -> None:
    print(text, flush=True)


class _Device(Device):
    """An ``edge-agent run`` process and a few ways to look at it."""

    def __init__(self, config: Path) -> None:
        super().__init__(DEVICE, config)
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5, 5))
        self.start()
        self.url = self.api

    def journal(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.data_dir / "journal.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_outcome(self, version: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            outcome = self.journal().get("last_outcome") or {}
            return outcome if outcome.get("target", {}).get("version") == version else None

        outcome: dict[str, Any] = wait_until(f"the install of {version} to end", probe)
        return outcome

    def infer(self, row: list[float]) -> dict[str, Any]:
        body = {
            "inputs": [
                {"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}
            ]
        }
        r = self.http.request("POST", f"{self.url}/v2/models/pump-health/infer", json=body)
        return {"status": r.status, **json.loads(r.data)}


def _show_answer(device: _Device, row: list[float]) -> None:
    answer = device.infer(row)
    scores = answer["outputs"][0]["data"]
    _say(
        f"  POST /v2/models/pump-health/infer -> {answer['status']}, "
        f"model {answer['model_version']} ({answer['parameters']['stage']}), "
        f"scores {[round(s, 3) for s in scores]}"
    )


def _show_outcome(outcome: dict[str, Any]) -> None:
    why = f": {outcome['reason']} — {outcome['message']}" if outcome.get("reason") else ""
    _say(f"  device: {outcome['result']} {outcome['target']['version']}{why}")


def device_story(workdir: Path, base_url: str, repo_dir: Path) -> int:
    """Run the device chapter; returns how many steps did not turn out as expected."""
    print("\n== Device: a real agent installs what the director assigns " + "=" * 12)
    repo = ImageRepository(repo_dir)
    released = {b.version: b for b in repo.bundles() if b.name == "pump-health"}
    director_keys = init_keys(workdir / "director-keys")
    director = DirectorRepository(workdir / "director")
    director.create(director_keys)
    director.register(director_keys, DEVICE)
    data_dir = workdir / DEVICE
    data_dir.mkdir()
    config = data_dir / "agent.toml"
    config.write_text(
        f'device_id = "{DEVICE}"\nhardware_id = "{HARDWARE}"\ndata_dir = "{data_dir}"\n'
        f'[image_repository]\nurl = "{base_url}/repo"\nroot = "{repo.trusted_root_path}"\n'
        f'[director]\nurl = "{base_url}/director"\nroot = "{director.trusted_root_path}"\n'
        "[api]\nport = 0\n[update]\npoll_interval_s = 0.5\nhealth_period_s = 2.0\n"
    )
    _say(f"$ edge-agent run --config {config}")
    device = _Device(config)
    _say(f"  local Open Inference Protocol API on {device.url}")
    rows, _ = generate(400, 11, FieldConditions(idle_share=0.1))
    field = [[float(v) for v in r] for r in rows]
    surprises = 0
    try:
        for version in ("1.0.0", "1.1.0"):
            _say(
                f"\n(the operator assigns pump-health {version} to {DEVICE}; the director signs it)"
            )
            director.assign(director_keys, DEVICE, HARDWARE, released[version])
            outcome = device.wait_outcome(version)
            _show_outcome(outcome)
            surprises += outcome["result"] != "committed"
            _show_answer(device, field[0])

        _say("\n(the operator assigns 1.3.0, built with a latency budget of one nanosecond)")
        director.assign(director_keys, DEVICE, HARDWARE, released["1.3.0"])
        outcome = device.wait_outcome("1.3.0")
        _show_outcome(outcome)
        surprises += outcome["result"] != "refused"

        _say(
            "\n(the operator assigns 1.2.0 = v3-bad while apps keep sending field data, "
            "a tenth of it from idle machines)"
        )
        answers: list[dict[str, Any]] = []
        done = threading.Event()

        def stream() -> None:
            i = 0
            while not done.is_set():
                answers.append(device.infer(field[i % len(field)]))
                i += 1
                time.sleep(0.01)

        sender = threading.Thread(target=stream)
        sender.start()
        director.assign(director_keys, DEVICE, HARDWARE, released["1.2.0"])
        outcome = device.wait_outcome("1.2.0")
        time.sleep(0.5)
        done.set()
        sender.join()
        _show_outcome(outcome)
        surprises += outcome["result"] != "rolled_back"
        served: dict[str, int] = {}
        for a in answers:
            key = f"{a['status']} from {a['parameters']['stage']} {a['model_version']}"
            served[key] = served.get(key, 0) + 1
        _say(f"  {len(answers)} requests during the install and rollback:")
        for key, count in sorted(served.items()):
            _say(f"    {count:4d} answered {key}")
        surprises += any(a["status"] != 200 for a in answers)
        _show_answer(device, field[0])
    finally:
        device.stop()
    print(f"\n$ edge-agent status --config {config}", flush=True)
    from agent.cli import main as edge_agent

    edge_agent(["status", "--config", str(config), "--events", "6"])
    return surprises
