"""TLS by configuration, with a CA and certificates the tests make themselves.

MQTT: a private Mosquitto with a TLS listener, configured by
``fleetctl broker config --tls-...``. HTTP: an aiohttp server using
:func:`fleet_server.tls.server_context`, fetched from by the agent's own
:class:`RepositoryFetcher`. Each time, a client that trusts the fleet CA gets
through, and one that does not is refused with a certificate error.
"""

from __future__ import annotations

import asyncio
import http.client
import secrets
import ssl
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
from aiohttp import web
from tuf.api import exceptions as tuf_exc

from agent.ota.transport import FetchConfig, RepositoryFetcher
from fleet_server import fleetctl
from fleet_server.tls import TLSConfigError, client_context, server_context
from protocol.topics import device_topic, ingest_subscriptions
from testbed.mosquitto import free_port, running_mosquitto
from tests.support.certs import Certificates, make_certificates

NS = "plant-7"
pytestmark = pytest.mark.integration

T = TypeVar("T")
SERVER, DEVICE = "fleet-server", "dev-a"
PASSWORDS = {SERVER: secrets.token_urlsafe(24), DEVICE: secrets.token_urlsafe(24)}
BODY = b"targets metadata, or a bundle\n" * 100
V5 = aiomqtt.ProtocolVersion.V5


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The TLS port of a Mosquitto configured by ``fleetctl broker config --tls-...``."""
    tmp = tmp_path_factory.mktemp("tls-broker")
    argv = ["broker", "config", "--out", str(tmp / "mosquitto"), "--server-user", SERVER]
    argv += ["--namespace", NS]
    for user, password in PASSWORDS.items():
        (tmp / user).write_text(password)
    argv += ["--server-password-file", str(tmp / SERVER), "--device", f"{DEVICE}:{tmp / DEVICE}"]
    plain, tls = free_port(), free_port()
    argv += ["--port", str(plain), "--tls-port", str(tls), "--bind", "127.0.0.1"]
    argv += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    argv += ["--tls-ca", str(certs.ca_cert)]
    assert fleetctl.main(argv) == 0
    with running_mosquitto(tmp / "mosquitto" / "mosquitto.conf", [plain, tls]):
        yield tls


def mqtt(port: int, user: str, context: ssl.SSLContext) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=PASSWORDS[user],
        protocol=V5,
        tls_context=context,
        timeout=5,
    )


def test_mqtt_over_tls_works_for_clients_trusting_the_fleet_ca(
    certs: Certificates, tls_port: int
) -> None:
    context = client_context(certs.ca_cert)

    async def scenario() -> aiomqtt.Message:
        async with (
            mqtt(tls_port, SERVER, context) as server,
            mqtt(tls_port, DEVICE, context) as device,
        ):
            for topic in ingest_subscriptions(NS, shared=True):
                await server.subscribe(topic, qos=1)
            await device.publish(device_topic(NS, DEVICE, "state"), b"over tls", qos=1)
            async with asyncio.timeout(5):
                return await anext(aiter(server.messages))

    message = asyncio.run(scenario())
    assert (str(message.topic), message.payload) == (device_topic(NS, DEVICE, "state"), b"over tls")


def test_mqtt_client_trusting_another_ca_is_refused(certs: Certificates, tls_port: int) -> None:
    async def connect() -> None:
        async with mqtt(tls_port, DEVICE, client_context(certs.other_ca_cert)):
            pass

    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(connect())


class HTTPSServer:
    """An aiohttp server on 127.0.0.1 serving ``root`` under ``/files/``, on its own loop."""

    def __init__(self, root: Path, context: ssl.SSLContext) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = web.Application()
        app.router.add_static("/files/", root)
        self.runner = web.AppRunner(app)
        self._call(self.runner.setup())
        self._call(web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context).start())
        self.port = self.runner.addresses[0][1]

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/files/{name}"

    def close(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("https-root")
    (root / "timestamp.json").write_bytes(BODY)
    return root


@pytest.fixture(scope="module")
def https(certs: Certificates, files: Path) -> Iterator[HTTPSServer]:
    server = HTTPSServer(files, server_context(certs.server_cert, certs.server_key))
    yield server
    server.close()


def fetch(url: str, ca_file: Path) -> bytes:
    fetcher = RepositoryFetcher(FetchConfig(ca_file=str(ca_file), connect_timeout=5))
    return fetcher.download_bytes(url, max_length=len(BODY))


def test_agent_downloads_over_https_when_it_trusts_the_fleet_ca(
    certs: Certificates, https: HTTPSServer
) -> None:
    assert fetch(https.url("timestamp.json"), certs.ca_cert) == BODY


def test_agent_refuses_a_server_its_ca_did_not_issue(
    certs: Certificates, https: HTTPSServer
) -> None:
    with pytest.raises(tuf_exc.DownloadError) as refused:
        fetch(https.url("timestamp.json"), certs.other_ca_cert)
    assert type(refused.value) is tuf_exc.DownloadError  # not an HTTP status, not slowness
    assert "certificate verify failed" in str(refused.value)
    assert https.url("timestamp.json") in str(refused.value)


def test_agent_refuses_a_certificate_for_another_host(certs: Certificates, files: Path) -> None:
    server = HTTPSServer(files, server_context(certs.wrong_host_cert, certs.wrong_host_key))
    try:
        with pytest.raises(tuf_exc.DownloadError) as refused:
            fetch(server.url("timestamp.json"), certs.ca_cert)
    finally:
        server.close()
    assert "certificate verify failed" in str(refused.value)
    assert "mismatch" in str(refused.value)


def test_server_requiring_client_certificates_admits_only_clients_with_one(
    certs: Certificates, files: Path
) -> None:
    context = server_context(certs.server_cert, certs.server_key, client_ca_file=certs.ca_cert)
    server = HTTPSServer(files, context)
    try:
        with pytest.raises(tuf_exc.DownloadError):
            fetch(server.url("timestamp.json"), certs.ca_cert)
        with_cert = client_context(certs.ca_cert)
        with_cert.load_cert_chain(certs.client_cert, certs.client_key)
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=with_cert, timeout=5)
        try:
            conn.request("GET", "/files/timestamp.json")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, BODY)
        finally:
            conn.close()
    finally:
        server.close()


def test_tls_files_that_cannot_be_used_are_named_in_the_error(
    certs: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=r"missing\.pem"):
        server_context(missing, certs.server_key)
    with pytest.raises(TLSConfigError, match="key must belong to the certificate"):
        server_context(certs.server_cert, certs.wrong_host_key)
    with pytest.raises(TLSConfigError, match=r"not\.pem"):
        client_context(not_pem)
    with pytest.raises(TLSConfigError, match=r"missing\.pem"):
        server_context(certs.server_cert, certs.server_key, client_ca_file=missing)


def test_fleetctl_wants_all_three_tls_files(
    certs: Certificates, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "server").write_text("token")
    argv = ["broker", "config", "--out", str(tmp_path / "out"), "--server-user", SERVER]
    argv += ["--namespace", NS]
    argv += ["--server-password-file", str(tmp_path / "server")]
    code = fleetctl.main([*argv, "--tls-cert", str(certs.server_cert)])
    assert code == fleetctl.EXIT_FAILED
    assert "--tls-cert, --tls-key and --tls-ca together" in capsys.readouterr().err
