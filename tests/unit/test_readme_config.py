"""The agent configuration the README shows is one the agent accepts, field for field.

The README's first ``toml`` block in the device section is a whole ``agent.toml``;
each later one adds sections to it ("Devices that talk to a fleet server add:").
Every combination must validate, so a renamed or removed field fails here
rather than on a device.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from agent.config import AgentConfig
from tests.support.readme import REPO, blocks


def _agent_blocks() -> list[tuple[int, dict[str, Any]]]:
    found = [
        (b.line, tomllib.loads(b.text))
        for b in blocks((REPO / "README.md").read_text())
        if b.language == "toml" and b.section.startswith("Device")
    ]
    assert found, "README.md shows no agent.toml in the device sections"
    return found


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def test_the_whole_agent_toml_is_accepted() -> None:
    line, whole = _agent_blocks()[0]
    assert "device_id" in whole, f"README.md line {line}: the first agent.toml is not whole"
    AgentConfig.model_validate(whole)


def test_each_addition_to_it_is_accepted() -> None:
    (_, whole), *additions = _agent_blocks()
    assert additions, "README.md shows no additions to agent.toml (a device with a server)"
    for line, extra in additions:
        base = dict(whole)
        if "name" in extra.get("image_repository", {}):
            base.pop("director")  # a device on its own: "leave out [director]"
        config = AgentConfig.model_validate(_merged(base, extra))
        for section in extra:
            assert getattr(config, section, None) is not None, f"line {line}: [{section}] ignored"


def test_an_unknown_field_in_the_readme_would_be_caught() -> None:
    _, whole = _agent_blocks()[0]
    with pytest.raises(ValueError, match="not_a_field"):
        AgentConfig.model_validate(_merged(whole, {"api": {"not_a_field": 1}}))
