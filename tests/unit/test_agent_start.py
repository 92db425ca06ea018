"""``edge-agent run`` serves first: the parts that do not answer requests start behind the API.

Before the local API listens the agent checks and loads its installed models
and builds what answers a request; telemetry, the shadow, the hybrid plan and
the MQTT link are built once it listens, their modules loaded meanwhile. What
those parts would have seen in between (answers, installer events) reaches
them once they exist. Real models, a real outbox; no broker is connected to.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import daemon as agent_daemon
from agent.config import AgentConfig, ConfigError
from agent.daemon import AgentDaemon
from agent.serving import ModelSlot
from model_runtime import default_runtime
from protocol.bundle import read_bundle
from testbed.images import MODELS
from tests.support.agent_toml import AGENT_HEAD

AGENT_TOML = (
    AGENT_HEAD
    + """[director]
url = "http://127.0.0.1:9/director"
root = "trust/director-root.json"
[api]
port = 0
"""
)
BROKER = '[server]\nbroker = "mqtt://127.0.0.1:9"\n[mqtt]\nnamespace = "start-test"\n'

# Modules of the parts built after the API listens, and of enrolling: none is loaded before.
NOT_BEFORE_READY = (
    "agent.telemetry.window",
    "agent.telemetry.fold",
    "protocol.window",
    "agent.ota.shadow",
    "agent.ota.shadow_steps",
    "agent.ota.plan",
    "protocol.messages",
    "agent.mqtt.link",
    "aiomqtt",
    "paho",
    "protocol.api.devices",
    "urllib3",
)


def agent_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML + extra)
    (tmp_path / "data").mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def v2(bundles: dict[str, Path]) -> ModelSlot:
    with bundles["v2"].open("rb") as f:
        manifest = read_bundle(f)[0]
    return ModelSlot(manifest, default_runtime().load(MODELS / "v2.tflite"))


def test_the_agent_listens_before_it_loads_what_does_not_serve(tmp_path: Path) -> None:
    path = agent_config(tmp_path, BROKER)
    probe = (
        "import asyncio, json, os, sys\n"
        "from pathlib import Path\n"
        "import agent.cli\n"
        "from agent.config import AgentConfig\n"
        "from agent.daemon import AgentDaemon\n"
        "from agent.enrolment import enrolled_config\n"
        f"path = Path({str(path)!r})\n"
        "config = enrolled_config(AgentConfig.load(path), os.environ)\n"
        "async def main():\n"
        "    daemon = AgentDaemon(config, path, serving_first=True)\n"
        "    await daemon.installer.recover()\n"
        "    await daemon.api.start()\n"
        "    loaded = sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[1:])))\n"
        "    await daemon.api.close()\n"
        "    print(json.dumps(loaded))\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *NOT_BEFORE_READY],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.asyncio
async def test_answers_served_before_the_telemetry_exists_are_summarised_once_it_does(
    tmp_path: Path, v2: ModelSlot
) -> None:
    path = agent_config(tmp_path)
    daemon = AgentDaemon(AgentConfig.load(path), path, serving_first=True)
    assert (daemon.recorder, daemon.outbox, daemon.shadow, daemon.plan) == (None,) * 4
    daemon.chain.set_models(active=v2, previous=None)  # as the recovery publishes them
    rows = np.load(MODELS / "baseline.npy")[:3].astype(np.float32)
    for row in rows:
        await daemon.chain.infer({"features": row[None, :]})
    daemon._build_background_parts()
    try:
        assert daemon.recorder is not None and daemon.outbox is not None
        assert daemon.shadow is not None and daemon.plan is not None
        daemon.recorder.close_window()
        window = daemon.recorder.poll()
        assert window is not None
        assert window.model_version == v2.manifest.version
        assert window.requests == 3
    finally:
        daemon.outbox.close()


def test_installer_events_before_the_link_exists_are_sent_by_it(tmp_path: Path) -> None:
    path = agent_config(tmp_path, BROKER)
    daemon = AgentDaemon(AgentConfig.load(path), path, serving_first=True)
    assert daemon.link is None
    daemon.installer.record_event("shadow-refused", {"message": "over its memory budget"})
    daemon._build_background_parts()
    try:
        assert daemon.link is not None
        sent = [event.event for event in daemon.link._events]
        assert sent == ["shadow-refused"]
    finally:
        assert daemon.outbox is not None
        daemon.outbox.close()


def test_a_daemon_built_whole_has_every_part_before_it_runs(tmp_path: Path) -> None:
    path = agent_config(tmp_path, BROKER)
    daemon = AgentDaemon(AgentConfig.load(path), path)
    try:
        assert daemon.recorder is not None and daemon.outbox is not None
        assert daemon.shadow is not None and daemon.plan is not None
        assert daemon.link is not None
    finally:
        assert daemon.outbox is not None
        daemon.outbox.close()


@pytest.mark.parametrize("serving_first", [False, True])
def test_a_link_file_the_agent_cannot_use_stops_it_before_it_serves(
    tmp_path: Path, serving_first: bool
) -> None:
    path = agent_config(tmp_path, BROKER + '[credentials]\npassword_file = "missing"\n')
    with pytest.raises(ConfigError, match=r"credentials\.password_file: cannot read"):
        AgentDaemon(AgentConfig.load(path), path, serving_first=serving_first)


@pytest.mark.asyncio
async def test_requests_get_the_gil_back_soon_while_the_background_modules_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = agent_config(tmp_path)
    daemon = AgentDaemon(AgentConfig.load(path), path, serving_first=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    seen: list[float] = []
    load = agent_daemon._load_background_modules

    def loading(config: AgentConfig) -> None:
        seen.append(sys.getswitchinterval())
        load(config)
        loop.call_soon_threadsafe(stop.set)  # the agent stops once its parts are built

    monkeypatch.setattr(agent_daemon, "_load_background_modules", loading)
    before = sys.getswitchinterval()
    await asyncio.wait_for(daemon.run(stop), 60)
    assert seen == [pytest.approx(agent_daemon.BACKGROUND_SWITCH_INTERVAL_S)]
    assert seen[0] < before
    assert sys.getswitchinterval() == before


@pytest.mark.asyncio
@pytest.mark.parametrize("held", [True, False])
async def test_a_collector_held_off_during_the_start_is_back_on_once_the_api_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    path = agent_config(tmp_path)
    daemon = AgentDaemon(AgentConfig.load(path), path, serving_first=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    seen: list[tuple[bool, bool]] = []
    load = agent_daemon._load_background_modules

    def loading(config: AgentConfig) -> None:
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        load(config)
        loop.call_soon_threadsafe(stop.set)

    monkeypatch.setattr(agent_daemon, "_load_background_modules", loading)
    if held:
        gc.disable()  # as edge-agent run does from its start
    try:
        await asyncio.wait_for(daemon.run(stop), 60)
        # On while the API serves; what the start built frozen only until the rest is built.
        assert seen == [(True, held)]
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_refused_start_leaves_the_collector_on(tmp_path: Path) -> None:
    from agent.cli import main

    path = agent_config(tmp_path, "[api]\nport = -1\n")  # a second [api]: not TOML
    assert gc.isenabled()
    assert main(["run", "--config", str(path)]) == 1
    assert gc.isenabled()
