"""The demo's fleet chapter: the demo scenario on a simulated fleet, its evidence, the dashboard.

The chapter prints the scenario's steps as the ``fleetctl`` commands they
are, runs it (``fleet-sim run simulator/scenarios/demo.toml``: its own broker,
fleet server and cloud endpoint on free ports, a progress line meanwhile),
then, its fleet still up, shows through the server's API and ``fleetctl`` what
happened: the v2 rollout's promotions with the rule that fired, v3-bad stopped
in its first wave with the gate's evidence and (once the rollback is done)
those devices back on v2, the one grouped drift alert, the plans after the
capacity cut. The fleet keeps heartbeating and the server keeps serving its
dashboard until the caller leaves the chapter.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from fleet_server.fleetctl import main as fleetctl
from simulator.report import RunReport
from simulator.runner import VERSIONS, Deployment, run_scenario
from simulator.scenario import Scenario, Step, load_scenario
from testbed.server_process import ServerProcess

SCENARIO = Path(__file__).parent / "scenarios" / "demo.toml"
GOOD_BUNDLE = "pump-health 1.1.0"  # v2, as a device reports its active bundle
# How long the chapter waits, the fleet up, for v3-bad's rollback to reach every device: a
# few seconds on a quiet machine; the wait ends as soon as every device is back, and a machine
# busy with other work can take over a minute (a poll, a report and a tick per device).
ROLLBACK_WAIT_S = 120.0
INSTALLING_PHASES = frozenset({"downloading", "verified", "staging", "staged", "trial"})


class FleetChapterError(Exception):
    """The fleet chapter did not turn out as the story says."""


def step_commands(step: Step, scenario: Scenario, workdir: Path) -> list[str]:
    """What an operator types for ``step`` (server and token from ``EDGEFLEET_*``)."""
    if step.action == "release":
        assert step.model is not None
        version = step.version or VERSIONS[step.model]
        bundle = workdir / "bundles" / step.model / f"pump-health-{version}.bundle"
        repo, keys = workdir / "repo", workdir / "keys"
        return [
            f"fleetctl release add {bundle} --repo {repo} --keys {keys}",
            f"fleetctl release push --repo {repo}",
        ]
    if step.action == "rollout":
        spec = dict(step.rollout or {})
        release = f"pump-health@{spec.pop('release', VERSIONS[last_release(scenario, step)])}"
        command = f"fleetctl rollout create {release} --select {spec.pop('select')}"
        command += " --waves " + ",".join(f"{w:g}%" for w in spec.pop("waves"))
        command += f" --bake {spec.pop('bake')}"
        if "on_failure" in spec:
            command += f" --on-failure {spec.pop('on_failure')}"
        if "holdback" in spec:
            command += f" --holdback {spec.pop('holdback')}%"
        gates = spec.pop("gates", None)
        if gates:
            path = workdir.parent / f"gates-{release.partition('@')[2]}.json"
            command += f" --gates {path}"
        return [command]
    if step.action == "capacity":
        return [f"fleetctl cloud capacity {step.capacity:g}"]
    return [f"fleetctl assign {step.release} --select all"]


def last_release(scenario: Scenario, step: Step) -> str:
    """The model released last before ``step`` (what a rollout step rolls out)."""
    model: str = scenario.initial
    for earlier in scenario.steps:
        if earlier is step:
            break
        if earlier.action == "release" and earlier.model is not None:
            model = earlier.model
    return model


def timeline(scenario: Scenario, workdir: Path) -> list[tuple[float, str]]:
    """The run's steps as commands, and its drift as what happens in the field, in time order."""
    lines = [
        (step.at.total_seconds(), f"$ {command}")
        for step in scenario.steps
        for command in step_commands(step, scenario, workdir)
    ]
    for cohort in scenario.cohorts:
        if cohort.drift is not None:
            shift = ", ".join(f"{k} {v:+g} sd" for k, v in cohort.drift.covariate_shift.items())
            idle = f"{cohort.drift.idle_share:.0%} of readings from idle machines"
            lines.append(
                (cohort.drift.at.total_seconds(), f"(in the field) {cohort.name}: {shift}, {idle}")
            )
    return sorted(lines, key=lambda line: line[0])


def write_gate_files(scenario: Scenario, workdir: Path) -> None:
    """The ``--gates`` files the printed rollout commands name, as the run uses them."""
    for step in scenario.steps:
        if step.action == "rollout" and step.rollout and step.rollout.get("gates"):
            version = VERSIONS[last_release(scenario, step)]
            path = workdir.parent / f"gates-{version}.json"
            path.write_text(json.dumps(step.rollout["gates"], indent=2) + "\n")


@dataclass
class DashboardServer:
    """The run's fleet server, kept up with its fleet, for the evidence and the dashboard."""

    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def token_file(self) -> Path:
        return self.process.data / "admin.token"

    def alive(self) -> bool:
        return self.process.alive

    def api(self, path: str) -> Any:
        token = self.token_file.read_text().strip()
        r = urllib3.request(
            "GET", f"{self.url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}
        )
        if r.status != 200:
            raise FleetChapterError(f"GET {path}: {r.status} {r.data[:200]!r}")
        return json.loads(r.data)


def fleetctl_shown(command: str, server: DashboardServer) -> str:
    """Run ``command`` (a ``fleetctl`` line) against ``server``, echoing it and its output."""
    print(f"\n$ {command}", flush=True)
    args = [*shlex.split(command)[1:], "--server", server.url]
    args += ["--token-file", str(server.token_file)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fleetctl(args)
    print(out.getvalue(), end="", flush=True)
    if code != 0:
        raise FleetChapterError(f"{command!r} failed with status {code}")
    return out.getvalue()


def shown_path(path: Path) -> Path:
    """``path`` relative to the working folder when it lies under it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


@contextlib.contextmanager
def fleet_chapter(workdir: Path) -> Iterator[DashboardServer]:
    """Run the demo scenario in ``workdir``, show its evidence, yield the dashboard's server.

    The simulated fleet, its broker and its server stay up (the devices
    heartbeating, no traffic) until the caller leaves the context, so the
    dashboard shows the live fleet. Raises :class:`FleetChapterError` when the
    story did not happen as told.
    """
    scenario = load_scenario(SCENARIO)
    run_dir = workdir / "fleet"
    section(f"A fleet: {scenario.devices} simulated devices in eu and us, one story")
    print(
        f"$ fleet-sim run {shown_path(SCENARIO)}\n"
        f"(each device runs the real agent code; the run starts a private broker — Mosquitto\n"
        f"when installed, else the embedded one — its own fleet-server and cloud endpoint on\n"
        f"free ports, in {run_dir}: nothing else on this machine shares them)\n\n"
        "What the operator does, and when (fleetctl reads the server and its token from\n"
        "EDGEFLEET_SERVER and EDGEFLEET_TOKEN):",
        flush=True,
    )
    write_gate_files(scenario, run_dir)
    for at, line in timeline(scenario, run_dir):
        print(f"  at {at:4.0f} s  {line}")
    print(flush=True)
    with held_run(scenario, run_dir) as (report, deployment):
        report.write_json(run_dir / "report.json")
        print(report.summary(), flush=True)
        print(f"(MQTT broker of the run: a private {report.figures.get('broker')} on a free port)")
        if not report.passed:
            show_rollouts(report, DashboardServer(deployment.server))
            raise FleetChapterError(
                f"the run did not pass its checks; see {run_dir / 'report.json'}"
            )
        server = DashboardServer(deployment.server)
        show_evidence(report, server)
        yield server


@contextlib.contextmanager
def held_run(scenario: Scenario, run_dir: Path) -> Iterator[tuple[RunReport, Deployment]]:
    """Run ``scenario`` in a thread and yield its report and deployment once its checks are
    made; its fleet keeps running until the context ends, then the run stops it."""
    handed: queue.Queue[tuple[RunReport, Deployment] | RunReport | BaseException] = queue.Queue()
    release = threading.Event()

    def hold(report: RunReport, deployment: Deployment) -> None:
        handed.put((report, deployment))
        release.wait()

    def run() -> None:
        try:
            handed.put(run_scenario(scenario, run_dir, progress=True, metrics_port=None, hold=hold))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            handed.put(exc)

    thread = threading.Thread(target=run, name="demo-fleet")
    thread.start()
    try:
        got = handed.get()
        if isinstance(got, BaseException):
            raise FleetChapterError(f"the fleet run failed: {got}") from got
        if isinstance(got, RunReport):  # ended before its checks: nothing to hold
            raise FleetChapterError(f"the fleet run ended early; see {run_dir / 'fleet-sim.log'}")
        yield got
    finally:
        release.set()
        thread.join()


def show_rollouts(report: RunReport, server: DashboardServer) -> None:
    """Each rollout of a run that failed its checks, as ``fleetctl`` shows it: its phase, its
    reason, its gates and decisions say where the story went otherwise."""
    section("What the server recorded of each rollout")
    for rollout in report.figures.get("rollouts", []):
        try:
            fleetctl_shown(f"fleetctl rollout status {rollout}", server)
        except (FleetChapterError, OSError, urllib3.exceptions.HTTPError) as exc:
            print(f"(rollout {rollout}: not shown: {exc})", flush=True)


def show_evidence(report: RunReport, server: DashboardServer) -> None:
    """What the server recorded, through its API and ``fleetctl``; raises if a part is missing."""
    good, bad = report.figures["rollouts"]
    section("Evidence: the v2 rollout, wave by wave")
    fleetctl_shown(f"fleetctl rollout status {good}", server)
    rollout = server.api(f"/rollouts/{good}")
    promotions = [
        d for d in rollout["decisions"] if d["action"].startswith(("start stage", "complete"))
    ]
    for d in promotions:
        print(f"  {d['action']} ({d['reached']}/{d['matched']} devices): {d['rule']}")
    if rollout["phase"] != "completed" or len(promotions) < 2:
        raise FleetChapterError(
            f"v2's rollout {good} did not promote wave by wave: {rollout['phase']}"
        )
    print(f"v2 promoted by its gates: {len(promotions)} promotions, rollout {rollout['phase']}")

    section("Evidence: v3-bad stopped in its first wave")
    fleetctl_shown(f"fleetctl rollout status {bad}", server)
    rollout = server.api(f"/rollouts/{bad}")
    stop = next(d for d in rollout["decisions"] if d["rule"] == "harm shown")
    fired = [e for e in rollout["evaluations"] if e["decision"] == "fail"]
    for e in fired:
        print(
            f"  gate {e['gate']}: {e['decision']} — estimate {e['estimate']:g} over "
            f"{e['n_devices']} devices, interval [{e['low']:.3f}, {e['high']:.3f}], harm above "
            f"{e['harm_at']:g}"
        )
    reached = int(stop["reached"])
    print(
        f"v3-bad stopped in wave {rollout['stage']} ({reached} of {stop['matched']} devices): "
        f"{stop['reason']}; rollout {rollout['phase']}"
    )
    if rollout["stage"] != 1:
        raise FleetChapterError(f"v3-bad's rollout {bad} was not stopped in wave 1")
    waited, devices = wait_rolled_back(server, GOOD_BUNDLE, ROLLBACK_WAIT_S)
    back = [d for d in devices if rolled_back(d, GOOD_BUNDLE)]
    print(
        f"rollback complete (waited {waited:.0f} s; {rollout['phase']} is the rollout's last "
        f"phase): every device reports {GOOD_BUNDLE} active, none has anything else "
        f"assigned or under way: {len(back)} of {len(devices)}"
    )
    print(f"devices on v2 (1.1.0) now: {len(back)} of {len(devices)}")
    if len(back) != len(devices):
        behind = "; ".join(
            f"{d.get('id')}: active {d.get('active_bundle')}, phase {d.get('phase')}, "
            f"assigned {d.get('assigned_target')}"
            for d in devices
            if not rolled_back(d, GOOD_BUNDLE)
        )
        raise FleetChapterError(
            f"v3-bad's rollout {bad}: {len(devices) - len(back)} devices not back on v2 "
            f"after {ROLLBACK_WAIT_S:.0f} s ({behind})"
        )

    section("Evidence: drift in eu, one alert grouping its features")
    fleetctl_shown("fleetctl alerts --kind drift --scope region", server)
    alerts = [
        a
        for a in server.api("/alerts?kind=drift&scope=region&state=open")["alerts"]
        if a.get("kind") == "drift" and a["scope"] == "region"
    ]
    for a in alerts:
        features = [f["name"] for f in a.get("features", [])]
        print(
            f"drift alert for region {a['scope_value']} on {a['version']}: {len(features)} "
            f"features, vib_rms_x among them: {'vib_rms_x' in features}"
        )
    regions = sorted({a["scope_value"] for a in alerts})
    print(
        f"regions with a drift alert: {', '.join(regions) or 'none'} (each scope and model "
        "version's features are tested together at a false-alarm rate of 1 %)"
    )
    if not any(
        a["scope_value"] == "eu" and "vib_rms_x" in [f["name"] for f in a.get("features", [])]
        for a in alerts
    ):
        raise FleetChapterError("no drift alert for region eu naming vib_rms_x")

    section("Evidence: the hybrid plans follow a cloud capacity cut")
    cuts = [d["capacity"] for d in report.decisions if d.get("step") == "capacity"]
    fleetctl_shown("fleetctl cloud capacity", server)
    plans = server.api("/plans")["plans"]
    granted = sum(float(p.get("share") or 0.0) for p in plans)
    print(
        f"cloud capacity cut {' -> '.join(f'{c:g}' for c in cuts)} requests/s: the "
        f"{len(plans)} plans now grant {granted:.1f} requests/s"
    )
    if not plans or granted > cuts[-1] * 1.0001:
        raise FleetChapterError(f"the plans grant {granted:.1f}, above the capacity {cuts[-1]:g}")


def rolled_back(device: dict[str, Any], bundle: str) -> bool:
    """Whether ``device`` (as the API shows it) runs ``bundle``, is assigned nothing else and
    has no install under way."""
    assigned = device.get("assigned_target")
    return (
        device.get("active_bundle") == bundle
        and device.get("phase") not in INSTALLING_PHASES
        and (assigned is None or bundle.replace(" ", "-") in assigned)
    )


def wait_rolled_back(
    server: DashboardServer, bundle: str, timeout: float
) -> tuple[float, list[dict[str, Any]]]:
    """Wait up to ``timeout`` seconds until every device is :func:`rolled_back` to ``bundle``;
    the seconds waited and the devices as last seen."""
    started = time.monotonic()
    while True:
        devices: list[dict[str, Any]] = server.api("/devices")["devices"]
        waited = time.monotonic() - started
        if all(rolled_back(d, bundle) for d in devices) or waited >= timeout:
            return waited, devices
        time.sleep(1.0)
