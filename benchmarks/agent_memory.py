"""The agent process's memory while it serves, each import's share, and its time to ready.

A real fleet on loopback — release keys, an image repository and a director
served over HTTP — assigns a bundle of the sample model ``v2.tflite`` to a
device, and a real ``edge-agent run`` process installs it (fetcher child,
staging, self-test, health period) and then answers a few hundred requests
over its local API. Then:

- its resident memory (``VmRSS``) and peak (``VmHWM``) from ``/proc/PID/status``,
  and which packages the process imported (the agent runs under
  ``python -X importtime``, which reports every import on stderr), to confirm
  that the update machinery — tuf, urllib3, securesystemslib, cryptography —
  stays in the fetcher child and out of the serving process;
- the cost of one update check: the fetcher child the agent starts for every
  poll, its wall and CPU time and peak memory;
- each dependency's share: the resident memory of fresh interpreters that
  import, cumulatively, numpy, the TFLite runtime, pydantic, the manifest
  model, the agent's serving code and local API, the update machinery, the
  agent's install code and the daemon;
- the time from spawning ``edge-agent run`` (model installed) until
  ``GET /v2/health/live`` answers, and the agent's own ``ready_after_s``
  (counted from when its modules are imported), median of several starts;
- memory under concurrency: an agent serving a 1x128x128x3 image model with
  the default ``[api]`` limits gets 100, then 1,000 parallel requests (about
  1 MB of JSON each, one connection each): its RSS before, its peak
  (``VmHWM``, reset before each burst), its RSS 10 s after, and how many
  requests were answered and how many refused with 503;
- what parsing a body costs (``python -m benchmarks.agent_memory parse``): for
  4 MiB bodies of the JSON shapes that cost the most per byte (the deepest
  nesting a request may have, many tiny or empty arrays, objects, short ints,
  short strings, many tensors, parameters), each parsed and decoded as the
  local API does in a fresh interpreter: its peak RSS above the interpreter's
  before the parse (``VmHWM``, reset just before, against ``VmRSS``; the body
  is read from a file), tracemalloc's peak in another run (which
  sees Python's objects but not pydantic's own JSON tree), and the charge the
  API takes for it (``agent.api.admission.parse_cost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware_images.tflite_writer import build_image_model
from fleet_server.director import DirectorRepository
from fleet_server.release.bundle_builder import BundleSpec, build_bundle, load_feature_file
from fleet_server.release.keys import init_keys
from fleet_server.release.repository import ImageRepository
from testbed.http_repo import RepositoryServer
from testbed.waiting import free_port

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
DEVICE, HARDWARE, MODEL = "bench-1", "rpi4-arm64", "pump-health"
REQUESTS = 300
STARTS = 7
UPDATE_MACHINERY = ("tuf", "urllib3", "securesystemslib", "cryptography")

# Fresh interpreters, each running the code of the rows above it too. pydantic
# imports its machinery lazily, on the first model defined, so that row defines one.
IMPORT_STEPS: list[tuple[str, str]] = [
    ("python alone", ""),
    ("numpy", "import numpy"),
    ("TFLite runtime (tflite_runtime.interpreter)", "import tflite_runtime.interpreter"),
    ("pydantic, one model defined", "import pydantic\nclass M(pydantic.BaseModel):\n x: int"),
    ("protocol.manifest", "import protocol.manifest"),
    (
        "agent.serving, agent.api (h11, protocol.inference)",
        "import agent.serving, agent.api.http",
    ),
    (
        "update machinery: tuf, urllib3 (tuf brings securesystemslib, cryptography)",
        "import tuf.api.metadata, tuf.ngclient, urllib3",
    ),
    ("agent.ota.journal, agent.ota.installer", "import agent.ota.journal, agent.ota.installer"),
    ("agent.daemon", "import agent.daemon"),
]
_PROBE = """
import gc, sys, time
started = time.perf_counter()
exec(sys.argv[1])
elapsed = time.perf_counter() - started
gc.collect()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
packages = {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
print(int(status["VmRSS"].split()[0]), elapsed, *sorted(p for p in packages if p[0] != "_"))
"""


def status_kb(pid: int) -> dict[str, int]:
    """The memory figures of ``/proc/PID/status``, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


@dataclass
class Fleet:
    """An image repository and a director with v2 assigned to the device, served on loopback."""

    root: Path
    url: str
    image_root: Path
    director_root: Path


@contextmanager
def fleet(root: Path) -> Iterator[Fleet]:
    release_keys, director_keys = (
        init_keys(root / "keys" / "release"),
        init_keys(root / "keys" / "director"),
    )
    repo = ImageRepository(root / "repo")
    repo.create(release_keys)
    director = DirectorRepository(root / "director")
    director.create(director_keys)
    director.register(director_keys, DEVICE)
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        (MODELS / "v2.tflite").read_bytes(),
        MODELS / "baseline.npy",
        BundleSpec(
            name=MODEL,
            version="2.0.0",
            hardware_ids=[HARDWARE],
            feature_specs=features,
            classes=classes,
        ),
    )
    built.write(root / "v2.bundle")
    director.assign(
        director_keys, DEVICE, HARDWARE, repo.add_bundle(root / "v2.bundle", release_keys)
    )
    httpd = RepositoryServer(root)
    try:
        yield Fleet(
            root,
            httpd.url,
            repo.trusted_root_path,
            director.trusted_root_path,
        )
    finally:
        httpd.close()


def write_config(f: Fleet, data_dir: Path, port: int) -> Path:
    """An ``agent.toml`` for the device, its local API on ``port``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "agent.toml"
    path.write_text(
        "\n".join(
            [
                f'device_id = "{DEVICE}"',
                f'hardware_id = "{HARDWARE}"',
                f'data_dir = "{data_dir}"',
                "[image_repository]",
                f'url = "{f.url}/repo"',
                f'root = "{f.image_root}"',
                "[director]",
                f'url = "{f.url}/director"',
                f'root = "{f.director_root}"',
                "[api]",
                'host = "127.0.0.1"',
                f"port = {port}",
                "[update]",
                "poll_interval_s = 0.5",
                "health_period_s = 0.5",
            ]
        )
        + "\n"
    )
    return path


def agent_command(*python_flags: str) -> list[str]:
    """``edge-agent`` as installed (the console script), run by this interpreter."""
    script = Path(sys.executable).parent / "edge-agent"
    if script.exists():
        return [sys.executable, *python_flags, str(script)]
    return [sys.executable, *python_flags, "-m", "agent.cli"]


class Agent:
    """A real ``edge-agent run`` process in its own session, logging to DATA_DIR/agent.log."""

    def __init__(self, config: Path, *python_flags: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = config.parent
        (self.data_dir / "agent.json").unlink(missing_ok=True)
        self.log_path = self.data_dir / "agent.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*agent_command(*python_flags), "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"agent: no {what} (exit {self.proc.poll()}): {tail}")
            time.sleep(0.01)

    def info(self) -> dict[str, object] | None:
        try:
            return dict(json.loads((self.data_dir / "agent.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def installed(self) -> str | None:
        try:
            journal = json.loads((self.data_dir / "journal.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if journal.get("phase") != "idle":
            return None
        return (journal.get("installed") or {}).get("version")

    def status(self) -> dict[str, int]:
        return status_kb(self.proc.pid)

    def resident_files(self, top: int = 6) -> list[tuple[str, int]]:
        """The mapped files with the most resident pages, in kB, from ``/proc/PID/smaps``."""
        by_file: dict[str, int] = {}
        name = ""
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5:  # a mapping's header line
                name = first[5] if len(first) == 6 and first[5].startswith("/") else ""
            elif first[0] == "Rss:" and name:
                by_file[name] = by_file.get(name, 0) + int(first[1])
        return sorted(by_file.items(), key=lambda kv: -kv[1])[:top]

    def mapped_libraries(self) -> set[str]:
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text().splitlines()
        return {line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]}

    def imported_packages(self) -> set[str]:
        """Top-level packages the process imported, from its ``-X importtime`` report.

        The report also lists optional imports that failed (securesystemslib tries
        cloud KMS clients), so names not installed here are left out.
        """
        names = set()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("import time:") and "|" in line:
                name = line.rsplit("|", 1)[1].strip()
                names.add(name.split(".")[0])
        names.discard("imported package")
        return {n for n in names if importlib.util.find_spec(n) is not None}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def send_requests(port: int, n: int) -> None:
    rows = np.load(MODELS / "baseline.npy")[:n]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for row in rows:
        body = {
            "inputs": [
                {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": row.tolist()}
            ]
        }
        conn.request("POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode())
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200 or answer["parameters"]["stage"] != "active":
            raise RuntimeError(f"unexpected answer {response.status}: {answer}")
    conn.close()


def live(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v2/health/live")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def serving_memory(f: Fleet, data_dir: Path) -> dict[str, object]:
    """Install v2 through the director, serve REQUESTS requests; memory and imports."""
    agent = Agent(write_config(f, data_dir, 0), "-X", "importtime")
    try:
        agent.wait_for("install of v2", lambda: agent.installed() == "2.0.0")
        info = agent.info()
        assert info is not None
        send_requests(int(str(info["api"]).rsplit(":", 1)[1]), REQUESTS)
        status = agent.status()
        packages = agent.imported_packages()
        libraries = agent.mapped_libraries()
        files = agent.resident_files()
    finally:
        agent.stop()
    return {
        "status": status,
        "machinery_imported": sorted(set(UPDATE_MACHINERY) & packages),
        "third_party": sorted(
            p
            for p in packages - set(sys.stdlib_module_names) - {"agent", "protocol"}
            if not p.startswith("_")
        ),
        "machinery_libraries": sorted(
            lib for lib in libraries if any(f"/{m}/" in lib for m in UPDATE_MACHINERY)
        ),
        "libraries": len(libraries),
        "resident_files": files,
    }


def update_check(config: Path) -> dict[str, float]:
    """One update check as the agent runs it: a fetcher child, timed, with its peak memory.

    The peak is the child's own ``VmHWM``, sampled while it runs: the ``ru_maxrss`` a
    parent collects also counts the parent's memory at the time of the fork.
    """
    journal = json.loads((config.parent / "journal.json").read_text())
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.ota.fetch_worker",
            "check",
            "--config",
            str(config),
            "--installed-counter",
            str(journal["installed_counter"]),
        ],
        stdout=subprocess.PIPE,
    )
    peak_kb = 0
    while True:
        with contextlib.suppress(OSError, KeyError, ValueError):
            peak_kb = max(peak_kb, status_kb(proc.pid)["VmHWM"])
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.002)
    wall = time.perf_counter() - started
    proc.returncode = 0  # reaped by wait4
    assert proc.stdout is not None
    answer = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
    if answer["status"] != "assigned":
        raise RuntimeError(f"update check: {answer}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": peak_kb / 1024}


@dataclass
class ImportStep:
    label: str
    rss_mb: float
    import_s: float
    added: list[str]  # packages outside the standard library this step brought in


def import_shares(repeats: int = 5) -> list[ImportStep]:
    """Per cumulative step: resident MB, seconds to run the imports so far, new packages.

    Memory: the median of fresh runs; time: the fastest, the least disturbed by other work.
    """
    steps: list[ImportStep] = []
    code = ""
    seen: set[str] = set()
    for label, statement in IMPORT_STEPS:
        code = f"{code}\n{statement}"
        rss, took = [], []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", _PROBE, code], check=True, capture_output=True, text=True
            ).stdout.split()
            rss.append(int(out[0]) / 1024)
            took.append(float(out[1]))
        packages = set(out[2:])
        added = sorted(packages - seen - {"agent", "protocol"})
        seen |= packages
        steps.append(ImportStep(label, statistics.median(rss), min(took), added))
    return steps


def machinery_without_asking() -> list[str]:
    """Which update packages importing the agent's install code alone brings in."""
    code = (
        "import sys, agent.ota.journal, agent.ota.installer; "
        f"print(' '.join(m for m in {UPDATE_MACHINERY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.split()


def start_to_ready(f: Fleet, data_dir: Path) -> dict[str, object]:
    """Wall time from spawn to a live API, and the agent's ready_after_s, over STARTS starts."""
    port = free_port()
    config = write_config(f, data_dir, port)
    walls, own = [], []
    steady: dict[str, int] = {}
    for i in range(STARTS):
        started = time.perf_counter()
        agent = Agent(config)
        try:
            agent.wait_for("live API", lambda: live(port), timeout=30)
            walls.append(time.perf_counter() - started)
            agent.wait_for("agent.json", agent.info)
            info = agent.info()
            assert info is not None
            own.append(float(str(info["ready_after_s"])))
            if i == STARTS - 1:  # memory after a restart, without an install in its history
                send_requests(port, REQUESTS)
                steady = agent.status()
        finally:
            agent.stop()
    return {"wall_s": walls, "ready_after_s": own, "restarted_status": steady}


async def _post(port: int, path: str, body: bytes) -> tuple[int, str | None]:
    """One request on its own connection: its status and ``Retry-After``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        view = memoryview(body)
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(body), 65536):
                writer.write(view[start : start + 65536])
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
        data = await reader.read()
    except ConnectionError:
        return 0, None
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    head = data.partition(b"\r\n\r\n")[0].decode(errors="replace").split("\r\n")
    retry = next((h.split(":", 1)[1].strip() for h in head if h.lower().startswith("retry-")), None)
    return (int(head[0].split()[1]) if head[0] else 0), retry


def under_concurrency(root: Path, bursts: tuple[int, ...] = (100, 1000)) -> list[dict[str, float]]:
    """RSS before, peak during and 10 s after bursts of parallel image requests."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    np.save(root / "images.npy", rng.uniform(0, 1, size=(24, 128, 128, 3)).astype(np.float32))
    built = build_bundle(
        build_image_model(), root / "images.npy", BundleSpec("face", "1.0.0", [HARDWARE])
    )
    built.write(root / "face.bundle")
    release_keys = init_keys(root / "keys" / "release")
    director_keys = init_keys(root / "keys" / "director")
    repo = ImageRepository(root / "repo")
    repo.create(release_keys)
    director = DirectorRepository(root / "director")
    director.create(director_keys)
    director.register(director_keys, DEVICE)
    director.assign(
        director_keys, DEVICE, HARDWARE, repo.add_bundle(root / "face.bundle", release_keys)
    )
    httpd = RepositoryServer(root)
    f = Fleet(
        root,
        httpd.url,
        repo.trusted_root_path,
        director.trusted_root_path,
    )
    port = free_port()
    agent = Agent(write_config(f, root / "device", port))
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 128, 128, 3],
                    "datatype": "FP32",
                    "data": rng.uniform(0, 1, 128 * 128 * 3).astype(np.float32).tolist(),
                }
            ]
        }
    ).encode()
    path = "/v2/models/face/infer"

    async def burst(n: int) -> list[tuple[int, str | None]]:
        return await asyncio.gather(*(_post(port, path, body) for _ in range(n)))

    results = []
    try:
        agent.wait_for("install of face", lambda: agent.installed() == "1.0.0")
        for _ in range(10):
            asyncio.run(burst(1))
        for n in bursts:
            before = agent.status()["VmRSS"]
            Path(f"/proc/{agent.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            started = time.perf_counter()
            answers = asyncio.run(burst(n))
            took = time.perf_counter() - started
            peak = agent.status()["VmHWM"]
            time.sleep(10)
            statuses = [s for s, _ in answers]
            results.append(
                {
                    "parallel": n,
                    "body_mb": len(body) / 1e6,
                    "before_mb": before / 1024,
                    "peak_mb": peak / 1024,
                    "after_10s_mb": agent.status()["VmRSS"] / 1024,
                    "answered": statuses.count(200),
                    "refused": sum(1 for s, r in answers if s == 503 and r is not None),
                    "other": sum(1 for s, r in answers if s != 200 and (s != 503 or r is None)),
                    "wall_s": took,
                }
            )
    finally:
        agent.stop()
        httpd.close()
    return results


PARSE_BODY_BYTES = 4 * 1024 * 1024

# Runs in a fresh interpreter: argv = body file, parser ("api" or "pydantic"), tracemalloc (0/1).
_PARSE_PROBE = """
import contextlib, json, sys, tracemalloc
from pydantic import ValidationError
from agent.api.routes import parse_request
from protocol.inference import InferenceRequest, InferenceRequestError, decode_inputs
def status_kb(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
body = bytearray(open(sys.argv[1], "rb").read())
traced = sys.argv[3] == "1"
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status_kb("VmRSS")
if traced:
    tracemalloc.start()
with contextlib.suppress(InferenceRequestError, ValidationError):
    request = parse_request(body) if sys.argv[2] == "api" else (
        InferenceRequest.model_validate_json(body))
    decode_inputs(request)
peak = tracemalloc.get_traced_memory()[1] if traced else 0
print(json.dumps({"rss": (status_kb("VmHWM") - before) * 1024, "traced": peak}))
"""


def hostile_bodies(size: int = PARSE_BODY_BYTES) -> dict[str, bytes]:
    """Request bodies of about ``size`` bytes, of the JSON shapes that cost most once parsed."""

    def request(data: str, shape: list[int], count: int = 1) -> bytes:
        tensor = '{"name": "x%d", "shape": %s, "datatype": "FP32", "data": %s}'
        inputs = ",".join(tensor % (i, json.dumps(shape), data) for i in range(count))
        return ('{"inputs": [' + inputs + "]}").encode()

    def repeat(item: str, sep: str = ",") -> tuple[str, int]:
        n = size // (len(item) + len(sep))
        return "[" + sep.join([item] * n) + "]", n

    one = '{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}'
    rank = 32
    deepest = "[" * (rank - 1) + "0" + "]" * (rank - 1)
    bodies = {
        "short ints 0": request(*(lambda d, n: (d, [n]))(*repeat("0"))),
        'floats "0.0"': request(*(lambda d, n: (d, [n]))(*repeat("0.0"))),
        "ints 1000": request(*(lambda d, n: (d, [n]))(*repeat("1000"))),
        "long floats": request(*(lambda d, n: (d, [n]))(*repeat("0.12345678901234567"))),
        'short strings "ab"': request(*(lambda d, n: (d, [n]))(*repeat('"ab"'))),
        "tiny arrays [[0],[0],...]": request(*(lambda d, n: (d, [n, 1]))(*repeat("[0]"))),
        "empty arrays [[],[],...]": request(*(lambda d, n: (d, [n, 0]))(*repeat("[]"))),
        "deepest allowed (rank 32)": request(
            *(lambda d, n: (d, [n] + [1] * (rank - 1)))(*repeat(deepest))
        ),
        "nesting 100 deep (refused)": request(
            *(lambda d, n: (d, [n] + [1] * 98))(*repeat("[" * 98 + "0" + "]" * 98))
        ),
        "empty objects [{},{},...]": request(*(lambda d, n: (d, [n]))(*repeat("{}"))),
        "many tensors": request("[0]", [1], count=size // 60),
        "parameters [{...},...]": (
            '{"parameters": {"p": ' + repeat('{"": 0}')[0] + '}, "inputs": [' + one + "]}"
        ).encode(),
    }
    return bodies


def parse_costs(size: int = PARSE_BODY_BYTES) -> list[dict[str, object]]:
    """Each hostile body: its structure, the charge, and what parsing it costs (see above)."""
    from agent.api.admission import MAX_JSON_DEPTH, parse_cost, request_cost
    from agent.api.jsonscan import scan_structure

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in hostile_bodies(size).items():
            path = Path(tmp) / "body.json"
            path.write_bytes(body)
            scan_started = time.perf_counter()
            structure = scan_structure(body, 1000)
            scan_s = time.perf_counter() - scan_started
            row: dict[str, object] = {
                "shape": name,
                "body_bytes": len(body),
                "depth": structure.depth,
                "arrays": structure.arrays,
                "objects": structure.objects,
                "scan_ms": scan_s * 1000,
                "refused": structure.depth > MAX_JSON_DEPTH,
                "charge_before": request_cost(len(body)),
                "charge": parse_cost(len(body), structure),
            }
            for parser in ("api", "pydantic"):
                for traced in ("0", "1"):
                    out = subprocess.run(
                        [sys.executable, "-c", _PARSE_PROBE, str(path), parser, traced],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    got = json.loads(out.stdout)
                    key = f"{parser}_{'traced' if traced == '1' else 'rss'}"
                    row[key] = got["traced" if traced == "1" else "rss"] + len(body)
            rows.append(row)
    return rows


def parse_main() -> None:
    """Only the parse-cost figures (``python -m benchmarks.agent_memory parse``)."""
    print(
        "bytes per body byte (the body included): peak RSS and tracemalloc, parsed as the "
        "API does (json, then pydantic) and by pydantic's JSON parser; the charge"
    )
    for r in parse_costs():
        b = r["body_bytes"]
        assert isinstance(b, int)

        def per(key: str, b: int = b, r: dict[str, object] = r) -> str:
            value = r[key]
            assert isinstance(value, int)
            return f"{value / b:5.1f}"

        print(
            f"  {r['shape']:28} {b / 2**20:.1f} MiB depth {r['depth']:>3} arrays "
            f"{r['arrays']:>8} objects {r['objects']:>8} scan {r['scan_ms']:5.0f} ms | API: RSS "
            f"{per('api_rss')} traced {per('api_traced')} | pydantic JSON: RSS "
            f"{per('pydantic_rss')} traced {per('pydantic_traced')} | charge {per('charge')}"
            f"{' (refused: too deep)' if r['refused'] else ''}"
        )


def run() -> dict[str, object]:
    """Measure and return the figures."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with fleet(tmp / "fleet") as f:
            data_dir = tmp / "device"
            serving = serving_memory(f, data_dir)
            check = update_check(data_dir / "agent.toml")
            ready = start_to_ready(f, data_dir)
        concurrency = under_concurrency(tmp / "face")
    return {
        "concurrency": concurrency,
        "serving": serving,
        "update_check": check,
        "imports": import_shares(),
        "machinery_from_install_code": machinery_without_asking(),
        "ready": ready,
    }


def main() -> None:
    r = run()
    serving = r["serving"]
    assert isinstance(serving, dict)
    s = serving["status"]
    print(f"edge-agent run serving v2, installed through the director, after {REQUESTS} requests:")
    print(
        f"  VmRSS {s['VmRSS'] / 1024:.1f} MB (anonymous {s['RssAnon'] / 1024:.1f}, "
        f"file-backed {s['RssFile'] / 1024:.1f}), VmHWM {s['VmHWM'] / 1024:.1f} MB"
    )
    ready = r["ready"]
    assert isinstance(ready, dict)
    rs = ready["restarted_status"]
    print(
        f"  after a restart (no install since start), {REQUESTS} requests: "
        f"VmRSS {rs['VmRSS'] / 1024:.1f} MB, VmHWM {rs['VmHWM'] / 1024:.1f} MB"
    )
    print(
        "  file-backed pages, largest: "
        + ", ".join(
            f"{Path(name).name} {kb / 1024:.1f} MB" for name, kb in serving["resident_files"]
        )
    )
    machinery = serving["machinery_imported"] or ["none"]
    print(f"  update machinery imported by the serving process: {', '.join(machinery)}")
    libs = serving["machinery_libraries"]
    print(f"  its shared objects mapped: {len(libs)} of {serving['libraries']} ({', '.join(libs)})")
    print(f"  third-party packages imported: {', '.join(serving['third_party'])}")
    c = r["update_check"]
    assert isinstance(c, dict)
    print(
        f"one update check (the fetcher child each poll starts): {c['wall_s']:.2f} s wall, "
        f"{c['cpu_s']:.2f} s CPU, peak {c['peak_mb']:.1f} MB"
    )
    print("fresh interpreters importing, cumulatively: resident memory, share, import time so far")
    previous = 0.0
    imports = r["imports"]
    assert isinstance(imports, list)
    for step in imports:
        share = f"+{step.rss_mb - previous:5.1f}" if previous else "     "
        print(f"  {step.label:<75} {step.rss_mb:6.1f} MB {share} MB {step.import_s * 1000:6.0f} ms")
        unnamed = [p for p in step.added if p not in step.label and not p.startswith("cython")]
        if unnamed:
            print(f"      also brings in {', '.join(unnamed)}")
        previous = step.rss_mb
    pulled = r["machinery_from_install_code"]
    assert isinstance(pulled, list)
    print(
        "  importing agent.ota.journal and agent.ota.installer alone brings in: "
        f"{', '.join(pulled) or 'nothing of the update machinery'}"
    )
    print(
        "parallel image requests (1x128x128x3 as JSON, one connection each), default [api] "
        "limits (64 connections, 80 MiB in flight):"
    )
    concurrency = r["concurrency"]
    assert isinstance(concurrency, list)
    for c in concurrency:
        print(
            f"  {c['parallel']:>5} x {c['body_mb']:.2f} MB: VmRSS {c['before_mb']:.1f} MB before, "
            f"peak {c['peak_mb']:.1f} MB, {c['after_10s_mb']:.1f} MB 10 s after; "
            f"{c['answered']} answered, {c['refused']} refused (503 + Retry-After), "
            f"{c['other']} other, in {c['wall_s']:.1f} s"
        )
    walls, own = ready["wall_s"], ready["ready_after_s"]
    print(
        f"start to live API, median of {STARTS}: {statistics.median(walls) * 1000:.0f} ms "
        f"(range {min(walls) * 1000:.0f}-{max(walls) * 1000:.0f}); the agent's own "
        f"ready_after_s {statistics.median(own) * 1000:.0f} ms"
    )


# The serving agent's libraries and nothing of ours: the model loaded in tflite-runtime
# and invoked per request, an asyncio server parsing HTTP with h11, JSON, an SQLite
# outbox row per request, LZMA, and an aiomqtt link publishing a heartbeat.
_FLOOR = r"""
import asyncio, json, lzma, os, sqlite3, sys
import h11, numpy as np, aiomqtt
from tflite_runtime.interpreter import Interpreter
if os.environ.get("FLOOR_PYDANTIC"):
    import pydantic
    class Probe(pydantic.BaseModel):
        x: int
model, db, broker_port, topic = sys.argv[1:5]
# The window codec's filters: LZMA2 with a 4 KiB dictionary.
FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 4096, "lc": 1, "lp": 0, "pb": 0}]
it = Interpreter(model_path=model, num_threads=1)  # as model_runtime loads it
it.allocate_tensors()
inp, out = it.get_input_details()[0], it.get_output_details()[0]
con = sqlite3.connect(db)
con.execute("create table if not exists outbox (id integer primary key, body blob)")

async def serve(reader, writer):
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                break
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            body = b""
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
            req = json.loads(body or b"{}")
            if req:
                x = np.asarray(req["inputs"][0]["data"], np.float32).reshape(inp["shape"])
                it.set_tensor(inp["index"], x)
                it.invoke()
                y = it.get_tensor(out["index"])
                answer = {"outputs": [{"name": "y", "data": y.ravel().tolist()}],
                          "parameters": {"stage": "active"}}
                packed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=FILTERS)
                con.execute("insert into outbox (body) values (?)", (packed,))
                con.commit()
            else:
                answer = {}
            payload = json.dumps(answer).encode()
            writer.write(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json"), ("content-length", str(len(payload)))])))
            writer.write(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
            await writer.drain()
            conn.start_next_cycle()
    writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with aiomqtt.Client("127.0.0.1", int(broker_port)) as client:
        await client.publish(topic, b"up", qos=1)
        print(server.sockets[0].getsockname()[1], flush=True)
        while True:
            await client.publish(topic, b"heartbeat", qos=1)
            await asyncio.sleep(1)

asyncio.run(main())
"""


def lean_floor(rounds: int = 3) -> list[dict[str, float]]:
    """The serving agent's RSS against the floor of its libraries, alternating, in one run.

    Each round: ``edge-agent run`` with the MQTT link to the broker on 127.0.0.1:1883
    (its own namespace) and telemetry on, v2 installed through the director, after
    REQUESTS requests; the same with ``MALLOC_ARENA_MAX=2``; the floor process
    (``_FLOOR``: the same libraries, none of our code, no pydantic) after the same
    requests; the floor with pydantic and one model defined.
    """
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with fleet(tmp / "fleet") as f:
            for i in range(rounds):
                row: dict[str, float] = {}
                for label, env in (("agent", {}), ("agent_arena2", {"MALLOC_ARENA_MAX": "2"})):
                    data_dir = tmp / f"device-{label}-{i}"
                    config = write_config(f, data_dir, 0)
                    namespace = f"bench-lean-{os.getpid()}-{i}-{label.replace('_', '-')}"
                    with config.open("a") as c:
                        c.write(
                            '[server]\nbroker = "mqtt://127.0.0.1:1883"\n'
                            f'[mqtt]\nnamespace = "{namespace}"\n'
                        )
                    agent = Agent(config, env=env)
                    try:
                        agent.wait_for("install of v2", lambda a=agent: a.installed() == "2.0.0")
                        info = agent.info()
                        assert info is not None
                        send_requests(int(str(info["api"]).rsplit(":", 1)[1]), REQUESTS)
                        time.sleep(1.0)
                        row[label] = agent.status()["VmRSS"] / 1024
                    finally:
                        agent.stop()
                for label, env in (("floor", {}), ("floor_pydantic", {"FLOOR_PYDANTIC": "1"})):
                    proc = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _FLOOR,
                            str(MODELS / "v2.tflite"),
                            str(tmp / f"{label}-{i}.db"),
                            "1883",
                            f"bench-lean-{os.getpid()}/{label}",
                        ],
                        stdout=subprocess.PIPE,
                        env={**os.environ, **env},
                        start_new_session=True,
                    )
                    try:
                        assert proc.stdout is not None
                        port = int(proc.stdout.readline())
                        send_requests(port, REQUESTS)
                        time.sleep(1.0)
                        row[label] = status_kb(proc.pid)["VmRSS"] / 1024
                    finally:
                        os.killpg(proc.pid, signal.SIGTERM)
                        proc.wait()
                rows.append(row)
                print(row, flush=True)
    return rows


def lean_main() -> None:
    """``python -m benchmarks.agent_memory floor``: the agent against its libraries' floor."""
    rows = lean_floor()
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(
            f"  {key:<16} VmRSS median {statistics.median(values):5.1f} MB "
            f"(range {min(values):.1f}-{max(values):.1f}, n = {len(values)})"
        )


def concurrency_main() -> None:
    """Only the memory-under-concurrency figures (``python -m benchmarks.agent_memory burst``)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        for c in under_concurrency(Path(tmp_name) / "face"):
            print(c)


if __name__ == "__main__":
    if sys.argv[1:] == ["burst"]:
        concurrency_main()
    elif sys.argv[1:] == ["parse"]:
        parse_main()
    elif sys.argv[1:] == ["floor"]:
        lean_main()
    else:
        main()
