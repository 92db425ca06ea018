"""A real ``edge-agent run`` counts what it did, and ``GET /metrics`` says so exactly.

The agent installs v1, serves, installs v3-bad (which answers NaN for idle
machines: the previous model answers for it until the watchdog rolls it
back), refuses a bundle that fails its self-test, keeps telemetry windows
for a server that never acknowledges them, and loses and regains its
private Mosquitto. Every figure is read with prometheus-client's own parser
and compared with what the answers, the journal, the outbox file and the
broker said.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.release.bundle_builder import BundleSpec, build_bundle
from fleet_server.release.keys import KeyStore, init_keys
from protocol.manifest import ResourceBudget
from testbed.fleet import AgentProcess, Fleet
from testbed.images import HARDWARE, MODELS, make_bundle
from testbed.mosquitto import free_port, running_mosquitto

pytestmark = pytest.mark.integration

DEVICE = "metrics-1"
Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Figures:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_label(figures: Figures, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in figures.items() if n == name}


def requests_by(figures: Figures) -> dict[str, float]:
    return {
        f"{dict(k)['stage']}/{dict(k)['outcome']}": v
        for (n, k), v in figures.items()
        if n == "edgefleet_agent_inference_requests_total" and v
    }


def field_rows(n: int, idle_share: float, seed: int) -> list[list[float]]:
    from firmware_images.datagen import FieldConditions, generate

    x, _ = generate(n, seed, FieldConditions(idle_share=idle_share))
    return [[float(v) for v in row] for row in x]


def outbox_file(data_dir: Path) -> tuple[int, int]:
    """Windows and bytes in the agent's outbox, read from its SQLite file."""
    db = sqlite3.connect(f"file:{data_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM windows").fetchone()
    finally:
        db.close()
    return int(count), int(size)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    keys: tuple[KeyStore, KeyStore] = (
        init_keys(tmp_path / "keys" / "release"),
        init_keys(tmp_path / "keys" / "director"),
    )
    f = Fleet(tmp_path / "fleet", *keys)
    f.director.register(f.director_keys, DEVICE)
    yield f
    f.close()


def test_a_running_agent_serves_its_own_metrics(
    tmp_path: Path, fleet: Fleet, bundles: dict[str, Path]
) -> None:
    port = free_port()
    broker_conf = tmp_path / "broker" / "mosquitto.conf"
    broker_conf.parent.mkdir()
    broker_conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    bad = make_bundle(tmp_path, "v3-bad", "3.0.0")
    slow = build_bundle(
        (MODELS / "cloud.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name="pump-health",
            version="4.0.0",
            hardware_ids=[HARDWARE],
            budget=ResourceBudget(max_latency_ms=1e-6),
        ),
    )
    slow.write(tmp_path / "slow.bundle")
    config = fleet.agent_config(
        DEVICE,
        update={"health_period_s": 3.0},
        server={"broker": f"mqtt://127.0.0.1:{port}"},
        mqtt={
            "namespace": f"metrics-test-{secrets.token_hex(4)}",
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.3,
        },
        telemetry={"window_max_requests": 4, "window_max_seconds": 3600.0},
    )
    answered: Counter[str] = Counter()

    def serve(rows: list[list[float]]) -> list[tuple[str, str]]:
        served = []
        for row in rows:
            r = agent.infer(url, [row])
            assert r.status == 200, r.data
            body = json.loads(r.data)
            answered[f"{body['parameters']['stage']}/ok"] += 1
            served.append((body["parameters"]["stage"], body["model_version"]))
        return served

    with running_mosquitto(broker_conf, [port]):
        agent = AgentProcess(config)
        url = agent.wait_ready()
        agent.wait_for(
            "the MQTT link", lambda: scrape(url)[("edgefleet_agent_mqtt_connected", ())] == 1
        )

        # No model yet: refused as unavailable.
        assert agent.infer(url, field_rows(1, 0.0, 1)).status == 503
        fleet.assign(DEVICE, fleet.release(bundles["v1"]))
        agent.wait_for(
            "v1 committed",
            lambda: (agent.journal().get("installed") or {}).get("version") == "1.0.0",
        )
        assert set(serve(field_rows(6, 0.0, 2))) == {("active", "1.0.0")}
        assert agent.infer(url, [[-1.0] * 16]).status == 422  # out of the valid ranges

        # v3-bad: idle machines are answered by v1 until the watchdog rolls v3-bad back.
        fleet.assign(DEVICE, fleet.release(bad))
        agent.wait_for("v3-bad in trial", lambda: agent.journal().get("phase") == "trial")
        idle = field_rows(40, 1.0, 3)
        served = []
        while (agent.journal().get("last_outcome") or {}).get("result") != "rolled_back":
            served += serve(idle[len(served) % 40 : len(served) % 40 + 1])
            assert len(served) < 200, "the watchdog never rolled v3-bad back"
        assert ("previous", "1.0.0") in served, served
        assert serve(idle[:2]) == [("active", "1.0.0")] * 2

        # A bundle whose self-test fails is refused.
        fleet.assign(DEVICE, fleet.release(tmp_path / "slow.bundle"))
        agent.wait_for(
            "the refusal",
            lambda: (agent.journal().get("last_outcome") or {}).get("result") == "refused",
        )

        figures = scrape(url)
        assert requests_by(figures) == {
            **answered,
            "none/unavailable": 1,
            "none/client_error": 1,
        }
        assert answered["previous/ok"] >= 1
        counts = by_label(figures, "edgefleet_agent_inference_duration_seconds_count", "stage")
        assert counts == {
            "active": answered["active/ok"],
            "previous": answered["previous/ok"],
            "cloud": 0,
            "safe_default": 0,
        }
        assert by_label(figures, "edgefleet_agent_installs_total", "result") == {
            "installed": 2,
            "committed": 1,
            "rolled_back": 1,
            "refused": 1,
            "fleet_rolled_back": 0,
        }
        refusals = by_label(figures, "edgefleet_agent_install_refusals_total", "reason")
        assert {r: v for r, v in refusals.items() if v} == {"self-test-failed": 1}
        rollbacks = by_label(figures, "edgefleet_agent_install_rollbacks_total", "reason")
        assert rollbacks == {"watchdog": 1, "crash-loop": 0, "other": 0}
        models = [
            (dict(k)["slot"], dict(k)["name"], dict(k)["version"], v)
            for (n, k), v in figures.items()
            if n == "edgefleet_agent_model_info"
        ]
        assert models == [("active", "pump-health", "1.0.0", 1)]

        # Nothing acknowledges the windows: they wait in the outbox, as the file says.
        def depth_agrees() -> bool:
            figures = scrape(url)
            reported = (
                figures[("edgefleet_agent_telemetry_outbox_windows", ())],
                figures[("edgefleet_agent_telemetry_outbox_bytes", ())],
            )
            return reported == outbox_file(agent.data_dir) and reported[0] > 0

        agent.wait_for("the outbox depth in /metrics to match the outbox", depth_agrees)
        assert scrape(url)[("edgefleet_agent_mqtt_reconnects_total", ())] == 0

    # The broker is gone, then back.
    agent.wait_for(
        "the link down", lambda: scrape(url)[("edgefleet_agent_mqtt_connected", ())] == 0
    )
    with running_mosquitto(broker_conf, [port]):
        agent.wait_for(
            "the link up", lambda: scrape(url)[("edgefleet_agent_mqtt_connected", ())] == 1
        )
        assert scrape(url)[("edgefleet_agent_mqtt_reconnects_total", ())] == 1
        assert agent.stop() == 0
