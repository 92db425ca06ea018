"""The demo: the story so far, told with the real commands on zero-setup defaults.

A release engineer creates release keys, builds bundles of the sample models
and releases them into an image repository served over HTTP; a device verifies
them. Then a real ``edge-agent`` process on its own (no director, no server)
installs each release as it is made: v1, then v2; it rolls back v3-bad on its
own when the model answers NaN for idle machines — while a stream of requests
keeps being answered — and refuses a bundle that fails its self-test. Then an
attacker tampers with a bundle and the device refuses it. Last, a simulated
fleet behind a server (:mod:`simulator.demo_fleet`): v2 rolled out wave by wave
on its gates, v3-bad stopped in its first wave, drift in one region, the
hybrid plans after a cloud capacity cut; the fleet then keeps heartbeating and
the server keeps serving its dashboard until Ctrl-C (not when ``stay`` is false:
``DEMO_EXIT=1``, ``CI=true`` or no terminal).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.cli import main as edge_agent
from fleet_server.fleetctl import main as fleetctl
from simulator.demo_fleet import DashboardServer, FleetChapterError, fleet_chapter
from simulator.device_story import device_story
from testbed.http_repo import serve_directory
from testbed.images import HARDWARE, MODELS, temperature

RELEASES = [("v1", "1.0.0"), ("v2", "1.1.0"), ("v3-bad", "1.2.0")]


TOOLS: dict[str, Callable[[Sequence[str]], int]] = {"fleetctl": fleetctl, "edge-agent": edge_agent}


class Story:
    """Runs the demo's commands in process, echoing each, and counts surprises."""

    def __init__(self) -> None:
        self.surprises = 0

    def section(self, title: str) -> None:
        print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)

    def step(self, command: str, *, refused: str | None = None) -> None:
        """Run ``command``; with ``refused``, it is expected to fail for that reason."""
        if refused:
            print(f"\n(expected: refused, {refused})")
        print(f"\n$ {command}", flush=True)
        tool, *args = shlex.split(command)
        succeeded = TOOLS[tool](args) == 0
        if succeeded == bool(refused):
            self.surprises += 1


def stays_up() -> bool:
    """Whether the demo keeps its dashboard up at the end: not under ``DEMO_EXIT=1``, in CI,
    or without a terminal to press Ctrl-C in."""
    if os.environ.get("DEMO_EXIT", "") not in ("", "0"):
        return False
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stdin.isatty()


def run_demo(workdir: Path, *, stay: bool | None = None) -> int:
    """Run the demo in ``workdir`` (emptied first); returns a process exit status.

    With ``stay`` (default: :func:`stays_up`) the fleet server keeps serving its
    dashboard after the story until Ctrl-C.
    """
    stay = stays_up() if stay is None else stay
    # Absolute: the agents' configuration files name paths relative to themselves.
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    keys, repo, bundles = workdir / "keys", workdir / "repo", workdir / "bundles"
    bundles.mkdir()
    data = f"--baseline {MODELS / 'baseline.npy'} --features {MODELS / 'features.json'}"
    data += f" --calibration {MODELS / 'heldout.npz'}"
    story = Story()

    story.section("Release engineer: keys, bundles, releases")
    story.step(f"fleetctl keys init --dir {keys}")
    for model, version in RELEASES:
        story.step(
            f"fleetctl bundle build {MODELS / model}.tflite --name pump-health --version "
            f"{version} --hardware {HARDWARE} --hardware jetson-orin {data} "
            f"--temperature {temperature(model)} --out {bundles}"
        )
    story.step(
        f"fleetctl bundle build {MODELS / 'cloud.tflite'} --name pump-health-cloud "
        f"--version 1.0.0 --hardware cloud-x86_64 {data} "
        f"--temperature {temperature('cloud')} --out {bundles}"
    )
    story.step(f"fleetctl bundle inspect {bundles / 'pump-health-1.1.0.bundle'}")
    for bundle in sorted(bundles.glob("*.bundle")):
        story.step(f"fleetctl release add {bundle} --repo {repo} --keys {keys}")
    story.step(f"fleetctl release list --repo {repo}")

    story.step(
        f"fleetctl bundle build {MODELS / 'v2.tflite'} --name pump-health --version 1.3.0 "
        f"--hardware {HARDWARE} {data} --temperature {temperature('v2')} "
        f"--max-latency-ms 0.000001 --out {workdir}"
    )
    story.step(
        f"fleetctl release add {workdir}/pump-health-1.3.0.bundle --repo {repo} --keys {keys}"
    )

    root = repo / "metadata" / "1.root.json"
    with serve_directory(workdir) as base:
        url = f"{base}/repo"
        verify = f"edge-agent verify --root {root} --repo {url} --hardware {HARDWARE}"
        story.section(f"Device: verify bundles from {url}")
        for _, version in RELEASES[:2]:
            story.step(f"{verify} --name pump-health --version {version} --out {workdir}/device")
        story.step(
            f"{verify} --name pump-health-cloud --out {workdir}/device",
            refused="this bundle is not released for this hardware",
        )

        released = {version: bundles / f"pump-health-{version}.bundle" for _, version in RELEASES}
        released["1.3.0"] = workdir / "pump-health-1.3.0.bundle"
        story.surprises += device_story(workdir, base, keys, released)

        story.section("Attacker: one byte of v1.1.0 changed on the server")
        [target] = (repo / "targets" / "pump-health").glob("*.pump-health-1.1.0.bundle")
        tampered = bytearray(target.read_bytes())
        tampered[len(tampered) // 2] ^= 0x01
        target.write_bytes(bytes(tampered))
        story.step(
            f"{verify} --name pump-health --version 1.1.0 --out {workdir}/device2",
            refused="the bytes differ from what the release keys signed",
        )

    try:
        with fleet_chapter(workdir) as server:
            return result(story.surprises, server, stay)
    except FleetChapterError as exc:
        print(f"\n!! {exc}")
        return 1


def result(surprises: int, server: DashboardServer, stay: bool) -> int:
    """The demo's verdict, the dashboard's address, and (``stay``) the wait for Ctrl-C."""
    story = Story()
    story.section("Result")
    if surprises:
        print(f"{surprises} step(s) did not turn out as expected")
        return 1
    print(
        "Every genuine bundle verified and installed; the wrong-hardware, the slow and the\n"
        "tampered bundle were refused, and v3-bad was rolled back by the device itself\n"
        "without one request going unanswered — alone, and in a fleet behind the server:\n"
        "v2 went out wave by wave on its gates, v3-bad stopped in its first wave and its\n"
        "devices went back to v2, drift in eu raised one alert grouping its features, and the\n"
        "hybrid plans followed the cloud's capacity cut."
    )
    print(
        f"\nDashboard: {server.url}/dashboard\n  log in with the admin token in {server.token_file}"
    )
    if not stay:
        return 0
    print("  (the server and its simulated fleet stay up until Ctrl-C)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.alive():
            stop.wait(1.0)
    except KeyboardInterrupt:
        print()
    return 0
