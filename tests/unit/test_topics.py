"""Topic namespaces: every deployment's topics and share group are its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet_server.config import ServerConfig
from protocol.broker_url import BrokerAddress, BrokerUrlError, parse_broker_url
from protocol.topics import (
    NamespaceError,
    check_namespace,
    device_topic,
    ingest_subscriptions,
    parse_device_topic,
    share_group,
)


def test_topics_live_under_the_namespace_and_parse_only_there() -> None:
    topic = device_topic("plant-7", "pump-1", "events")
    assert topic == "edgefleet/v1/plant-7/devices/pump-1/events"
    assert parse_device_topic("plant-7", topic) == ("pump-1", "events")
    assert parse_device_topic("plant-8", topic) is None
    assert parse_device_topic("plant-7", "edgefleet/v1/devices/pump-1/events") is None


def test_the_share_group_is_derived_from_the_namespace() -> None:
    assert share_group("plant-7") != share_group("plant-8")
    for topic in ingest_subscriptions("plant-7"):
        assert topic.startswith("$share/edgefleet-plant-7/edgefleet/v1/plant-7/devices/+/")
    assert all(
        t.startswith("edgefleet/v1/plant-7/") for t in ingest_subscriptions("plant-7", False)
    )


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "$sys", "a b", "-x", "x" * 65, "é"])
def test_a_namespace_is_one_safe_topic_segment(bad: str) -> None:
    with pytest.raises(NamespaceError, match="not a valid MQTT namespace"):
        check_namespace(bad)
    with pytest.raises(NamespaceError):
        device_topic(bad, "pump-1", "events")


def config(**fields: object) -> ServerConfig:
    return ServerConfig.model_validate({"data_dir": "/tmp/unused", **fields})


def test_the_default_namespace_is_the_databases_and_shared_by_its_replicas(tmp_path: Path) -> None:
    db = "postgresql://edgefleet:secret@DB.example:5432/fleet"
    a = config(db_url=db, replica_id="a")
    # Another replica on the same database, spelled with another driver and user.
    b = config(db_url="postgresql+asyncpg://other@db.example/fleet", replica_id="b")
    other = config(db_url="postgresql://edgefleet@db.example/fleet2")
    assert a.namespace == b.namespace and a.deployment_id == b.deployment_id
    assert other.namespace != a.namespace and other.deployment_id != a.deployment_id
    assert "secret" not in a.deployment and check_namespace(a.namespace) == a.namespace
    here = config(db_url=f"sqlite:///{tmp_path}/x/../fleet.db")
    assert here.namespace == config(db_url=f"sqlite:///{tmp_path}/fleet.db").namespace
    assert here.namespace != config(db_url=f"sqlite:///{tmp_path}/other.db").namespace
    assert config(db_url=db, mqtt_namespace="plant-7").namespace == "plant-7"


def test_the_server_refuses_an_unsafe_namespace() -> None:
    with pytest.raises(ValidationError, match="not a valid MQTT namespace"):
        config(db_url="sqlite:///x.db", mqtt_namespace="a/#")


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("mqtt://127.0.0.1", BrokerAddress("127.0.0.1", 1883, False)),
        ("mqtt://broker.example:18883", BrokerAddress("broker.example", 18883, False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, True)),
        ("mqtt://[::1]:1884/", BrokerAddress("::1", 1884, False)),
    ],
)
def test_a_broker_url_names_host_port_and_tls(url: str, address: BrokerAddress) -> None:
    assert parse_broker_url(url) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:18883", "has no scheme"),
        ("broker.example", "has no scheme"),
        ("localhost:1883", "has no scheme"),
        ("http://127.0.0.1:1883", "unknown scheme 'http'"),
        ("mqtt://", "names no host"),
        ("mqtt://host:99999", "the port must be a number"),
        ("mqtt://host/path", "no path or query"),
        ("mqtt://user:pw@host", "credentials do not belong"),
    ],
)
def test_a_broker_url_that_is_not_mqtt_host_port_is_refused(url: str, message: str) -> None:
    with pytest.raises(BrokerUrlError, match=message):
        parse_broker_url(url)
