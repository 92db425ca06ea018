"""The demo: the story so far, told with the real commands on zero-setup defaults.

A release engineer creates release keys, builds bundles of the sample models,
releases them into an image repository served over HTTP, and a device verifies
them; then an attacker tampers with a bundle and the device refuses it.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.cli import main as edge_agent
from fleet_server.fleetctl import main as fleetctl

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
HARDWARE = "rpi4-arm64"
RELEASES = [("v1", "1.0.0"), ("v2", "1.1.0"), ("v3-bad", "1.2.0")]


def _run(tool: str, entry: Callable[[Sequence[str]], int], args: list[str]) -> int:
    print(f"\n$ {tool} {shlex.join(args)}", flush=True)
    return entry(args)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


@contextmanager
def _serve(directory: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def run_demo(workdir: Path) -> int:
    """Run the demo in ``workdir`` (emptied first); returns a process exit status."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    keys, repo, build = workdir / "keys", workdir / "repo", workdir / "bundles"
    build.mkdir()
    failures = 0

    _section("Release engineer: keys, bundles, releases")
    failures += _run("fleetctl", fleetctl, ["keys", "init", "--dir", str(keys)]) != 0
    for model, version in RELEASES:
        failures += (
            _run(
                "fleetctl",
                fleetctl,
                [
                    "bundle",
                    "build",
                    str(MODELS / f"{model}.tflite"),
                    "--name",
                    "pump-health",
                    "--version",
                    version,
                    "--hardware",
                    HARDWARE,
                    "--hardware",
                    "jetson-orin",
                    "--baseline",
                    str(MODELS / "baseline.npy"),
                    "--features",
                    str(MODELS / "features.json"),
                    "--out",
                    str(build),
                ],
            )
            != 0
        )
    failures += (
        _run(
            "fleetctl",
            fleetctl,
            [
                "bundle",
                "build",
                str(MODELS / "cloud.tflite"),
                "--name",
                "pump-health-cloud",
                "--version",
                "1.0.0",
                "--hardware",
                "cloud-x86_64",
                "--baseline",
                str(MODELS / "baseline.npy"),
                "--features",
                str(MODELS / "features.json"),
                "--out",
                str(build),
            ],
        )
        != 0
    )
    failures += (
        _run("fleetctl", fleetctl, ["bundle", "inspect", str(build / "pump-health-1.1.0.bundle")])
        != 0
    )
    for bundle in sorted(build.glob("*.bundle")):
        failures += (
            _run(
                "fleetctl",
                fleetctl,
                ["release", "add", str(bundle), "--repo", str(repo), "--keys", str(keys)],
            )
            != 0
        )
    failures += _run("fleetctl", fleetctl, ["release", "list", "--repo", str(repo)]) != 0

    root = repo / "metadata" / "1.root.json"
    with _serve(repo) as url:
        _section(f"Device: verify bundles from {url}")
        for _, version in RELEASES[:2]:
            failures += (
                _run(
                    "edge-agent",
                    edge_agent,
                    [
                        "verify",
                        "--root",
                        str(root),
                        "--repo",
                        url,
                        "--name",
                        "pump-health",
                        "--hardware",
                        HARDWARE,
                        "--version",
                        version,
                        "--out",
                        str(workdir / "device"),
                    ],
                )
                != 0
            )
        print("\n(expected: refused, this bundle is not released for this hardware)")
        failures += (
            _run(
                "edge-agent",
                edge_agent,
                [
                    "verify",
                    "--root",
                    str(root),
                    "--repo",
                    url,
                    "--name",
                    "pump-health-cloud",
                    "--hardware",
                    HARDWARE,
                    "--out",
                    str(workdir / "device"),
                ],
            )
            == 0
        )

        _section("Attacker: one byte of v1.1.0 changed on the server")
        [target] = (repo / "targets" / "pump-health").glob("*.pump-health-1.1.0.bundle")
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        print("\n(expected: refused, the bytes differ from what the release keys signed)")
        failures += (
            _run(
                "edge-agent",
                edge_agent,
                [
                    "verify",
                    "--root",
                    str(root),
                    "--repo",
                    url,
                    "--name",
                    "pump-health",
                    "--hardware",
                    HARDWARE,
                    "--version",
                    "1.1.0",
                    "--out",
                    str(workdir / "device2"),
                ],
            )
            == 0
        )

    _section("Result")
    if failures:
        print(f"{failures} step(s) did not turn out as expected")
        return 1
    print("Every genuine bundle verified; the tampered and the wrong-hardware bundle were refused.")
    return 0
