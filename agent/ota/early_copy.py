"""Copying a bundle out of a directory repository while the verifier is still loading.

A whole ``edge-agent verify`` spends about as long importing python-tuf and
cryptography as it spends copying and hashing a large bundle, and the copy
needs none of them: file I/O and ``hashlib`` release the GIL. So the command
starts the copy in a thread first, of the bundle the repository's *unverified*
metadata says it would choose, and goes on loading and verifying the metadata.
Once python-tuf has verified it, the verified target is downloaded as ever
unless this copy is of that very file with its signed length, every signed hash
matching the bytes written (:meth:`EarlyCopy.adopt`). Nothing read here is
trusted: it only decides which file to start copying, and a copy that is not
adopted is deleted. The copy starts only when a CPU is idle: on a busy one it
would only take turns with the imports.

The bytes hashed are the bytes kept: each block is read into memory once,
hashed and written from that same memory, its writeback started at once,
and the copy is fsynced before it can be adopted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from agent.ota.durable import start_writeback
from agent.ota.identity import new_hash
from agent.ota.location import is_local, local_path
from protocol.signed_bundle import SignedFieldsError, newest_by_name, signed_fields

# Few, large blocks: the thread waits for the GIL once per read, hash and write,
# and the importing main thread holds it most of the time.
_BLOCK = 8 << 20
# While the copy runs, the importing thread hands the GIL over this soon when the copy
# asks for it (after each read, hash and write) instead of after the default 5 ms.
_SWITCH_INTERVAL = 0.0002


class _BufferHash(Protocol):
    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Listed:
    """A target as the unverified targets metadata lists it (what ``newest_by_name`` reads)."""

    def __init__(self, path: str, info: Mapping[str, Any]) -> None:
        fields = signed_fields(path, info.get("custom"))
        self.path = path
        self.name = fields.name
        self.version = fields.version
        self.release_counter = fields.release_counter
        self.hardware_ids = fields.hardware_ids
        self.length = int(info["length"])
        self.hashes = {str(a): str(h) for a, h in dict(info["hashes"]).items()}


class EarlyCopy:
    """A bundle being copied and hashed into ``directory`` in a thread of its own."""

    def __init__(self, source: Path, length: int, algorithms: list[str], directory: Path) -> None:
        self.source = source
        self.length = length
        self.directory = directory
        self.copy = directory / f".{source.name}.{os.getpid()}.early"
        self._algorithms = algorithms
        self._digests: dict[str, str] | None = None
        self._stop = threading.Event()
        self._interval = sys.getswitchinterval()
        self._thread = threading.Thread(target=self._run, name="early-copy", daemon=True)

    @classmethod
    def start(
        cls,
        repository: str,
        name: str,
        hardware_id: str,
        directory: Path,
        version: str | None = None,
    ) -> EarlyCopy | None:
        """Start copying the bundle a verification would likely choose; None when there is none.

        Only from a directory repository, only when the repository's current
        metadata names a file of the listed length there, and only with a CPU
        idle to copy on: on a busy one the copy would only take turns with the
        imports, and cost more than it saves.
        """
        if not is_local(repository) or not _idle_cpu():
            return None
        try:
            found = _listed_file(local_path(repository), name, hardware_id, version)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, SignedFieldsError):
            return None
        if found is None:
            return None
        source, listed = found
        early = cls(source, listed.length, list(listed.hashes), directory)
        sys.setswitchinterval(min(early._interval, _SWITCH_INTERVAL))
        early._thread.start()
        return early

    def _join(self) -> None:
        self._thread.join()
        sys.setswitchinterval(self._interval)

    def _run(self) -> None:
        # hashlib's objects (all new_hash makes) take any buffer, so a block is never copied.
        hashes = {a: cast(_BufferHash, new_hash(a)) for a in self._algorithms}
        try:
            with self.source.open("rb", buffering=0) as src:
                if os.fstat(src.fileno()).st_size != self.length:
                    return
                self.directory.mkdir(parents=True, exist_ok=True)
                space = os.statvfs(self.directory)
                if space.f_bavail * space.f_frsize < self.length:
                    return  # the download refuses it by name
                with self.copy.open("wb", buffering=0) as out:
                    block = bytearray(min(_BLOCK, max(self.length, 1)))
                    view = memoryview(block)
                    done = 0
                    while done < self.length and not self._stop.is_set():
                        n = src.readinto(view[: self.length - done])
                        if not n:
                            break
                        data = view[:n]
                        for h in hashes.values():
                            h.update(data)
                        written = 0
                        while written < n:
                            written += out.write(data[written:]) or 0
                        start_writeback(out.fileno(), done, n)
                        done += n
                    if done != self.length or self._stop.is_set():
                        return
                    os.fsync(out.fileno())
            self._digests = {a: h.hexdigest() for a, h in hashes.items()}
        except (OSError, ValueError):
            self._digests = None

    def adopt(self, source: Path, length: int, hashes: Mapping[str, str], final: Path) -> bool:
        """Give the copy the name ``final`` if it is ``source`` with that signed length and hashes.

        ``source``, ``length`` and ``hashes`` are the verified target's: the copy
        is adopted only if it was read from that file, is that long and the
        bytes written have every signed hash (and no other was computed).
        Otherwise it is deleted and False returned. The caller fsyncs ``final``'s folder.
        """
        self._join()
        if (
            self._digests is None
            or self.source != source
            or self.length != length
            or self._digests != dict(hashes)
            or final.parent != self.directory
        ):
            self.discard()
            return False
        os.replace(self.copy, final)
        return True

    def discard(self) -> None:
        """Stop the copy and delete it (nothing happens once it was adopted)."""
        self._stop.set()
        self._join()
        self.copy.unlink(missing_ok=True)


def _idle_cpu() -> bool:
    """Whether a CPU this process may use has nothing to run now, besides this thread.

    Linux counts the threads runnable at this instant in ``/proc/loadavg``
    (this one among them); elsewhere the last minute's load average stands in.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    try:
        with open("/proc/loadavg", "rb") as f:
            runnable = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        runnable = round(os.getloadavg()[0]) + 1 if hasattr(os, "getloadavg") else cpus
    return runnable < cpus


def _listed_file(
    repository: Path, name: str, hardware_id: str, version: str | None
) -> tuple[Path, _Listed] | None:
    """The file of the newest bundle ``name`` for ``hardware_id`` the unverified metadata lists.

    Follows the repository's current timestamp to its snapshot and targets, as
    files named with or without their version; the target file with or without
    its hash prefix, whichever exists.
    """
    metadata = repository / "metadata"
    timestamp = json.loads((metadata / "timestamp.json").read_bytes())
    snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = _versioned(metadata, "snapshot", snapshot_version)
    targets = _versioned(metadata, "targets", snapshot["signed"]["meta"]["targets.json"]["version"])
    listed = []
    for path, info in dict(targets["signed"]["targets"]).items():
        try:
            listed.append(_Listed(str(path), info))
        except (SignedFieldsError, ValueError, TypeError, KeyError, AttributeError):
            continue
    if version is not None:
        listed = [t for t in listed if t.version == version]
    best = newest_by_name([t for t in listed if t.name == name], hardware_id).get(name)
    if best is None or not best.hashes:
        return None
    dirname, sep, basename = best.path.rpartition("/")
    first_hash = next(iter(best.hashes.values()))
    for candidate in (f"{dirname}{sep}{first_hash}.{basename}", best.path):
        source = repository / "targets" / candidate
        if source.is_file():
            return source.resolve(), best
    return None


def _versioned(metadata: Path, role: str, version: int) -> Any:
    path = metadata / f"{int(version)}.{role}.json"
    if not path.exists():
        path = metadata / f"{role}.json"
    return json.loads(path.read_bytes())
