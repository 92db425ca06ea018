"""The agent's TOML configuration: a wrong file is refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError
from tests.support.agent_toml import AGENT_HEAD

GOOD = (
    AGENT_HEAD
    + """[director]
url = "http://fleet.example/director"
root = "trust/director-root.json"
"""
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    config = AgentConfig.load(write(tmp_path, GOOD))
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.image_repository.root == (tmp_path / "trust/image-root.json").resolve()
    assert config.image_repository.url == str((tmp_path / "repo").resolve())
    assert config.director.url == "http://fleet.example/director"  # URLs stay as they are


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('device_id = "pump-17"\n', ""), "device_id: Field required"),
        (GOOD.replace('"pump-17"', '"pump 17/a"'), "device_id: String should match pattern"),
        (GOOD.replace('"rpi4-arm64"', '"rpi4 arm64"'), "hardware_id: Value error"),
        (GOOD + "[api]\nport = 70000\n", "api.port: Input should be less than or equal to 65535"),
        (
            GOOD + "[update]\npoll_interval_s = 0\n",
            "update.poll_interval_s: Input should be greater",
        ),
        (GOOD + "colour = 'blue'\n", "colour: Extra inputs are not permitted"),
        (GOOD + "[update\n", "not valid TOML"),
    ],
)
def test_a_wrong_file_is_refused_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: ") as refused:
        AgentConfig.load(write(tmp_path, text))
    assert message in str(refused.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        AgentConfig.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("setting", "max_overhead"),
    [("", 0.2), ("max_overhead = 0.05\n", 0.05), ("max_overhead = 1\n", 1.0)],
)
def test_summaries_are_bounded_to_a_share_of_inference_time_by_default(
    tmp_path: Path, setting: str, max_overhead: float
) -> None:
    config = AgentConfig.load(write(tmp_path, GOOD + "[telemetry]\n" + setting))
    assert config.telemetry.max_overhead == max_overhead


@pytest.mark.parametrize("setting", ["max_overhead = 0\n", "max_overhead = false\n"])
def test_zero_or_false_summarises_every_request(tmp_path: Path, setting: str) -> None:
    config = AgentConfig.load(write(tmp_path, GOOD + "[telemetry]\n" + setting))
    assert config.telemetry.max_overhead == 0.0


@pytest.mark.parametrize(
    "setting",
    [
        "max_overhead = -0.1\n",
        "max_overhead = true\n",
        "max_overhead = 'low'\n",
        "max_overhead = inf\n",
        "max_overhead = nan\n",
    ],
)
def test_a_wrong_max_overhead_is_refused_saying_what_it_takes(tmp_path: Path, setting: str) -> None:
    with pytest.raises(ConfigError) as refused:
        AgentConfig.load(write(tmp_path, GOOD + "[telemetry]\n" + setting))
    message = str(refused.value)
    assert "telemetry.max_overhead:" in message
    assert "such as 0.2, or 0 or false to summarise every request" in message


@pytest.mark.parametrize(("setting", "max_overhead"), [("0.05", 0.05), ("false", None)])
def test_the_agent_bounds_its_summaries_as_configured(
    tmp_path: Path, setting: str, max_overhead: float | None
) -> None:
    from agent.daemon import AgentDaemon

    path = write(tmp_path, GOOD + f"[telemetry]\nmax_overhead = {setting}\n")
    (tmp_path / "data").mkdir()
    daemon = AgentDaemon(AgentConfig.load(path), path)
    assert daemon.recorder is not None and daemon.outbox is not None
    daemon.outbox.close()
    assert daemon.recorder.policy.max_overhead == max_overhead


BROKER = '[server]\nbroker = "mqtt://127.0.0.1:1883"\n'


def test_the_namespace_comes_from_the_file(tmp_path: Path) -> None:
    config = AgentConfig.load(write(tmp_path, GOOD + BROKER + '[mqtt]\nnamespace = "plant-7"\n'))
    assert config.mqtt.namespace == "plant-7"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + BROKER, "mqtt.namespace: required with server.broker"),
        (GOOD + BROKER + '[mqtt]\nnamespace = "a/b"\n', "mqtt.namespace: Value error, must be"),
        (GOOD + BROKER + '[mqtt]\nnamespace = "#"\n', "mqtt.namespace: Value error, must be"),
        (GOOD + BROKER + '[mqtt]\nnamespace = ""\n', "mqtt.namespace: Value error, must be"),
    ],
)
def test_a_missing_or_unsafe_namespace_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: ") as refused:
        AgentConfig.load(write(tmp_path, text))
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("broker", "message"),
    [
        ("127.0.0.1:18883", "has no scheme"),
        ("localhost:1883", "has no scheme"),
        ("tcp://127.0.0.1:1883", "unknown scheme 'tcp'"),
        ("mqtt://127.0.0.1:port", "the port must be a number"),
        ("mqtt://127.0.0.1:0", "the port must be a number"),
    ],
)
def test_a_broker_url_without_a_known_scheme_is_refused(
    tmp_path: Path, broker: str, message: str
) -> None:
    text = GOOD + f'[server]\nbroker = "{broker}"\n[mqtt]\nnamespace = "plant-7"\n'
    with pytest.raises(ConfigError, match=r"server\.broker: ") as refused:
        AgentConfig.load(write(tmp_path, text))
    assert message in str(refused.value)


STANDALONE = AGENT_HEAD + 'name = "pump-health"\n'


def test_a_device_without_a_director_follows_the_named_bundle(tmp_path: Path) -> None:
    config = AgentConfig.load(write(tmp_path, STANDALONE))
    assert config.director is None
    assert config.image_repository.name == "pump-health"
    assert AgentConfig.load(write(tmp_path, GOOD)).image_repository.name is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            STANDALONE.replace('name = "pump-health"\n', ""),
            "image_repository.name: required without [director]; name the bundle this device "
            'installs the newest release of (e.g. name = "pump-health")',
        ),
        (
            GOOD.replace(
                'root = "trust/image-root.json"\n', 'root = "r.json"\nname = "pump-health"\n'
            ),
            "image_repository.name: only without [director]",
        ),
        (
            STANDALONE + '[server]\nbroker = "mqtt://127.0.0.1:1883"\n[mqtt]\nnamespace = "ns"\n',
            "director: required with server.broker",
        ),
        (
            STANDALONE.replace('"pump-health"', '"Pump Health"'),
            "image_repository.name: Value error, must be a bundle name",
        ),
    ],
)
def test_the_source_of_updates_is_the_director_or_a_named_bundle(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: ") as refused:
        AgentConfig.load(write(tmp_path, text))
    assert message in str(refused.value)


ENROLLING = (
    GOOD
    + """[server]
url = "https://fleet.example"
broker = "mqtts://fleet.example:8883"
[enrolment]
token_file = "token"
"""
)


def test_an_enrolling_device_stores_its_password_in_its_data_folder(tmp_path: Path) -> None:
    config = AgentConfig.load(write(tmp_path, ENROLLING))
    assert config.enrolment is not None
    assert config.enrolment.token_file == (tmp_path / "token").resolve()
    assert config.credentials.password_file == (tmp_path / "data" / "password").resolve()
    # The server names the namespace at enrolment: the file need not.
    assert config.mqtt.namespace is None
    given = ENROLLING + '[credentials]\npassword_file = "secret/pw"\n'
    assert AgentConfig.load(write(tmp_path, given)).credentials.password_file == (
        (tmp_path / "secret" / "pw").resolve()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            ENROLLING.replace('token_file = "token"\n', ""),
            "enrolment: Value error, enrolment: give the provisioning token as token_file or "
            "token_env (one of them)",
        ),
        (ENROLLING + 'token_env = "TOKEN"\n', "give the provisioning token as token_file or"),
        (ENROLLING.replace('url = "https://fleet.example"\n', ""), "server.url: required with"),
        (
            ENROLLING.replace('token_file = "token"', 'token_env = "A-B"'),
            "enrolment.token_env: String should match pattern",
        ),
    ],
)
def test_a_wrong_enrolment_section_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: ") as refused:
        AgentConfig.load(write(tmp_path, text))
    assert message in str(refused.value)
