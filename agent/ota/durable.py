"""Writes that survive power loss: fsync the data, replace atomically, fsync the folder."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fadvise = getattr(os, "posix_fadvise", None)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes written at ``offset`` to disk now, without waiting.

    Linux begins the writeback of those pages (``POSIX_FADV_DONTNEED`` on dirty
    pages), so a later fsync of a large file waits for its last part only,
    not for all of it. Elsewhere it does nothing.
    """
    if _fadvise is not None and length > 0:
        _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it (an event log that survives a crash)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
