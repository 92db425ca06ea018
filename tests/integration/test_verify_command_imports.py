"""`edge-agent verify` loads only what verifying needs (issue: the whole command's cost).

The command runs as a user runs it, in a process of its own, under
``python -X importtime``, which names every module the process imported. A
verification reads signed metadata and a bundle's manifest: it has no use for
numpy, the model runtime, the agent's configuration or pydantic (the manifest
is checked by ``protocol.manifest_check``), which cost most of the command's
time when they were loaded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fleet_server.release.repository import ImageRepository
from testbed.images import HARDWARE

NOT_NEEDED = (
    "numpy",
    "tflite_runtime",
    "ai_edge_litert",
    "agent.config",
    "agent.serving",
    # The manifest is checked by protocol.manifest_check: no pydantic model is built.
    "pydantic",
    "pydantic_core",
    "protocol.manifest",
    # A directory repository needs no HTTP client (agent.ota.tuf_client, agent.ota.transport).
    "urllib3",
    "ssl",
    "http.client",
)


def test_verify_imports_no_numpy_runtime_or_configuration(
    repo: ImageRepository, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "agent.cli",
            "verify",
            "--root",
            str(repo.trusted_root_path),
            "--repo",
            str(repo.path),
            "--name",
            "pump-health",
            "--hardware",
            HARDWARE,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Verified pump-health 1.0.0" in done.stdout
    assert list(out.glob("*.bundle"))
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))
    # python-tuf's updater and the manifest check ran.
    assert "tuf.ngclient.updater" in imported and "protocol.manifest_check" in imported
    loaded = sorted(m for m in imported if any(m == n or m.startswith(f"{n}.") for n in NOT_NEEDED))
    assert loaded == []
