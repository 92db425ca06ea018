"""Which of the project's packages each part may import (shared/DESIGN.md, "Packages").

The agent and the fleet server share only ``protocol`` and the model-runtime
adapter; ``protocol`` imports none of ours; the adapter imports only
``protocol``. Checked on the source with ``ast``, imports inside functions
included, so a violation is named by file and line before anything runs.
Every folder of modules in them is a package (an ``__init__.py``), never an
implicit namespace package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = frozenset(p.parent.name for p in ROOT.glob("*/__init__.py"))
MAY_IMPORT = {
    "agent": {"agent", "protocol", "model_runtime"},
    "fleet_server": {"fleet_server", "protocol", "model_runtime"},
    "model_runtime": {"model_runtime", "protocol"},
    "protocol": {"protocol"},
    "testbed": {"testbed", "agent", "fleet_server", "protocol", "model_runtime"},
}


def imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import, and of ``import_module("...")`` with a literal."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and (module := _import_call(node)):
            yield node.lineno, module


def _import_call(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in ("import_module", "__import__") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def violations(package: str, root: Path = ROOT) -> list[str]:
    """``file:line imports X`` for each import of ours that ``package`` may not make."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported(tree):
            top = module.split(".")[0]
            if top in OURS and top not in MAY_IMPORT[package]:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_the_parts_named_in_the_rules_exist() -> None:
    assert set(MAY_IMPORT) <= OURS


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_part_imports_only_what_it_may(package: str) -> None:
    assert violations(package) == []


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_every_folder_of_modules_is_a_package(package: str) -> None:
    # Alembic loads its migration scripts by path; they are not imported.
    folders = {p.parent for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts}
    missing = [f for f in sorted(folders) if not (f / "__init__.py").is_file()]
    assert [str(f.relative_to(ROOT)) for f in missing] == []


def test_a_forbidden_import_is_named_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "agent" / "ota").mkdir(parents=True)
    (tmp_path / "agent" / "ota" / "late.py").write_text(
        "import protocol.manifest\n"
        "from model_runtime import TFLiteRuntime\n"
        "\n"
        "def run() -> None:\n"
        "    from fleet_server.db import models\n"
        "    import simulator.demo\n"
        "    importlib.import_module('fleet_server.api')\n"
    )
    assert violations("agent", tmp_path) == [
        "agent/ota/late.py:5 imports fleet_server.db",
        "agent/ota/late.py:6 imports simulator.demo",
        "agent/ota/late.py:7 imports fleet_server.api",
    ]
