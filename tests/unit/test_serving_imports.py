"""The serving agent keeps the update machinery out of its process.

Verification runs in a fetcher child (python-tuf, urllib3, cryptography);
the process that serves requests must not load them: they cost it memory
(tens of MB of RSS) for nothing in its steady state. Checked in a fresh
interpreter, on the modules ``edge-agent run`` loads before it serves.
"""

from __future__ import annotations

import json
import subprocess
import sys

UPDATE_MACHINERY = ("tuf", "urllib3", "cryptography", "securesystemslib")


def test_the_serving_process_loads_no_update_machinery() -> None:
    probe = (
        "import json, sys\n"
        "import agent.cli, agent.daemon\n"
        f"tops = {UPDATE_MACHINERY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in tops)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout) == []


def test_the_local_api_parses_http_without_h11() -> None:
    # llhttp (httptools) parses the local API's requests; h11 stays the cloud client's.
    probe = "import sys\nimport agent.api.http, agent.api.routes\nprint('h11' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"
