"""``edge-agent`` builds its models without looking for pydantic plugins, unless asked to.

Each case is a fresh interpreter running the real entry point (``status``,
which validates the configuration and the journal with pydantic), with
``PYDANTIC_DISABLE_PLUGINS`` unset, set to disable them all, or set to anything
else; it prints which loader pydantic asked and whether ``importlib.metadata``
(what looking for plugins imports) was loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.pydantic_plugins import DISABLE_PLUGINS, LOADER, skip_plugin_discovery
from tests.support.agent_toml import AGENT_HEAD

AGENT_TOML = AGENT_HEAD + 'name = "pump-health"\n'

PROBE = f"""
import json, sys
import agent.cli
assert "pydantic" not in sys.modules, "pydantic loaded before the entry point ran"
status = agent.cli.main(["status", "--config", sys.argv[1], "--json"])
loader = sys.modules.get({LOADER!r})
print(json.dumps({{
    "status": status,
    "config_validated": "agent.config" in sys.modules,
    "metadata": "importlib.metadata" in sys.modules,
    "loader": None if loader is None else getattr(loader, "__file__", "stand-in"),
    "plugins": None if loader is None else list(loader.get_plugins()),
}}))
"""


def run_status(tmp_path: Path, disable_plugins: str | None) -> dict[str, object]:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML)
    (tmp_path / "data").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != DISABLE_PLUGINS}
    if disable_plugins is not None:
        env[DISABLE_PLUGINS] = disable_plugins
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,
        env=env,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("disable_plugins", [None, "__all__", "1", "true"])
def test_the_agent_builds_its_models_without_looking_for_plugins(
    tmp_path: Path, disable_plugins: str | None
) -> None:
    result = run_status(tmp_path, disable_plugins)
    assert result["status"] == 0 and result["config_validated"]
    assert result["metadata"] is False, "importlib.metadata was imported"
    assert result["loader"] == "stand-in" and result["plugins"] == []


@pytest.mark.parametrize("disable_plugins", ["", "logfire"])
def test_a_user_who_asks_for_plugins_gets_pydantics_own_loader(
    tmp_path: Path, disable_plugins: str
) -> None:
    result = run_status(tmp_path, disable_plugins)
    assert result["status"] == 0 and result["config_validated"]
    loader = str(result["loader"])
    assert Path(loader).parts[-3:] == ("pydantic", "plugin", "_loader.py"), loader
    assert result["metadata"] is True


def test_a_loader_already_imported_is_left_in_place() -> None:
    # This test process built models before: pydantic's loader is the one in use.
    import pydantic.plugin._loader as loader

    assert not skip_plugin_discovery({})
    assert sys.modules[LOADER] is loader
