"""The demo's device chapter: a standalone agent installs, rolls back and refuses.

The device is an ``edge-agent run`` process with its own data folder and no
director: it follows the image repository alone (``[image_repository] name``),
over HTTP, and answers Open Inference Protocol requests on localhost. The
release engineer releases one bundle after another with ``fleetctl release
add``; the device installs each newest release it can trust and run.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import urllib3

from agent.cli import main as edge_agent
from firmware_images.datagen import FieldConditions, generate
from fleet_server.fleetctl import main as fleetctl
from simulator.fleet_story import Device, wait_until
from testbed.images import HARDWARE

DEVICE = "pump-17"


def _say(text: str) -> None:
    print(text, flush=True)


class _Device(Device):
    """An ``edge-agent run`` process and a few ways to look at it."""

    def __init__(self, config: Path) -> None:
        super().__init__(DEVICE, config)
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))
        self.start()
        self.url = self.api

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


def _run(command: str) -> int:
    """Run a ``fleetctl`` command in process, echoing it; returns 1 if it failed."""
    print(f"\n$ {command}", flush=True)
    tool, *args = shlex.split(command)
    assert tool == "fleetctl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fleetctl(args)
    print(out.getvalue(), end="", flush=True)
    return int(code != 0)


def device_story(workdir: Path, base_url: str, keys: Path, bundles: dict[str, Path]) -> int:
    """Run the device chapter; returns how many steps did not turn out as expected.

    ``bundles`` maps each version to its bundle file; the chapter releases them
    one by one into an image repository of its own, served under ``base_url``.
    """
    print("\n== Device: a standalone agent follows an image repository " + "=" * 13)
    repo = workdir / "device-repo"
    repo.mkdir()
    surprises = _run(f"fleetctl release add {bundles['1.0.0']} --repo {repo} --keys {keys}")
    data_dir = workdir / DEVICE
    data_dir.mkdir()
    config = data_dir / "agent.toml"
    config.write_text(
        f'device_id = "{DEVICE}"\nhardware_id = "{HARDWARE}"\ndata_dir = "{data_dir}"\n'
        f'[image_repository]\nurl = "{base_url}/device-repo"\n'
        f'root = "{repo / "metadata" / "1.root.json"}"\n'
        'name = "pump-health"   # no [director]: install the newest release of this bundle\n'
        "[api]\nport = 0\n[update]\npoll_interval_s = 0.5\nhealth_period_s = 2.0\n"
    )
    _say(f"\n$ cat {config}\n{config.read_text().rstrip()}")
    _say(f"\n$ edge-agent run --config {config}")
    device = _Device(config)
    _say(f"  local Open Inference Protocol API on {device.url}")
    rows, _ = generate(400, 11, FieldConditions(idle_share=0.1))
    field = [[float(v) for v in r] for r in rows]
    try:
        outcome = device.wait_outcome("1.0.0")
        _show_outcome(outcome)
        surprises += outcome["result"] != "committed"
        _show_answer(device, field[0])

        surprises += _run(f"fleetctl release add {bundles['1.1.0']} --repo {repo} --keys {keys}")
        outcome = device.wait_outcome("1.1.0")
        _show_outcome(outcome)
        surprises += outcome["result"] != "committed"
        _show_answer(device, field[0])

        _say(
            "\n(1.2.0 = v3-bad is released while apps keep sending field data, "
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
        surprises += _run(f"fleetctl release add {bundles['1.2.0']} --repo {repo} --keys {keys}")
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

        _say("\n(1.3.0 is released, built with a latency budget of one nanosecond)")
        surprises += _run(f"fleetctl release add {bundles['1.3.0']} --repo {repo} --keys {keys}")
        outcome = device.wait_outcome("1.3.0")
        _show_outcome(outcome)
        surprises += outcome["result"] != "refused"
        _show_answer(device, field[0])
    finally:
        device.stop()
    print(f"\n$ edge-agent status --config {config}", flush=True)
    edge_agent(["status", "--config", str(config), "--events", "6"])
    return int(surprises)
