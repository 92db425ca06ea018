"""The demo: the story so far, told with the real commands on zero-setup defaults.

A release engineer creates release keys, builds bundles of the sample models
and releases them into an image repository served over HTTP; a device verifies
them. Then a real ``edge-agent`` process on its own (no director, no server)
installs each release as it is made: v1, then v2; it rolls back v3-bad on its
own when the model answers NaN for idle machines — while a stream of requests
keeps being answered — and refuses a bundle that fails its self-test. Last, an
attacker tampers with a bundle and the device refuses it; then a fleet runs
behind a server.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.cli import main as edge_agent
from fleet_server.fleetctl import main as fleetctl
from simulator.device_story import device_story
from simulator.fleet_story import FleetStory, StoryError
from testbed.embedded_broker import broker_for_demo
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


def run_demo(workdir: Path) -> int:
    """Run the demo in ``workdir`` (emptied first); returns a process exit status."""
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

    story.surprises += fleet_chapter(workdir)

    story.section("Result")
    if story.surprises:
        print(f"{story.surprises} step(s) did not turn out as expected")
        return 1
    print(
        "Every genuine bundle verified and installed; the wrong-hardware, the slow and the\n"
        "tampered bundle were refused, and v3-bad was rolled back by the device itself\n"
        "without one request going unanswered — alone, and in a fleet behind the server."
    )
    return 0


def fleet_chapter(workdir: Path) -> int:
    """The fleet behind a server: returns how many things did not turn out as expected."""
    print("\n== A fleet: fleet server, MQTT broker, three devices " + "=" * 18, flush=True)
    with broker_for_demo(workdir / "broker") as broker:
        print(
            f"(MQTT broker: {broker.url}, a private {broker.kind} started for the demo on a "
            "free port: nothing else on this machine shares it)",
            flush=True,
        )
        fleet = FleetStory(
            workdir / "fleet",
            broker.url,
            f"sqlite:///{workdir / 'fleet' / 'fleet.db'}",
            device_prefix=f"pump-{secrets.token_hex(2)}",
            shared_subscription=broker.shared_subscriptions,
            echo=True,
        )
        (workdir / "fleet").mkdir()
        try:
            told = fleet.tell()
        except StoryError as exc:
            print(f"\n!! {exc}")
            return 1
        finally:
            fleet.close()
    canary = told["canary"]
    outcome = told["outcome"]
    print(
        f"\n{canary} rolled back {outcome['bundle']['version']}: {outcome['reason']} — "
        f"{outcome['message']}"
    )
    print(
        f"{len(told['answers'])} requests to {canary} meanwhile, all answered: "
        f"{set(told['answers']) == {200}}"
    )
    return 0 if set(told["answers"]) == {200} else 1
