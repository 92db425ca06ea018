"""Signing director metadata for 10,000 devices, against its bare parts, in one run.

The director keeps one small TUF repository per device; an assignment
(:meth:`DirectorRepository.assign`) loads the device's current metadata,
writes a new targets version naming the bundle, then a new snapshot and a new
timestamp, each signed with Ed25519 and written atomically (temporary file,
fsync, rename). What is measured, for ``DEVICES`` registered devices:

- *assign*: ``DirectorRepository.assign`` of one released bundle to every device;
- *refresh timestamp*: ``DirectorRepository.refresh_timestamp`` of every
  device, the work the director's one-day timestamps need daily;
- *signatures alone*: three Ed25519 signatures per device over the same bytes
  the assignment signs (the canonical JSON of that device's targets, snapshot
  and timestamp), through securesystemslib's ``CryptoSigner`` as the
  repository signs, and through ``cryptography`` directly;
- *file writes alone*: three files per device of the same sizes, written the
  way the repository writes them (temporary file, write, fsync, rename into a
  device folder of their own), and the same without the fsync.

The devices are split into ``BLOCKS`` blocks; each block is one round of
every measurement, their order rotating from round to round, so all see the
same machine state. Per-device figures are medians of the blocks; totals are
sums. A profile of ``assign`` over one more block then says where its time
goes. Registration (each device's empty repository, made when the device is
registered) is set-up, timed for scale only.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata

from fleet_server.director import DirectorRepository
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ReleasedBundle

DEVICES = 10_000
BLOCKS = 10
PROFILED = 1_000  # devices assigned once more, under the profiler
HARDWARE = "rpi4-arm64"
BUNDLE = ReleasedBundle(
    target_path="pump-health/pump-health-1.1.0.bundle",
    name="pump-health",
    version="1.1.0",
    release_counter=2,
    hardware_ids=(HARDWARE,),
    sha256="9f2c" * 16,
    length=412_160,
)
ROLES = ("targets", "snapshot", "timestamp")

# Where the profile's time goes: (label, predicate on pstats' (file, line, function)).
PROFILE_PARTS: list[tuple[str, Callable[[tuple[str, int, str]], bool]]] = [
    ("fsync", lambda f: f[2] == "<built-in method posix.fsync>"),
    ("rename", lambda f: f[2] == "<built-in method posix.replace>"),
    ("other file system calls (read, write, stat, mkdir, close, lock)", lambda f: _is_fs(f)),
    ("Ed25519 signing", lambda f: "ed25519" in f[2].lower() and "sign" in f[2]),
    ("canonical JSON (securesystemslib)", lambda f: "securesystemslib/formats" in f[0]),
    ("JSON encode and decode (json)", lambda f: "/json/" in f[0]),
    ("date parsing and formatting", lambda f: "_strptime" in f[0] or "strftime" in f[2]),
    ("TUF metadata objects (tuf.api)", lambda f: "/tuf/api/" in f[0]),
    ("pathlib and glob", lambda f: "pathlib" in f[0] or "glob" in f[0] or "fnmatch" in f[0]),
]
OPEN_CALLERS = {
    "pathlib.py": "open: create the temporary files (atomic writes)",
    "securesystemslib/storage.py": "open: read the current metadata",
    "fleet_server/release/repository.py": "open: the repository's lock file",
}
_FS_CALLS = ("posix.stat", "posix.mkdir", "posix.listdir", "posix.scandir", "fcntl.flock")
_FS_METHODS = ("'read' of", "'write' of", "'flush' of", "'close' of", "'__exit__' of")


def _is_fs(f: tuple[str, int, str]) -> bool:
    name = f[2]
    return any(c in name for c in _FS_CALLS) or (
        name.startswith("<method") and any(m in name for m in _FS_METHODS)
    )


def device_ids(count: int) -> list[str]:
    return [f"director-bench-{i:05d}" for i in range(count)]


def signed_payloads(director: DirectorRepository, device_id: str) -> list[bytes]:
    """The bytes each role's signature covers, from a device that has an assignment."""
    meta = director.device(device_id).metadata_dir
    latest = {
        role: max(meta.glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))
        for role in ("targets", "snapshot")
    }
    files = [latest["targets"], latest["snapshot"], meta / "timestamp.json"]
    return [Metadata.from_file(str(p)).signed_bytes for p in files]


def file_sizes(director: DirectorRepository, device_id: str) -> list[int]:
    meta = director.device(device_id).metadata_dir
    return [
        max(meta.glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0])).stat().st_size
        for role in ("targets", "snapshot")
    ] + [(meta / "timestamp.json").stat().st_size]


def write_files(root: Path, ids: list[str], sizes: list[int], fsync: bool) -> None:
    """Three files per device as the repository writes them: temporary, write, fsync, rename.

    Each device's folder exists already, as a registered device's does.
    """
    blobs = [os.urandom(n // 2).hex().encode()[:n] for n in sizes]
    prefix = "synced" if fsync else "unsynced"
    names = [f"{prefix}.{role}.json" for role in ROLES]
    for device_id in ids:
        folder = root / device_id
        for name, blob in zip(names, blobs, strict=True):
            path = folder / name
            tmp = path.with_name(name + ".tmp")
            with tmp.open("wb") as f:
                f.write(blob)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)


def run() -> dict[str, object]:
    """Measure and return the figures (seconds per device unless named otherwise)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        keys: KeyStore = init_keys(tmp / "director-keys")
        director = DirectorRepository(tmp / "director")
        director.create(keys)
        ids = device_ids(DEVICES)

        started = time.perf_counter()
        for device_id in ids:
            director.register(keys, device_id)
        register_s = time.perf_counter() - started
        for device_id in ids:
            (tmp / "bare" / device_id).mkdir(parents=True)

        # What the bare baselines sign and write: one real assignment's bytes and sizes.
        director.assign(keys, ids[-1], HARDWARE, BUNDLE)
        payloads = signed_payloads(director, ids[-1])
        sizes = file_sizes(director, ids[-1])
        signers = {role: keys[role].signers[0] for role in ROLES}
        raw_keys: dict[str, Ed25519PrivateKey] = {}
        for role in ROLES:
            pem = (tmp / "director-keys" / f"{role}-1.key").read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, Ed25519PrivateKey)
            raw_keys[role] = key

        def assign(block: list[str]) -> None:
            for device_id in block:
                director.assign(keys, device_id, HARDWARE, BUNDLE)

        def refresh(block: list[str]) -> None:
            for device_id in block:
                director.refresh_timestamp(keys, device_id)

        def sign_sslib(block: list[str]) -> None:
            for _ in block:
                for role, payload in zip(ROLES, payloads, strict=True):
                    signers[role].sign(payload)

        def sign_raw(block: list[str]) -> None:
            for _ in block:
                for role, payload in zip(ROLES, payloads, strict=True):
                    raw_keys[role].sign(payload)

        def write_fsync(block: list[str]) -> None:
            write_files(tmp / "bare", block, sizes, fsync=True)

        def write_no_fsync(block: list[str]) -> None:
            write_files(tmp / "bare", block, sizes, fsync=False)

        steps: dict[str, Callable[[list[str]], None]] = {
            "assign": assign,
            "refresh": refresh,
            "sign_sslib": sign_sslib,
            "sign_raw": sign_raw,
            "write_fsync": write_fsync,
            "write_no_fsync": write_no_fsync,
        }
        names = list(steps)
        per_block: dict[str, list[float]] = {name: [] for name in names}
        size = DEVICES // BLOCKS
        for b in range(BLOCKS):
            block = ids[b * size : (b + 1) * size]
            for name in names[b % len(names) :] + names[: b % len(names)]:
                started = time.perf_counter()
                steps[name](block)
                per_block[name].append(time.perf_counter() - started)

        profile = cProfile.Profile()
        profile.enable()
        assign(ids[:PROFILED])
        profile.disable()

    stats = pstats.Stats(profile)
    total = sum(t[2] for t in stats.stats.values())  # type: ignore[attr-defined]
    parts: dict[str, float] = {label: 0.0 for label in OPEN_CALLERS.values()}
    parts.update({label: 0.0 for label, _ in PROFILE_PARTS})
    for func, (_cc, _nc, tottime, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func[2] == "<built-in method io.open>":
            # Opening a file costs very differently when it creates one: split by caller.
            for caller, (_ccc, _cnc, caller_tottime, _cct) in callers.items():
                label = next(
                    (v for k, v in OPEN_CALLERS.items() if caller[0].endswith(k)),
                    "open, other callers",
                )
                parts[label] = parts.get(label, 0.0) + caller_tottime
            continue
        for label, matches in PROFILE_PARTS:
            if matches(func):
                parts[label] += tottime
                break
    parts["other Python (the repository's own code, dataclasses, copies)"] = total - sum(
        parts.values()
    )
    figures: dict[str, object] = {
        name: statistics.median(t / size for t in times) for name, times in per_block.items()
    }
    figures.update(
        {
            f"{name}_range": (min(times) / size, max(times) / size)
            for name, times in per_block.items()
        }
    )
    figures.update(
        {
            f"{name}_total_s": sum(times) * DEVICES / (size * BLOCKS)
            for name, times in per_block.items()
        }
    )
    figures["register"] = register_s / DEVICES
    figures["register_total_s"] = register_s
    figures["profile_s"] = total
    figures["profile_parts"] = parts
    figures["payload_bytes"] = [len(p) for p in payloads]
    figures["file_bytes"] = sizes
    return figures


def main() -> None:
    r = run()
    assign = float(r["assign"])  # type: ignore[arg-type]
    print(
        f"{DEVICES:,} devices in {BLOCKS} rotating blocks; per device, median of the blocks; "
        f"total for all {DEVICES:,}"
    )
    rows = [
        ("assign (targets + snapshot + timestamp)", "assign"),
        ("refresh timestamp", "refresh"),
        ("3 Ed25519 signatures, CryptoSigner", "sign_sslib"),
        ("3 Ed25519 signatures, cryptography", "sign_raw"),
        ("3 atomic file writes with fsync", "write_fsync"),
        ("3 atomic file writes, no fsync", "write_no_fsync"),
    ]
    for label, key in rows:
        per = float(r[key])  # type: ignore[arg-type]
        total = float(r[f"{key}_total_s"])  # type: ignore[arg-type]
        low, high = cast(tuple[float, float], r[f"{key}_range"])
        print(
            f"  {label:40} {per * 1000:6.3f} ms  {per / assign:5.2f}x  "
            f"(blocks {low * 1000:.3f}-{high * 1000:.3f})  {total:5.1f} s total"
        )
    print(
        f"  (set-up: registering, i.e. each device's empty repository: "
        f"{float(r['register']) * 1000:.2f} ms/device, {float(r['register_total_s']):.1f} s)"  # type: ignore[arg-type]
    )
    print(f"  signed bytes {r['payload_bytes']}, file bytes {r['file_bytes']}")
    profile_s = float(r["profile_s"])  # type: ignore[arg-type]
    print(f"profile of assign, {PROFILED:,} devices ({profile_s:.2f} s under the profiler):")
    parts: dict[str, float] = r["profile_parts"]  # type: ignore[assignment]
    for label, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {label:64} {seconds / profile_s * 100:5.1f} %")


if __name__ == "__main__":
    main()
