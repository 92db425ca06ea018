"""Verifying a 50 MB bundle against ``sha256sum`` of the same file, in one run.

The bundle holds a real ``.tflite`` model whose weights make it about 50 MB.
Each round first hashes the released file with ``sha256sum`` (the floor: one
read and one hash, in C), then verifies it as a device would — TUF refresh of
root, timestamp, snapshot and targets, download into an empty directory,
hashing while writing, manifest check — from a directory repository, and
then from the same repository over HTTP on loopback; last, the whole
``edge-agent verify`` command as a process of its own (interpreter start and
imports included), from the directory and over HTTP. Rounds alternate so all
see the same machine state; the ratio is of the medians.

The command runs as installed: the project's modules are compiled to bytecode
first, as ``pip install`` does (an environment with ``PYTHONDONTWRITEBYTECODE``
would otherwise compile them from source in every run). ``--before SCRIPT``
times another tree's ``edge-agent`` in the same rounds; compile that tree too
(``python -m compileall -q agent protocol``) for a fair comparison.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.ota.verify import verify_bundle
from benchmarks.installed import compile_tree
from firmware_images.tflite_writer import GraphBuilder
from fleet_server.release.bundle_builder import BundleSpec, build_bundle
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ImageRepository
from testbed.http_repo import RepositoryServer

TARGET_MB = 50
ROUNDS = 7


def large_model() -> bytes:
    """A real model of about 50 MB: a wide fully connected layer."""
    inputs = 16
    width = TARGET_MB * 1024 * 1024 // (4 * inputs)
    rng = np.random.default_rng(0)
    g = GraphBuilder("50 MB benchmark model")
    x = g.add_input("x", [1, inputs])
    hidden = g.fully_connected(
        x, rng.normal(size=(width, inputs)).astype(np.float32), np.zeros(width), "wide"
    )
    g.mark_output(g.mean(hidden, [1], "pooled"))
    return g.to_bytes()


def compile_project() -> None:
    """Compile the packages the command imports, as an installed package ships them."""
    compile_tree(packages=("agent", "protocol"))


def run(before: Path | None = None) -> dict[str, float]:
    """Measure and return the figures (seconds and ratios).

    ``before``: another tree's ``edge-agent`` script, timed in the same rounds
    (from the directory repository) as the baseline of a change.
    """
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        baseline = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
        built = build_bundle(
            large_model(),
            {"x": baseline},
            BundleSpec(name="big", version="1.0.0", hardware_ids=["bench"]),
        )
        built.write(tmp / "big.bundle")
        keys = init_keys(tmp / "keys")
        repo = ImageRepository(tmp / "repo")
        repo.create(keys)
        released = repo.add_bundle(tmp / "big.bundle", keys)
        [target] = (repo.targets_dir / "big").glob("*.bundle")
        httpd = RepositoryServer(repo.path)
        url = httpd.url

        def verify(source: str, i: int) -> float:
            out = tmp / f"out-{i}"
            started = time.perf_counter()
            verify_bundle(
                trusted_root=repo.trusted_root_path,
                repository=source,
                name="big",
                hardware_id="bench",
                out_dir=out,
            )
            elapsed = time.perf_counter() - started
            shutil.rmtree(out)
            return elapsed

        edge_agent = Path(sys.executable).with_name("edge-agent")

        # CPU time (user + system) of each process as well: on a machine shared with
        # other work it is inflated less than wall time.
        cpu: dict[str, list[float]] = {}

        def children_cpu() -> float:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            return usage.ru_utime + usage.ru_stime

        def verify_command(source: str, i: int, script: Path = edge_agent) -> float:
            """The whole ``edge-agent verify`` process, as a user runs it."""
            out = tmp / f"cmd-{i}"
            cpu_before = children_cpu()
            started = time.perf_counter()
            subprocess.run(
                [
                    str(script),
                    "verify",
                    "--root",
                    str(repo.trusted_root_path),
                    "--repo",
                    source,
                    "--name",
                    "big",
                    "--hardware",
                    "bench",
                    "--out",
                    str(out),
                ],
                check=True,
                capture_output=True,
            )
            elapsed = time.perf_counter() - started
            key = (
                "before"
                if script != edge_agent
                else f"command {'http' if '://' in source else 'dir'}"
            )
            cpu.setdefault(key, []).append(children_cpu() - cpu_before)
            shutil.rmtree(out)
            return elapsed

        def timed(command: list[str]) -> float:
            cpu_before = children_cpu()
            started = time.perf_counter()
            subprocess.run([*command, str(target)], check=True, capture_output=True)
            elapsed = time.perf_counter() - started
            cpu.setdefault(command[0], []).append(children_cpu() - cpu_before)
            return elapsed

        sha256sum = ["sha256sum"]
        # OpenSSL's SHA-256 uses the CPU's SHA extensions where coreutils may not: a second,
        # harder floor, so the ratio is not flattered by a slow baseline.
        openssl = ["openssl", "dgst", "-sha256"] if shutil.which("openssl") else sha256sum
        compile_project()
        timed(sha256sum)
        verify(str(repo.path), -1)  # warm the page cache and imports
        verify_command(str(repo.path), -1)
        base, ossl, local, http, cmd_local, cmd_http = [], [], [], [], [], []
        cmd_before: list[float] = []
        if before is not None:
            verify_command(str(repo.path), -2, before)
        for i in range(ROUNDS):
            if before is not None:
                cmd_before.append(verify_command(str(repo.path), i + ROUNDS, before))
            base.append(timed(sha256sum))
            ossl.append(timed(openssl))
            local.append(verify(str(repo.path), i))
            http.append(verify(url, i))
            cmd_local.append(verify_command(str(repo.path), i))
            cmd_http.append(verify_command(url, i))
        httpd.close()
    b, o, lo, ht, cl, ch = (
        statistics.median(v) for v in (base, ossl, local, http, cmd_local, cmd_http)
    )
    figures = {
        "command_dir_s": cl,
        "command_http_s": ch,
        "bundle_mb": released.length / 1e6,
        "sha256sum_s": b,
        "openssl_s": o,
        "verify_dir_s": lo,
        "verify_http_s": ht,
        "ratio_dir": lo / b,
        "ratio_http": ht / b,
        "ratio_dir_openssl": lo / o,
    }
    if cmd_before:
        figures["command_before_s"] = statistics.median(cmd_before)
    for key, values in cpu.items():
        figures[f"cpu {key}"] = statistics.median(values)
    return figures


def main() -> None:
    before = None
    if "--before" in sys.argv:
        before = Path(sys.argv[sys.argv.index("--before") + 1])
    r = run(before)
    print(f"bundle: {r['bundle_mb']:.1f} MB, median of {ROUNDS} alternating rounds")
    print(f"  sha256sum                 {r['sha256sum_s'] * 1000:8.1f} ms   1.00x")
    print(
        f"  openssl dgst -sha256      {r['openssl_s'] * 1000:8.1f} ms   "
        f"{r['openssl_s'] / r['sha256sum_s']:.2f}x"
    )
    print(f"  verify (directory repo)   {r['verify_dir_s'] * 1000:8.1f} ms   {r['ratio_dir']:.2f}x")
    print(
        f"  verify (HTTP, loopback)   {r['verify_http_s'] * 1000:8.1f} ms   {r['ratio_http']:.2f}x"
    )
    print(f"  verify (directory) against openssl: {r['ratio_dir_openssl']:.2f}x")
    rows = [("directory repo", "command_dir_s"), ("HTTP, loopback", "command_http_s")]
    if "command_before_s" in r:
        rows.append((f"directory repo, {before}", "command_before_s"))
    for label, key in rows:
        print(
            f"  edge-agent verify, whole process ({label}) {r[key] * 1000:8.1f} ms   "
            f"{r[key] / r['sha256sum_s']:.2f}x sha256sum, "
            f"{r[key] / r['openssl_s']:.2f}x openssl"
        )
    base_cpu, ossl_cpu = r["cpu sha256sum"], r.get("cpu openssl", r["cpu sha256sum"])
    print("CPU time (user + system), medians:")
    for key, value in r.items():
        if key.startswith("cpu "):
            print(
                f"  {key[4:]:<16} {value * 1000:8.1f} ms   {value / base_cpu:.2f}x sha256sum, "
                f"{value / ossl_cpu:.2f}x openssl"
            )


if __name__ == "__main__":
    main()
