"""Scenario files: the shipped ones load in both forms; a bad one is refused naming the file
and the field, by ``load_scenario`` and by ``fleet-sim run`` (exit status 2, nothing started)."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from simulator.cli import EXIT_BAD_SCENARIO, build_parser, main, scenario_for
from simulator.runner import check_runnable
from simulator.scenario import CHECKS, Scenario, ScenarioError, load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "simulator" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))
SHORT_LIMIT = timedelta(seconds=60)


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    return str(caught.value)


def test_the_six_scenarios_of_the_issue_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert names >= {
        "good-rollout",
        "bad-model",
        "drift-region",
        "cloud-capacity",
        "reconnect-storm",
        "power-cuts",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_scenario_loads_with_a_short_form_of_a_few_devices_and_at_most_a_minute(
    path: Path,
) -> None:
    full = load_scenario(path)
    short = full.shortened()
    assert full.name == path.stem
    assert full.short is not None
    assert short.duration <= SHORT_LIMIT
    assert short.devices <= 10 < full.devices
    check_runnable(full)  # every rollout spec is one the server takes
    check_runnable(short)


def test_good_rollout_is_a_rollout_across_a_thousand_devices() -> None:
    scenario = load_scenario(SCENARIOS / "good-rollout.toml")
    assert scenario.devices == 1000
    assert [s.action for s in scenario.steps] == ["release", "rollout"]
    assert scenario.expect.rollout == "completed"


def test_a_file_that_is_not_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name = [unclosed\n")
    message = refusal(path)
    assert str(path) in message and "not TOML" in message


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    message = refusal(tmp_path / "absent.toml")
    assert "absent.toml" in message and "cannot read" in message


def test_an_unknown_field_is_refused_by_its_place(tmp_path: Path) -> None:
    path = write(tmp_path, "[traffic]\nrate = 1.0\nrte = 2.0\n")
    message = refusal(path)
    assert str(path) in message and "traffic.rte" in message


def test_a_value_out_of_range_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, '[[cohorts]]\nname = "eu"\ndevices = 0\n')
    message = refusal(path)
    assert "cohorts.0.devices" in message


def test_a_cohort_on_hardware_without_a_profile_is_refused_naming_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[[cohorts]]\nname = "eu"\ndevices = 3\nhardware = "jetson"\n')
    message = refusal(path)
    assert "'eu'" in message and "'jetson'" in message


def test_a_fault_without_its_parameter_is_refused_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[[faults]]\nkind = "latency"\nat = "10s"\n')
    message = refusal(path)
    assert "faults.0" in message and "latency_ms" in message


def test_a_fault_aimed_at_an_unknown_cohort_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[[faults]]\nkind = "disk-full"\nat = "1s"\ntarget = { cohort = "mars" }\n'
    )
    assert "'mars'" in refusal(path)


def test_an_unknown_fault_kind_is_refused_by_its_place(tmp_path: Path) -> None:
    path = write(tmp_path, '[[faults]]\nkind = "meteor"\nat = "1s"\n')
    assert "faults.0.kind" in refusal(path)


def test_an_unknown_check_to_skip_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'skip_checks = ["vibes"]\n')
    assert "skip_checks.0" in refusal(path)


def args_for(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_a_bad_short_form_is_refused_naming_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, '[short]\nduration = "soon"\n')
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for(str(path), "--short"))
    message = str(caught.value)
    assert str(path) in message and "short form" in message and "duration" in message


def test_a_rollout_the_server_would_refuse_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        '[[steps]]\nat = "1s"\naction = "rollout"\nrollout = { waves = [50, 20], bake = "1m" }\n',
    )
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for(str(path)))
    message = str(caught.value)
    assert str(path) in message and "steps.0.rollout" in message and "waves" in message


def test_a_capacity_step_needs_the_cloud(tmp_path: Path) -> None:
    path = write(tmp_path, '[[steps]]\nat = "1s"\naction = "capacity"\ncapacity = 5\n')
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for(str(path)))
    assert "steps.0" in str(caught.value) and "server.cloud" in str(caught.value)


def test_command_line_overrides_apply_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[cohorts]]\nname = "eu"\ndevices = 30\n[[cohorts]]\nname = "us"\ndevices = 10\n',
    )
    scenario = scenario_for(
        args_for(str(path), "--devices", "8", "--seed", "9", "--duration", "2m")
    )
    assert [c.devices for c in scenario.cohorts] == [6, 2]
    assert scenario.seed == 9
    assert scenario.duration == timedelta(minutes=2)


def test_without_a_file_the_run_is_the_default_fleet_of_the_size_asked() -> None:
    scenario = scenario_for(args_for("--devices", "25"))
    assert scenario.devices == 25
    assert scenario == Scenario().with_devices(25)


def test_a_bad_duration_on_the_command_line_is_refused_naming_it() -> None:
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for("--duration", "forever"))
    assert "--duration" in str(caught.value)


def test_fleet_sim_run_exits_2_on_a_bad_scenario_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[traffic]\nrate = -1\n")
    status = main(["run", str(path), "--workdir", str(tmp_path / "run")])
    assert status == EXIT_BAD_SCENARIO
    err = capsys.readouterr().err
    assert str(path) in err and "traffic.rate" in err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_every_check_can_be_named_to_skip() -> None:
    assert Scenario(skip_checks=list(CHECKS)).skip_checks == list(CHECKS)  # type: ignore[arg-type]


def test_drift_of_a_feature_the_data_has_not_is_refused_naming_it(tmp_path: Path) -> None:
    text = '[[cohorts]]\nname = "eu"\ndevices = 2\ndrift = { covariate_shift = { rpm = 1.0 } }\n'
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for(str(path)))
    message = str(caught.value)
    assert str(path) in message and "cohorts.0.drift.covariate_shift" in message
    assert "'rpm'" in message


def test_a_server_given_by_url_needs_its_broker(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as caught:
        scenario_for(args_for("--server-url", "http://127.0.0.1:9", "--token", "t"))
    assert "server.broker" in str(caught.value)
