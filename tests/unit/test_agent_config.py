"""The agent's TOML configuration: a wrong file is refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError

GOOD = """
device_id = "pump-17"
hardware_id = "rpi4-arm64"
data_dir = "data"
[image_repository]
url = "repo"
root = "trust/image-root.json"
[director]
url = "http://fleet.example/director"
root = "trust/director-root.json"
"""


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
