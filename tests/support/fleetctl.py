"""``fleetctl`` as a test runs it against one server: in this process, or as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet_server.fleetctl import main
from testbed.api_server import ServerThread

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """How one run of ``fleetctl`` ended, and what it printed."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def one_line_error(result: Result) -> str:
    """The refusal ``result`` printed, which must be one line, with exit status 1, no traceback."""
    assert result.code == 1, result
    assert result.err.count("\n") == 1 and result.err.startswith("fleetctl: "), result.err
    assert "Traceback" not in result.err
    return result.err


def fleetctl_process(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120
) -> Result:
    """``fleetctl ARGS`` as its own process from the repository's root (``env``: os.environ)."""
    done = subprocess.run(
        [sys.executable, "-m", "fleet_server.fleetctl", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**(os.environ if env is None else env), "PYTHONPATH": str(REPO_ROOT)},
    )
    return Result(done.returncode, done.stdout, done.stderr)


@dataclass
class Fleetctl:
    """``fleetctl`` against the server ``api``, with the admin token unless given another."""

    api: ServerThread
    tmp: Path
    capsys: pytest.CaptureFixture[str] | None = None

    def flags(self, token_file: Path | None = None) -> list[str]:
        """``--server URL --token-file F``."""
        return ["--server", self.api.url, "--token-file", str(token_file or self.token_file)]

    @property
    def token_file(self) -> Path:
        """The admin token the server wrote at its first start."""
        return self.api.admin_token_file

    def run(self, *args: str, token_file: Path | None = None) -> Result:
        """``fleetctl ARGS`` against the server, in this process."""
        return self.local(*args, *self.flags(token_file))

    def local(self, *args: str) -> Result:
        """``fleetctl ARGS`` in this process, with no server unless ``args`` name one."""
        assert self.capsys is not None
        self.capsys.readouterr()
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def process(self, *args: str, token_file: Path | None = None, remote: bool = True) -> Result:
        """``fleetctl ARGS`` as its own process, against the server if ``remote``."""
        return fleetctl_process([*args, *(self.flags(token_file) if remote else ())])
