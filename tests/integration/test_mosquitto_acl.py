"""The broker side of the security model, against a real, private Mosquitto.

The broker runs on exactly the files ``fleetctl broker config`` writes. To
show that a message was *not* delivered without sleeping, each test follows
the forbidden message with an allowed sentinel on the same path: the broker
handles one connection's packets in order, so once the sentinel arrives,
anything delivered before it has arrived too.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fleet_server import fleetctl
from fleet_server.broker_config import check_password, password_hash
from protocol.topics import desired_topic, device_topic, ingest_subscriptions
from testbed.mosquitto import Mosquitto, free_port, running_mosquitto

NS = "plant-7"
pytestmark = pytest.mark.integration

SERVER, A, B = "fleet-server", "dev-a", "dev-b"
V5, V311 = aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311
NOT_AUTHORIZED = 135
TIMEOUT = 5.0
_ids = itertools.count()


@dataclass(frozen=True)
class Fleet:
    broker: Mosquitto
    port: int
    passwords: dict[str, str]
    config_dir: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A broker configured by ``fleetctl broker config`` for the server and two devices."""
    tmp = tmp_path_factory.mktemp("broker")
    passwords = {user: secrets.token_urlsafe(24) for user in (SERVER, A, B)}
    for user, password in passwords.items():
        (tmp / f"{user}.password").write_text(password + "\n")
    port = free_port()
    out = tmp / "mosquitto"
    argv = ["broker", "config", "--out", str(out), "--server-user", SERVER, "--namespace", NS]
    argv += ["--server-password-file", str(tmp / f"{SERVER}.password")]
    for device in (A, B):
        argv += ["--device", f"{device}:{tmp / f'{device}.password'}"]
    argv += ["--port", str(port), "--bind", "127.0.0.1"]
    assert fleetctl.main(argv) == 0
    with running_mosquitto(out / "mosquitto.conf", [port]) as broker:
        yield Fleet(broker, port, passwords, out)


def client(
    fleet: Fleet, user: str, *, protocol: aiomqtt.ProtocolVersion = V5, **options: object
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        fleet.port,
        username=user,
        password=fleet.passwords[user],
        identifier=f"{user}-{next(_ids)}",
        protocol=protocol,
        **options,  # type: ignore[arg-type]
    )


async def receive_until(c: aiomqtt.Client, sentinel: bytes) -> list[aiomqtt.Message]:
    """Every message ``c`` receives up to and including the one carrying ``sentinel``."""
    received = []
    async with asyncio.timeout(TIMEOUT):
        async for message in c.messages:
            received.append(message)
            if message.payload == sentinel:
                return received
    raise AssertionError("the message stream ended")


def paho_client(fleet: Fleet, user: str) -> paho.Client:
    """A connected paho client: unlike aiomqtt, it reports PUBACK reason codes."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{user}-{next(_ids)}",
        protocol=paho.MQTTv5,
    )
    c.username_pw_set(user, fleet.passwords[user])
    c.connect("127.0.0.1", fleet.port)
    c.loop_start()
    return c


def test_password_hashes_are_mosquitto_passwds_format(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is not installed (it comes with mosquitto)", pytrace=False)
    subprocess.run([tool, "-b", "-c", str(tmp_path / "passwd"), "dev-a", "s3cret"], check=True)
    stored = (tmp_path / "passwd").read_text().strip().split(":", 1)[1]
    _, _, iterations, salt, _ = stored.split("$")
    assert password_hash("s3cret", salt=base64.b64decode(salt), iterations=int(iterations)) == (
        stored
    )
    assert check_password("s3cret", stored)
    assert not check_password("s3cret ", stored)


def test_broker_files_are_private(fleet: Fleet) -> None:
    for name in ("mosquitto.conf", "passwd", "acl"):
        assert stat.S_IMODE((fleet.config_dir / name).stat().st_mode) == 0o600, name
    passwd = (fleet.config_dir / "passwd").read_text()
    assert all(password not in passwd for password in fleet.passwords.values())


def test_device_report_reaches_the_server_through_its_shared_subscription(fleet: Fleet) -> None:
    async def scenario() -> list[aiomqtt.Message]:
        async with client(fleet, SERVER) as server, client(fleet, A) as device:
            for topic in ingest_subscriptions(NS, shared=True):
                await server.subscribe(topic, qos=1)
            await device.publish(device_topic(NS, A, "heartbeat"), b"beat-1", qos=1)
            return await receive_until(server, b"beat-1")

    received = asyncio.run(scenario())
    assert [(str(m.topic), m.payload) for m in received][-1] == (
        device_topic(NS, A, "heartbeat"),
        b"beat-1",
    )


@pytest.mark.parametrize(
    "topic",
    [
        device_topic(NS, B, "state"),
        device_topic(NS, B, "presence"),
        desired_topic(NS, B),
        desired_topic(NS, A),  # a device must not set its own desired state
        f"{device_topic(NS, A, 'state')}/extra",
        "edgefleet/v1/fleet",
        device_topic("another-fleet", A, "state"),  # its own id, another deployment's topics
        f"edgefleet/v1/{NS}/server/claim",  # only servers hold the namespace
    ],
)
def test_device_publish_outside_its_own_channels_is_not_authorized(
    fleet: Fleet, topic: str
) -> None:
    acks: dict[int, ReasonCode] = {}
    c = paho_client(fleet, A)
    c.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason)
    try:
        allowed = c.publish(device_topic(NS, A, "events"), b"ok", qos=1)
        refused = c.publish(topic, b"forged", qos=1)
        allowed.wait_for_publish(TIMEOUT)
        refused.wait_for_publish(TIMEOUT)
    finally:
        c.disconnect()
        c.loop_stop()
    assert not acks[allowed.mid].is_failure, acks[allowed.mid]  # success, or no subscribers
    assert acks[refused.mid] == NOT_AUTHORIZED, acks[refused.mid]


@pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt3.1.1", "mqtt5"])
def test_device_publish_under_another_prefix_is_not_delivered(
    fleet: Fleet, protocol: aiomqtt.ProtocolVersion
) -> None:
    async def scenario() -> tuple[list[aiomqtt.Message], list[aiomqtt.Message]]:
        async with (
            client(fleet, SERVER) as server,
            client(fleet, B) as victim,
            client(fleet, A, protocol=protocol) as attacker,
        ):
            for topic in ingest_subscriptions(NS, shared=True):
                await server.subscribe(topic, qos=1)
            await victim.subscribe(desired_topic(NS, B), qos=1)
            await attacker.publish(device_topic(NS, B, "state"), b"forged state", qos=1)
            await attacker.publish(desired_topic(NS, B), b"forged desired", qos=1)
            await attacker.publish(device_topic(NS, A, "state"), b"sentinel-a", qos=1)
            await server.publish(desired_topic(NS, B), b"sentinel-b", qos=1)
            return await receive_until(server, b"sentinel-a"), await receive_until(
                victim, b"sentinel-b"
            )

    to_server, to_victim = asyncio.run(scenario())
    assert all(not m.payload.startswith(b"forged") for m in to_server + to_victim)


def test_device_cannot_read_another_devices_desired_state(fleet: Fleet) -> None:
    async def scenario() -> list[aiomqtt.Message]:
        async with client(fleet, SERVER) as server:
            await server.publish(desired_topic(NS, B), b"secret for dev-b", qos=1, retain=True)
            await server.publish(desired_topic(NS, A), b"for dev-a", qos=1, retain=True)
            async with client(fleet, A) as device:
                # Mosquitto 2.0 grants these SUBSCRIBEs and withholds what may not be read.
                for topic in (desired_topic(NS, B), f"edgefleet/v1/{NS}/devices/+/desired", "#"):
                    await device.subscribe(topic, qos=1)
                await server.publish(desired_topic(NS, A), b"sentinel", qos=1)
                return await receive_until(device, b"sentinel")

    received = asyncio.run(scenario())
    assert {str(m.topic) for m in received} == {desired_topic(NS, A)}
    assert b"for dev-a" in [m.payload for m in received]
    assert b"secret for dev-b" not in [m.payload for m in received]


def test_server_sets_a_retained_desired_state_only_its_device_receives(fleet: Fleet) -> None:
    async def scenario() -> tuple[list[aiomqtt.Message], list[aiomqtt.Message]]:
        async with client(fleet, SERVER) as server:
            await server.publish(desired_topic(NS, A), b"bundle v2 for dev-a", qos=1, retain=True)
            async with client(fleet, A) as device, client(fleet, B) as other:
                await device.subscribe(desired_topic(NS, A), qos=1)
                await other.subscribe(desired_topic(NS, A), qos=1)
                await other.subscribe("edgefleet/#", qos=1)
                await server.publish(desired_topic(NS, B), b"sentinel-b", qos=1)
                return await receive_until(device, b"bundle v2 for dev-a"), await receive_until(
                    other, b"sentinel-b"
                )

    to_device, to_other = asyncio.run(scenario())
    assert to_device[-1].retain and str(to_device[-1].topic) == desired_topic(NS, A)
    assert {str(m.topic) for m in to_other} == {desired_topic(NS, B)}


def test_a_will_under_another_prefix_is_not_delivered(fleet: Fleet) -> None:
    def die_with_will(topic: str, payload: bytes) -> None:
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{A}-{next(_ids)}", protocol=paho.MQTTv5
        )
        c.username_pw_set(A, fleet.passwords[A])
        c.will_set(topic, payload, qos=1)
        c.connect("127.0.0.1", fleet.port)
        c.loop_start()
        c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        c.loop_stop()

    async def scenario() -> list[aiomqtt.Message]:
        async with client(fleet, SERVER) as server:
            presence = next(
                t for t in ingest_subscriptions(NS, shared=True) if t.endswith("/presence")
            )
            await server.subscribe(presence, qos=1)
            await asyncio.to_thread(
                die_with_will, device_topic(NS, B, "presence"), b"forged offline"
            )
            await asyncio.to_thread(
                die_with_will, device_topic(NS, A, "presence"), b"dev-a offline"
            )
            return await receive_until(server, b"dev-a offline")

    received = asyncio.run(scenario())
    assert [m.payload for m in received] == [b"dev-a offline"]


@pytest.mark.parametrize(
    ("username", "password"),
    [(A, "not-the-password"), ("stranger", "whatever"), (None, None), (A, None)],
    ids=["wrong-password", "unknown-user", "anonymous", "no-password"],
)
@pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt3.1.1", "mqtt5"])
def test_connection_without_valid_credentials_is_refused(
    fleet: Fleet, username: str | None, password: str | None, protocol: aiomqtt.ProtocolVersion
) -> None:
    async def connect() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", fleet.port, username=username, password=password, protocol=protocol
        ):
            pass

    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        asyncio.run(connect())
    assert refused.value.rc == NOT_AUTHORIZED


@pytest.mark.parametrize("device_id", ["dev+a", "dev#", "site/dev-a", "-dev"])
def test_fleetctl_refuses_a_device_id_that_could_escape_its_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device_id: str
) -> None:
    secret = tmp_path / "password"
    secret.write_text("token\n")
    argv = ["broker", "config", "--out", str(tmp_path / "out"), "--server-user", SERVER]
    argv += ["--namespace", NS]
    argv += ["--server-password-file", str(secret), f"--device={device_id}:{secret}"]
    code = fleetctl.main(argv)
    err = capsys.readouterr().err
    assert code == fleetctl.EXIT_FAILED
    assert err.startswith("fleetctl: device id") and device_id in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "passwd").exists()


@pytest.mark.parametrize("namespace", ["a/b", "+", "#", "plant 7"])
def test_fleetctl_refuses_a_namespace_that_is_not_one_topic_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    secret = tmp_path / "password"
    secret.write_text("token\n")
    argv = ["broker", "config", "--out", str(tmp_path / "out"), "--server-user", SERVER]
    argv += ["--namespace", namespace, "--server-password-file", str(secret)]
    code = fleetctl.main(argv)
    err = capsys.readouterr().err
    assert code == fleetctl.EXIT_FAILED
    assert "not a valid MQTT namespace" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "acl").exists()
