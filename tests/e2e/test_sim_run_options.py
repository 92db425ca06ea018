"""``fleet-sim run``'s own behaviour on small fleets: a failed check exits 1 naming it, the
progress and metrics while it runs, network faults through the proxy, and a fleet split over
two processes checked as one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from testbed.waiting import free_port, wait_until
from tests.support.sim_runs import RUN_TIMEOUT_S, assert_passed, checks_of, fleet_sim

pytestmark = pytest.mark.integration


def test_a_scenario_that_fails_a_check_exits_1_naming_it(tmp_path: Path) -> None:
    # The broker goes down and stays down past the end of the traffic: the windows closed
    # since wait in the devices' outboxes, never stored, and the fleet ends offline.
    scenario = tmp_path / "broker-gone.toml"
    scenario.write_text(
        'name = "broker-gone"\nduration = "15s"\n'
        '[traffic]\nrate = 3.0\nwindow = "2s"\n'
        '[[cohorts]]\nname = "fleet"\ndevices = 3\n'
        '[[faults]]\nkind = "broker-restart"\nat = "6s"\nduration = "1h"\n'
        "[expect]\nmin_online = 1.0\n"
    )
    done, report = fleet_sim(tmp_path, str(scenario))
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 1, said
    checks = checks_of(report)
    assert not checks["windows-once"]["passed"]
    assert "never stored" in checks["windows-once"]["detail"]
    assert not checks["expectations"]["passed"]
    assert checks["requests-answered"]["passed"]  # the devices served on without the broker
    assert report["passed"] is False
    assert "FAIL windows-once" in done.stdout and "FAIL expectations" in done.stdout


def test_a_run_shows_its_progress_and_serves_its_metrics_while_it_runs(tmp_path: Path) -> None:
    port = free_port()
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "run",
            "--devices",
            "2",
            "--duration",
            "20s",
            "--workdir",
            str(tmp_path / "run"),
            "--metrics-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1, read=5))

    def online() -> float | None:
        if run.poll() is not None:
            raise AssertionError(f"fleet-sim exited with {run.returncode} before serving metrics")
        try:
            text = http.request("GET", f"http://127.0.0.1:{port}/metrics").data.decode()
        except urllib3.exceptions.HTTPError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "fleetsim_devices_online" and sample.value == 2:
                    return sample.value
        return None

    try:
        wait_until("the run's metrics to show both devices online", online, RUN_TIMEOUT_S)
        out, err = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-3000:]}"
    # Not a terminal: plain progress lines, not one line rewritten in place.
    progress = [line for line in err.splitlines() if "online 2/2" in line]
    assert progress and "\r" not in err
    assert (tmp_path / "run" / "report.json").exists()
    assert (tmp_path / "run" / "report.csv").exists()


def test_network_faults_go_through_the_proxy_and_lose_nothing(tmp_path: Path) -> None:
    # One cohort's link goes down, the other's slows; then every connection is cut at once.
    scenario = tmp_path / "network.toml"
    scenario.write_text(
        'name = "network"\nduration = "25s"\n'
        '[traffic]\nrate = 3.0\nwindow = "3s"\n'
        '[[hardware]]\nid = "rpi4-arm64"\nlink = { latency_ms = 20 }\n'
        '[[cohorts]]\nname = "a"\ndevices = 3\n'
        '[[cohorts]]\nname = "b"\ndevices = 2\n'
        '[[faults]]\nkind = "link-down"\nat = "5s"\nduration = "5s"\ntarget = { cohort = "b" }\n'
        '[[faults]]\nkind = "latency"\nat = "3s"\nduration = "10s"\nlatency_ms = 100\n'
        'jitter_ms = 20\ntarget = { cohort = "a" }\n'
        '[[faults]]\nkind = "reconnect-storm"\nat = "15s"\n'
        "[expect]\nmin_online = 1.0\n"
    )
    done, report = fleet_sim(tmp_path, str(scenario))
    assert_passed(done, report)
    assert [f["applied"] for f in report["faults"]] == ["yes", "yes", "yes"]
    down = [s for s in report["series"] if "link-down" in s["faults_active"]]
    assert down and min(s["online"] for s in down) <= 3  # cohort b was cut off
    figures = report["figures"]
    # Every connection open at that moment (a device of b may still be in its backoff).
    assert len(figures["storm_cut"]) == 1 and 1 <= figures["storm_cut"][0] <= 5
    assert figures["proxy_broker"]["refused"] > 0  # b's reconnects while its link was down


def test_a_fleet_split_over_two_processes_is_checked_as_one(tmp_path: Path) -> None:
    scenario = tmp_path / "two.toml"
    scenario.write_text(
        'name = "two-processes"\nduration = "20s"\nprocesses = 2\n'
        '[traffic]\nrate = 2.0\nwindow = "3s"\nlabels = { share = 0.5, delay = "2s" }\n'
        '[[cohorts]]\nname = "eu"\ndevices = 5\ntags = ["region=eu"]\n'
        '[[faults]]\nkind = "broker-restart"\nat = "8s"\nduration = "3s"\n'
        "[expect]\nmin_online = 1.0\n"
    )
    done, report = fleet_sim(tmp_path, str(scenario))
    assert_passed(done, report)
    figures = report["figures"]
    assert figures["processes"] == 2
    # Every device's windows are checked, those of the device process too (3 of the 5 here).
    assert "5 devices" in checks_of(report)["verified-model"]["detail"]
    assert figures["windows_stored"] == figures["windows_produced"] > 0
    assert report["series"][-1]["online"] == 5
    assert (tmp_path / "run" / "fleet-sim-1.log").exists()


def test_a_rollout_step_waits_for_the_models_earlier_rollout_to_finish(tmp_path: Path) -> None:
    # The second rollout is due while the first (one wave, an 8-s bake) still goes out to the
    # same devices: the server refuses it (one rollout per model and device at a time), so the
    # step waits for the first to complete, as an operator would, and says how long it waited.
    scenario = tmp_path / "back-to-back.toml"
    scenario.write_text(
        'name = "back-to-back"\nduration = "35s"\n'
        '[traffic]\nrate = 3.0\nwindow = "2s"\n'
        '[[cohorts]]\nname = "fleet"\ndevices = 3\n'
        '[[steps]]\nat = "1s"\naction = "release"\nmodel = "v2"\n'
        '[[steps]]\nat = "2s"\naction = "rollout"\n'
        'rollout = { waves = [100], bake = "8s", holdback = 0 }\n'
        '[[steps]]\nat = "3s"\naction = "release"\nmodel = "v2"\nversion = "2.1.0"\n'
        '[[steps]]\nat = "4s"\naction = "rollout"\n'
        'rollout = { waves = [100], bake = "2s", holdback = 0 }\n'
        '[expect]\nrollout = "completed"\n'
    )
    done, report = fleet_sim(tmp_path, str(scenario))
    assert_passed(done, report)
    first, second = [d for d in report["decisions"] if d.get("step") == "rollout"]
    assert "error" not in first and "waited_s" not in first, first
    assert "error" not in second and second["waited_s"] > 0, second
    # Created only once the first had finished: its bake alone outlasts the wait's start.
    assert second["t"] >= first["t"] + 8, (first, second)
