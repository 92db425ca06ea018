"""``make check-arm64``: the agent-only install on 64-bit ARM, under qemu-user.

In a Debian bookworm arm64 root filesystem (``tools/arm64/rootfs.sh``, built once and
kept in ``~/.cache/edgefleet/``) this installs the working tree's ``edgefleet[agent]``
into a fresh virtual environment, then, with the release tooling, the image
repository and the director running on this machine:

1. ``edge-agent verify`` verifies a real signed bundle (and refuses one for other hardware);
2. ``edge-agent run`` installs v1 under the director and answers inferences;
3. v2 is assigned, the agent is killed (SIGKILL) while holding mid-install, restarted,
   serves a verified model at once, and commits v2.

The chroot sees ``/proc``, ``/sys`` (without it the runtime silently loses its XNNPACK
delegate), ``/dev`` and this run's folder at the same path as here. Exit 0 when every
step passed; each step prints one line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fleet_server.release.keys import init_keys
from testbed.fleet import AgentProcess, Fleet, reap_agents
from testbed.images import HARDWARE, make_bundle
from tools import agent_env
from tools.agent_env import SERVER_ONLY, SOURCES, copy_sources

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "pump-arm64"
VENV = "/opt/edgefleet-agent"
ROWS = [[1500.0, 10, 20, 40, 40, 1, 1, 1, 3, 3, 3, 0.5, 0.2, 0.1, 0.1, 60]] * 4
HOST_CA_SOURCE = "/etc/ssl/certs/ca-certificates.crt"
HOST_CA = "/etc/ssl/host-ca-certificates.crt"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
RUNTIMES = agent_env.RUNTIMES


def say(line: str) -> None:
    print(f"check-arm64: {line}", flush=True)


def rootfs() -> Path:
    done = subprocess.run(
        [str(ROOT / "tools" / "arm64" / "rootfs.sh")], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return Path(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def mounted(fs: Path, work: Path) -> Iterator[None]:
    """``/proc``, ``/sys``, ``/dev`` and ``work`` (at its own path) inside ``fs``."""
    done: list[Path] = []
    try:
        for source, options in (
            ("/proc", ["-t", "proc", "proc"]),
            ("/sys", ["--rbind", "/sys"]),
            ("/dev", ["--rbind", "/dev"]),
            (str(work), ["--bind", str(work)]),
        ):
            target = fs / source.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *options, str(target)], check=True)
            done.append(target)
        shutil.copyfile("/etc/resolv.conf", fs / "etc" / "resolv.conf")
        if Path(HOST_CA_SOURCE).exists():
            shutil.copyfile(HOST_CA_SOURCE, fs / HOST_CA.lstrip("/"))
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "--lazy", "--recursive", str(target)], check=False)


def chroot(fs: Path, *command: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    # The host's certificate authorities and proxy, so that pip reaches the index as here.
    env |= {k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    if (fs / HOST_CA.lstrip("/")).exists():
        env["PIP_CERT"] = HOST_CA
    return subprocess.run(
        [CHROOT, str(fs), *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def expect(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        raise SystemExit(f"check-arm64: FAILED {what}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def install(fs: Path, runtime: str) -> float:
    """The working tree's ``edgefleet[runtime]`` in a new venv at :data:`VENV`; seconds taken.

    The wheel (pure Python) is built here from a copy of the tree; pip in the root
    filesystem installs it with its dependencies' aarch64 wheels from the index.
    """
    started = time.monotonic()
    target = fs / VENV.lstrip("/")
    wheels = fs / "opt" / "edgefleet-wheels"
    for old in (target, wheels):
        shutil.rmtree(old, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-src-") as tmp:
        expect(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "-w",
                    str(wheels),
                    str(copy_sources(ROOT, Path(tmp))),
                ],
                capture_output=True,
                text=True,
            ),
            "building the wheel",
        )
    (wheel,) = wheels.glob("edgefleet-*.whl")
    shutil.copyfile(ROOT / RUNTIMES[runtime], wheels / RUNTIMES[runtime])
    inside = "/opt/edgefleet-wheels"
    expect(chroot(fs, "python3", "-m", "venv", VENV), "python3 -m venv")
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "--disable-pip-version-check"]
    expect(
        chroot(
            fs, *pip, "-c", f"{inside}/{RUNTIMES[runtime]}", f"{inside}/{wheel.name}[{runtime}]"
        ),
        f"pip install edgefleet[{runtime}]",
    )
    return time.monotonic() - started


def installed_from_this_tree(fs: Path, runtime: str) -> bool:
    """Whether :data:`VENV` holds ``edgefleet[runtime]`` built from the working tree as it is.

    Every file the installed ``edgefleet`` lists in its RECORD has the hash of the tree's
    file, every Python file of the tree is installed, the runtime is the one asked for and
    the constraints file is the tree's.
    """
    site = fs / VENV.lstrip("/") / "lib" / "python3.11" / "site-packages"
    records = list(site.glob("edgefleet-*.dist-info/RECORD"))
    marker = {"agent": "tflite_runtime-*.dist-info", "litert": "ai_edge_litert-*.dist-info"}
    used = fs / "opt" / "edgefleet-wheels" / RUNTIMES[runtime]
    if len(records) != 1 or not list(site.glob(marker[runtime])) or not used.exists():
        return False
    if used.read_bytes() != (ROOT / RUNTIMES[runtime]).read_bytes():
        return False
    listed: set[str] = set()
    for row in csv.reader(records[0].read_text().splitlines()):
        path, digest = row[0], row[1]
        # Skipped: bytecode (no hash), the distribution's metadata, the generated scripts.
        if not digest.startswith("sha256=") or ".dist-info/" in path or path.startswith(".."):
            continue
        listed.add(path)
        try:
            data = (ROOT / path).read_bytes()
        except OSError:
            return False
        ours = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if digest != f"sha256={ours}":
            return False
    packages = [n for n in SOURCES if (ROOT / n).is_dir()]
    tree = {str(p.relative_to(ROOT)) for n in packages for p in (ROOT / n).rglob("*.py")}
    return tree <= listed


def probe(fs: Path) -> dict[str, object]:
    script = (
        "import importlib.util as u, json, platform, sys, numpy;"
        "from model_runtime import TFLiteRuntime;"
        "r = TFLiteRuntime();"
        "print(json.dumps({'machine': platform.machine(), 'libc': platform.libc_ver(),"
        "'python': platform.python_version(), 'numpy': numpy.__version__, 'runtime': r.name,"
        "'server_packages': [m for m in sys.argv[1:] if u.find_spec(m)]}))"
    )
    out = expect(chroot(fs, f"{VENV}/bin/python", "-c", script, *SERVER_ONLY), "the probe")
    return dict(json.loads(out.strip().splitlines()[-1]))


def venv_size(fs: Path) -> str:
    """What the environment takes on disk, by distribution (measured by its own Python)."""
    out = expect(chroot(fs, f"{VENV}/bin/python", "-c", agent_env.SIZES), "measuring the venv")
    by_name = sorted(json.loads(out.strip().splitlines()[-1]).items(), key=lambda kv: -kv[1])
    lines = [f"{VENV}: {agent_env.disk_usage(fs / VENV.lstrip('/')) / 1e6:.1f} MB on disk"]
    lines += [f"  {size / 1e6:6.1f} MB  {name}" for name, size in by_name]
    return "\n".join(lines)


def check(fs: Path, work: Path, runtime: str) -> None:
    if installed_from_this_tree(fs, runtime):
        say(f"edgefleet[{runtime}] in {fs}{VENV} is this working tree's: reused")
    else:
        say(f"installing edgefleet[{runtime}] from {ROOT} in {fs} (minutes under emulation)")
        seconds = install(fs, runtime)
        say(f"installed in {seconds:.0f} s")
    facts = probe(fs)
    say(f"installed: {json.dumps(facts)}")
    if facts["machine"] != "aarch64" or facts["server_packages"]:
        raise SystemExit(f"check-arm64: FAILED: not an agent-only aarch64 install: {facts}")
    print(venv_size(fs), flush=True)

    keys = init_keys(work / "keys" / "release"), init_keys(work / "keys" / "director")
    (work / "built").mkdir()
    built = {v: make_bundle(work / "built", v, f"{v[1]}.0.0") for v in ("v1", "v2")}
    fleet = Fleet(work / "fleet", *keys)
    edge_agent = [CHROOT, str(fs), f"{VENV}/bin/edge-agent"]
    try:
        fleet.director.register(fleet.director_keys, DEVICE)
        released = {k: fleet.release(v) for k, v in built.items()}

        verify = [
            *edge_agent,
            "verify",
            "--root",
            str(fleet.repo.trusted_root_path),
            "--repo",
            str(fleet.repo.path),
            "--name",
            "pump-health",
            "--out",
        ]
        out = expect(
            subprocess.run(
                [*verify, str(work / "verified"), "--hardware", HARDWARE, "--json"],
                capture_output=True,
                text=True,
                timeout=600,
            ),
            "edge-agent verify",
        )
        say(f"verify: {out.strip()}")
        refused = subprocess.run(
            [*verify, str(work / "refused"), "--hardware", "jetson-orin"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if refused.returncode != 3 or "refused pump-health for jetson-orin" not in refused.stderr:
            raise SystemExit(f"check-arm64: FAILED: verify for other hardware: {refused.stderr}")
        say(f"verify, other hardware: exit 3, {refused.stderr.strip()}")

        agent = AgentProcess(fleet.agent_config(DEVICE), "--verbose", command=edge_agent)
        url = agent.wait_ready(timeout=300)
        fleet.assign(DEVICE, released["v1"])
        agent.wait_for("v1 committed", lambda: installed(agent) == "1.0.0", timeout=600)
        answers = [infer(agent, url) for _ in range(20)]
        say(f"run: v1 committed, {len(answers)} inferences answered by {answers[-1][0]}")
        agent.stop()
        # The runtime takes its XNNPACK delegate only when it can read the CPU's features
        # from /sys; without it the models run on the slower reference kernels.
        log = (agent.data_dir / "agent.log").read_text(errors="replace")
        if "Created TensorFlow Lite XNNPACK delegate" not in log:
            raise SystemExit("check-arm64: FAILED: the runtime ran without its XNNPACK delegate")
        say("run: the runtime uses its XNNPACK delegate")

        agent = AgentProcess(
            fleet.agent_config(DEVICE, faults={"hold_at": ["staged"]}), command=edge_agent
        )
        agent.wait_ready(timeout=300)
        fleet.assign(DEVICE, released["v2"])
        agent.wait_for("the install of v2 to hold", lambda: agent.holding("staged"), timeout=600)
        agent.kill()
        say("killed (SIGKILL) mid-install of v2, holding at 'staged'")

        agent = AgentProcess(fleet.agent_config(DEVICE), command=edge_agent)
        url = agent.wait_ready(timeout=300)
        version, stage = infer(agent, url)
        if version not in ("1.0.0", "2.0.0"):
            raise SystemExit(f"check-arm64: FAILED: after the kill the agent served {version}")
        say(f"restarted: serving {version} ({stage}) at once")
        agent.wait_for(
            "v2 committed or refused",
            lambda: installed(agent) == "2.0.0" or refusal(agent) is not None,
            timeout=600,
        )
        if installed(agent) != "2.0.0":
            raise SystemExit(f"check-arm64: FAILED: v2 refused after the restart: {refusal(agent)}")
        version, stage = infer(agent, url)
        say(f"restarted: v2 committed and answering ({version}, {stage})")
        agent.stop()
    finally:
        reap_agents()
        fleet.close()


def installed(agent: AgentProcess) -> str | None:
    return (agent.journal().get("installed") or {}).get("version")


def refusal(agent: AgentProcess) -> dict[str, object] | None:
    outcome = agent.journal().get("last_outcome") or {}
    return dict(outcome) if outcome.get("result") == "refused" else None


def infer(agent: AgentProcess, url: str) -> tuple[str, str]:
    answer = agent.infer(url, ROWS)
    if answer.status != 200:
        raise SystemExit(f"check-arm64: FAILED: inference answered {answer.status}: {answer.data}")
    body = json.loads(answer.data)
    return str(body["model_version"]), str(body["parameters"]["stage"])


@contextlib.contextmanager
def one_check_at_a_time() -> Iterator[None]:
    """Hold the machine's arm64 lock: every check shares one root filesystem, its /opt
    and its mounts, so a second check (another checkout, the other runtime) waits."""
    cache = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "arm64-check.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another check-arm64 holds {cache / 'arm64-check.lock'}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make check-arm64", description=__doc__)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="agent")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("check-arm64: needs root (debootstrap, mount, chroot)")
    say(f"host {platform.machine()}, {platform.platform()}")
    with one_check_at_a_time():
        fs = rootfs()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="edgefleet-arm64-") as tmp:
            work = Path(tmp)
            with mounted(fs, work):
                check(fs, work, args.runtime)
    say(f"PASSED ({args.runtime}) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
