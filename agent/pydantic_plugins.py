"""pydantic's plugin discovery, skipped when no pydantic plugin is wanted.

The first model pydantic builds asks ``pydantic.plugin._loader.get_plugins``,
which imports ``importlib.metadata`` (with ``email`` and ``zipfile``) and reads
the entry points of every installed distribution: over 10 ms of the agent's
start, for plugins it does not use (benchmarks/BENCHMARKS.md, "Agent start
without pydantic's plugin discovery"). pydantic's own switch,
``PYDANTIC_DISABLE_PLUGINS``, skips the scan but not the import.

So the agent's entry point puts a stand-in for that loader in ``sys.modules``
when pydantic would load no plugin anyway (the variable set to ``__all__``,
``1`` or ``true``) or when the variable is unset (the agent's default: no
plugins). Set to anything else (plugin names to leave out, or empty for all of
them), pydantic's own loader runs as usual.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping

DISABLE_PLUGINS = "PYDANTIC_DISABLE_PLUGINS"
# The values for which pydantic's loader returns no plugin (pydantic/plugin/_loader.py).
ALL_DISABLED = frozenset({"__all__", "1", "true"})
LOADER = "pydantic.plugin._loader"


def _no_plugins() -> tuple[()]:
    return ()


def skip_plugin_discovery(environ: Mapping[str, str]) -> bool:
    """Make pydantic load no plugin without looking for any, unless ``environ`` asks for them.

    Returns whether the stand-in was installed. It never replaces a loader
    already imported (plugins pydantic found stay found). Call it before the
    first model is built.
    """
    wanted = environ.get(DISABLE_PLUGINS)
    if (wanted is not None and wanted not in ALL_DISABLED) or LOADER in sys.modules:
        return False
    stand_in = types.ModuleType(LOADER, "No pydantic plugins: edgefleet's agent asked for none.")
    # pydantic imports only this name from the module (pydantic/plugin/_schema_validator.py).
    setattr(stand_in, "get_plugins", _no_plugins)  # noqa: B010 (a module's attribute)
    sys.modules[LOADER] = stand_in
    return True
