"""A checkout timed as an installed package runs: its modules compiled to bytecode.

``pip install`` compiles what it installs; an editable checkout in an environment with
``PYTHONDONTWRITEBYTECODE`` would otherwise compile every module it imports from source
in every process, which a whole-process timing would count.
"""

from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "protocol", "model_runtime")


def compile_tree(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> None:
    """Compile ``packages`` of the checkout at ``root`` (those it has) to bytecode."""
    for package in packages:
        if (root / package).is_dir():
            compileall.compile_dir(root / package, quiet=1)
