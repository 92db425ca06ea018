"""The two pinned environments differ only in the model runtime and numpy.

``constraints.txt`` pins tflite-runtime with numpy 1.26; ``constraints-litert.txt`` pins
LiteRT with numpy 2 and LiteRT's own dependencies. Every other pin is the same in both,
so the tests run in the LiteRT environment exercise the same code and libraries.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TFLITE_ONLY = {"tflite-runtime"}
LITERT_ONLY = {"ai-edge-litert", "backports.strenum", "protobuf", "tqdm"}


def pins(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned with =="
            found[package.lower().replace("_", "-")] = version
    return found


def test_the_litert_constraints_differ_only_in_the_runtime_and_numpy() -> None:
    tflite, litert = pins("constraints.txt"), pins("constraints-litert.txt")
    assert set(tflite) - set(litert) == TFLITE_ONLY
    assert set(litert) - set(tflite) == LITERT_ONLY
    changed = {p for p in set(tflite) & set(litert) if tflite[p] != litert[p]}
    assert changed == {"numpy"}
    assert tflite["numpy"].startswith("1.") and litert["numpy"].startswith("2.")


def test_every_dependency_of_the_project_is_pinned_in_both() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    common = [*project["dependencies"], *extras["server"], *extras["test"]]
    for name, wanted in (
        ("constraints.txt", [*common, *extras["agent"]]),
        ("constraints-litert.txt", [*common, *extras["litert"]]),
    ):
        pinned = pins(name)
        for requirement in wanted:
            package = requirement.split(";")[0]
            for stop in "[<>=!~ ":
                package = package.split(stop)[0]
            assert package.lower().replace("_", "-") in pinned, f"{name} does not pin {package}"


def test_the_device_base_has_no_server_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for server in ("sqlalchemy", "aiohttp", "alembic", "asyncpg", "aiosqlite", "amqtt", "tflite>"):
        assert server not in base, server
