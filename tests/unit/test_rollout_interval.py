"""The rollout tick's and the drift job's intervals: server flags, a minute by default."""

from __future__ import annotations

from pathlib import Path

from fleet_server.cli import build_parser, config_from_args


def test_the_rollout_interval_is_a_flag_defaulting_to_a_minute(tmp_path: Path) -> None:
    given = build_parser().parse_args(["--data", str(tmp_path), "--rollout-interval", "15"])
    assert config_from_args(given).rollout_interval_s == 15.0
    default = build_parser().parse_args(["--data", str(tmp_path)])
    assert config_from_args(default).rollout_interval_s == 60.0


def test_the_drift_interval_is_a_flag_defaulting_to_a_minute(tmp_path: Path) -> None:
    given = build_parser().parse_args(["--data", str(tmp_path), "--drift-interval", "10"])
    assert config_from_args(given).drift_interval_s == 10.0
    default = build_parser().parse_args(["--data", str(tmp_path)])
    assert config_from_args(default).drift_interval_s == 60.0
