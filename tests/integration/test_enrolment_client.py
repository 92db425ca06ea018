"""The agent's enrolment client: what it retries, what it refuses, how it stores secrets.

A plain HTTP server on a free port plays a fleet server that is not ready
(503) and then refuses; the clock is faked only in that ``sleep`` records the
waits instead of waiting.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from agent.config import AgentConfig, ConfigError
from agent.enrolment import EnrolmentRefused, enrolled_config, write_secret

pytestmark = pytest.mark.integration


class _Answers(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, dict[str, object]]]] = []
    bodies: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(json.loads(self.rfile.read(length)))
        status, body = self.answers.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Answers]]]:
    handler = type("Answers", (_Answers,), {"answers": [], "bodies": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def config_for(tmp_path: Path, server: str, extra: str = "") -> AgentConfig:
    (tmp_path / "token").write_text("0123456789abcdef.s3cret\n")
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "pump-9"\nhardware_id = "rpi4-arm64"\ndata_dir = "data"\n'
        '[image_repository]\nurl = "repo"\nroot = "root.json"\n'
        '[director]\nurl = "http://x/director"\nroot = "director.json"\n'
        f'[server]\nurl = "{server}"\n'
        '[enrolment]\ntoken_file = "token"\nretry_initial_s = 1\nretry_max_s = 4\n' + extra
    )
    return AgentConfig.load(path)


def test_a_server_that_is_not_ready_is_asked_again_with_growing_waits(
    tmp_path: Path, fake_server: tuple[str, type[_Answers]]
) -> None:
    url, handler = fake_server
    handler.answers = [(503, {"error": "the database does not answer"})] * 4 + [
        (409, {"error": "device pump-9 is already registered"})
    ]
    waits: list[float] = []
    with pytest.raises(EnrolmentRefused) as refused:
        enrolled_config(config_for(tmp_path, url), {}, sleep=waits.append, jitter=lambda: 1.0)
    assert str(refused.value) == (
        f"{url} refused to enrol pump-9 (409): device pump-9 is already registered"
    )
    assert waits == [1.0, 2.0, 4.0, 4.0]  # doubling, capped at retry_max_s
    assert handler.bodies[0] == {
        "token": "0123456789abcdef.s3cret",
        "device_id": "pump-9",
        "hardware_id": "rpi4-arm64",
        "region": None,
        "timezone": None,
        "tags": [],
    }
    assert not (tmp_path / "data" / "password").exists()


def test_the_devices_time_zone_is_sent_with_its_enrolment_and_a_bad_one_refused(
    tmp_path: Path, fake_server: tuple[str, type[_Answers]]
) -> None:
    url, handler = fake_server
    handler.answers = [(409, {"error": "device pump-9 is already registered"})]
    config = config_for(tmp_path, url, 'timezone = "Asia/Tokyo"\n')
    with pytest.raises(EnrolmentRefused):
        enrolled_config(config, {}, sleep=lambda _: None, jitter=lambda: 1.0)
    assert handler.bodies[0]["timezone"] == "Asia/Tokyo"
    with pytest.raises(ConfigError, match=r"enrolment\.timezone: .*Mars/Olympus"):
        config_for(tmp_path, url, 'timezone = "Mars/Olympus"\n')


def test_a_namespace_the_file_contradicts_is_refused_naming_both(tmp_path: Path) -> None:
    config = config_for(tmp_path, "http://127.0.0.1:9", '[mqtt]\nnamespace = "plant-7"\n')
    config.data_dir.mkdir()
    (config.data_dir / "password").write_text("pw\n")
    record = {"device_id": "pump-9", "server": "x", "mqtt_namespace": "fleet-0123456789ab"}
    (config.data_dir / "enrolment.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="the file says plant-7, but the server named fleet-0123"):
        enrolled_config(config, {})
    # Enrolled before: no request is made, the stored namespace is used.
    plain = config_for(tmp_path, "http://127.0.0.1:9")
    assert enrolled_config(plain, {}).mqtt.namespace == "fleet-0123456789ab"


def test_a_secret_is_never_readable_by_others_even_over_a_stale_temporary_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "creds" / "password"
    target.parent.mkdir()
    stale = target.with_name(".password.tmp")
    stale.write_text("left by a crash")
    stale.chmod(0o644)
    old = os.umask(0)
    try:
        write_secret(target, b"s3cret\n")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"s3cret\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not stale.exists()
    write_secret(target, b"again\n")
    assert target.read_bytes() == b"again\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
