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
    assert "device: committed 1.1.0" in out.out
    assert "device: refused 1.3.0: self-test-failed" in out.out
    assert "device: rolled_back 1.2.0: watchdog" in out.out
    assert " answered 200 from previous 1.1.0" in out.out
