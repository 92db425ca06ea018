"""The demo tells its story without a surprise."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.demo import run_demo


def test_demo_runs_to_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr()
    assert "tampered-bundle" in out.err and "wrong-hardware" in out.err
    assert "Every genuine bundle verified" in out.out
