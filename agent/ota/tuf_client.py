"""python-tuf's client (``tuf.ngclient``), imported without urllib3 until HTTP is used.

``tuf.ngclient`` imports its default fetcher, ``Urllib3Fetcher``, and with it
urllib3, ssl and http.client, whichever fetcher the updater is given: about a
fifth of what ``edge-agent verify`` spends on imports. The agent always gives
its own fetcher (:class:`agent.ota.transport.RepositoryFetcher`), which loads
urllib3 only for a repository on a web server. So while ``tuf.ngclient``
loads, its default fetcher's name stands for a class that imports the real
one when python-tuf first makes one; nothing else of python-tuf changes, and a
later ``import tuf.ngclient.urllib3_fetcher`` gets the real module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_DEFAULT_FETCHER = "tuf.ngclient.urllib3_fetcher"


class _DefaultFetcherOnFirstUse:
    """Stands for ``Urllib3Fetcher``: making one makes the real one, importing it then."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module(_DEFAULT_FETCHER).Urllib3Fetcher(*args, **kwargs)


def _import_without_default_fetcher() -> None:
    if "tuf.ngclient" in sys.modules:
        return
    placeholder = types.ModuleType(_DEFAULT_FETCHER)
    placeholder.Urllib3Fetcher = _DefaultFetcherOnFirstUse  # type: ignore[attr-defined]
    sys.modules[_DEFAULT_FETCHER] = placeholder
    try:
        importlib.import_module("tuf.ngclient")
    finally:
        if sys.modules.get(_DEFAULT_FETCHER) is placeholder:
            del sys.modules[_DEFAULT_FETCHER]


_import_without_default_fetcher()

from tuf.ngclient.config import UpdaterConfig  # noqa: E402
from tuf.ngclient.fetcher import FetcherInterface  # noqa: E402
from tuf.ngclient.updater import Updater  # noqa: E402

__all__ = ["FetcherInterface", "Updater", "UpdaterConfig"]
