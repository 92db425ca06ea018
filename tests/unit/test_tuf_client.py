"""python-tuf's client loads without urllib3, and its default fetcher is still the real one.

Run in a fresh interpreter each: whether a module is loaded depends on what
was imported before.
"""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_the_client_loads_without_urllib3() -> None:
    out = run(
        "import sys\n"
        "import agent.ota.tuf_client\n"
        "import tuf.ngclient.updater\n"
        "print(sorted(m for m in ('urllib3', 'ssl', 'http.client') if m in sys.modules))"
    )
    assert out == "[]"


def test_pythontufs_default_fetcher_is_the_real_one_made_on_first_use() -> None:
    out = run(
        "import sys\n"
        "from agent.ota.tuf_client import Updater\n"
        "import tuf.ngclient.updater as updater\n"
        "fetcher = updater.Urllib3Fetcher()\n"
        "from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher\n"
        "from tuf.ngclient import FetcherInterface\n"
        "print(type(fetcher) is Urllib3Fetcher, isinstance(fetcher, FetcherInterface),"
        " 'urllib3' in sys.modules)"
    )
    assert out == "True True True"


def test_a_later_import_of_the_fetcher_module_gets_the_real_module() -> None:
    out = run(
        "import agent.ota.tuf_client\n"
        "import tuf.ngclient.urllib3_fetcher as module\n"
        "print(module.__file__.endswith('urllib3_fetcher.py'))"
    )
    assert out == "True"
