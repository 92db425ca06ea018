"""The outbox: closed windows kept on the device until the fleet server acknowledges them.

Rules:

1. A window goes in once (:meth:`Outbox.put` is idempotent by window id) and
   leaves only when the server acknowledges it (:meth:`Outbox.acknowledge`) or
   when a bound drops it. Sending (:meth:`Outbox.mark_sent`) removes nothing:
   a window whose acknowledgement never comes is sent again.
2. Bounds: the payloads together stay within ``max_bytes``, and no window is
   older than ``max_age_s`` (by its ``created_at`` and the outbox's clock).
   Over a bound the oldest go first (insertion order), and every drop is
   counted by reason, ``"size"`` or ``"age"``, in the database itself, so the
   counts survive restarts and can be reported as cumulative counters.
3. Every change is one committed SQLite transaction in WAL mode with
   ``synchronous=FULL``: the WAL is fsynced at every commit, so a window put
   (or acknowledged) before a power cut is still there (or gone) after it.
   ``NORMAL`` would only survive a crash of the process, and devices lose
   power; one fsync per window (about one a minute) costs nothing that matters.
4. After a restart everything not acknowledged is pending again, and counts as
   never sent: the MQTT session that carried it is gone.

A file that is not an outbox, is corrupt, or is locked by another process
raises :class:`OutboxError`, saying which file and what to do.

Calls are quick (one indexed query, one fsync when writing) and are meant for
one event loop. A lock serialises them, so calling from a worker thread
(``asyncio.to_thread``, for storage with slow fsync) is safe too.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
DropReason = Literal["size", "age"]
DROP_REASONS: Final[tuple[DropReason, ...]] = ("size", "age")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS windows (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    window_id  TEXT    NOT NULL UNIQUE,
    payload    BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    sent_at    REAL,
    sends      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
_COUNTERS: Final = ("stored", "acknowledged", *(f"dropped_{r}" for r in DROP_REASONS))


class OutboxError(Exception):
    """The outbox database cannot be used: not an outbox, corrupt, locked or unwritable."""


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox holds now and what happened to it since it was created.

    The totals are cumulative over the life of the database file.
    """

    pending: int
    pending_bytes: int
    oldest_created_at: float | None
    stored_total: int
    acknowledged_total: int
    dropped: dict[DropReason, int]

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Outbox:
    """Windows waiting for the server's acknowledgement, in a SQLite file at ``path``.

    ``max_bytes`` bounds the payloads held (the file is larger by SQLite's page
    overhead, and reuses the pages of deleted windows rather than growing).
    ``clock`` gives seconds since the epoch, in the same time base as the
    ``created_at`` given to :meth:`put`. ``busy_timeout_s`` is how long a call
    waits for a lock another process holds before it fails.

    Window ids are remembered only while held: putting an id again after its
    acknowledgement stores it again (the server ingests by window id, so a
    repeat is harmless).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 4 << 20,
        max_age_s: float = 7 * 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 2.0,
    ) -> None:
        if max_bytes < 1 or not max_age_s > 0:
            raise ValueError("max_bytes and max_age_s must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
        try:
            self._prepare()
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        with self._guard("open"):
            db = self._db
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"the outbox {self.path} has schema version {version}, newer than this "
                    f"agent's {SCHEMA_VERSION}; upgrade the agent or move the file aside"
                )
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"the outbox {self.path} cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            # A small page cache: the outbox holds a few MB at most, and SQLite's default
            # (2 MB) would be a noticeable share of a device's memory budget.
            db.execute("PRAGMA cache_size=-128")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.executemany(
                    "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
                    [(name,) for name in _COUNTERS],
                )
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # A new process has nothing in flight: every window is due to be sent.
                db.execute("UPDATE windows SET sent_at = NULL WHERE sent_at IS NOT NULL")
            self._bytes = int(
                db.execute("SELECT COALESCE(SUM(size), 0) FROM windows").fetchone()[0]
            )

    # -- the API ---------------------------------------------------------------

    def put(self, window_id: str, payload: bytes, created_at: float) -> bool:
        """Keep ``payload`` until ``window_id`` is acknowledged; ``True`` if it is now held.

        Putting a window id again changes nothing (``True`` if it is still held).
        A payload larger than ``max_bytes``, or already older than ``max_age_s``,
        is dropped at once and counted (``False``). Older windows are dropped to
        make room for this one.
        """
        size = len(payload)
        with self._guard("store a window in"), self._transaction():
            db = self._db
            if db.execute("SELECT 1 FROM windows WHERE window_id = ?", (window_id,)).fetchone():
                return True
            reason: DropReason | None = None
            if size > self.max_bytes:
                reason = "size"
            elif created_at < self._clock() - self.max_age_s:
                reason = "age"
            if reason is not None:
                self._dropped(reason, 1)
                return False
            self._drop_over_bounds(extra_bytes=size)
            db.execute(
                "INSERT INTO windows (window_id, payload, size, created_at) VALUES (?, ?, ?, ?)",
                (window_id, sqlite3.Binary(payload), size, float(created_at)),
            )
            self._count("stored", 1)
            self._bytes += size
            return True

    def pending(
        self, limit: int = 100, *, resend_after_s: float | None = None
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` windows waiting for acknowledgement, oldest first, as ``(id, payload)``.

        With ``resend_after_s``, only windows never sent or last sent at least
        that long ago. Windows past ``max_age_s`` are dropped first.
        """
        with self._guard("read"):
            self._prune()
            if resend_after_s is None:
                rows = self._db.execute(
                    "SELECT window_id, payload FROM windows ORDER BY seq LIMIT ?", (limit,)
                )
            else:
                rows = self._db.execute(
                    "SELECT window_id, payload FROM windows "
                    "WHERE sent_at IS NULL OR sent_at <= ? ORDER BY seq LIMIT ?",
                    (self._clock() - resend_after_s, limit),
                )
            return [(str(window_id), bytes(payload)) for window_id, payload in rows]

    def mark_sent(self, window_ids: Iterable[str], at: float | None = None) -> None:
        """Note that these windows were handed to the broker (at ``at``, default now)."""
        ids = list(window_ids)
        if not ids:
            return
        when = self._clock() if at is None else at
        with self._guard("update"), self._transaction():
            self._db.executemany(
                "UPDATE windows SET sent_at = ?, sends = sends + 1 WHERE window_id = ?",
                [(when, window_id) for window_id in ids],
            )

    def acknowledge(self, window_ids: Iterable[str]) -> int:
        """Remove windows the server acknowledged; returns how many were still held.

        Unknown ids (a repeated acknowledgement, a window already dropped) are ignored.
        """
        ids = list(dict.fromkeys(window_ids))
        if not ids:
            return 0
        with self._guard("acknowledge windows in"), self._transaction():
            removed = 0
            freed = 0
            for window_id in ids:
                row = self._db.execute(
                    "SELECT seq, size FROM windows WHERE window_id = ?", (window_id,)
                ).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM windows WHERE seq = ?", (row[0],))
                    removed += 1
                    freed += int(row[1])
            self._count("acknowledged", removed)
            self._bytes -= freed
            return removed

    def prune(self) -> int:
        """Drop windows past ``max_age_s`` now; returns how many went."""
        with self._guard("prune"):
            return self._prune()

    def stats(self) -> OutboxStats:
        """Counts for status and reporting (``dropped_total`` for the heartbeat)."""
        with self._guard("read"):
            db = self._db
            pending, pending_bytes, oldest = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created_at) FROM windows"
            ).fetchone()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        return OutboxStats(
            pending=int(pending),
            pending_bytes=int(pending_bytes),
            oldest_created_at=None if oldest is None else float(oldest),
            stored_total=int(counters.get("stored", 0)),
            acknowledged_total=int(counters.get("acknowledged", 0)),
            dropped={r: int(counters.get(f"dropped_{r}", 0)) for r in DROP_REASONS},
        )

    def close(self) -> None:
        """Close the database; everything committed stays in the file."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ------------------------------------------------------------------

    def _prune(self) -> int:
        cutoff = self._clock() - self.max_age_s
        with self._transaction():
            # (No DELETE ... RETURNING: devices may have SQLite older than 3.35.)
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM windows WHERE created_at < ?",
                (cutoff,),
            ).fetchone()
            if count:
                self._db.execute("DELETE FROM windows WHERE created_at < ?", (cutoff,))
                self._dropped("age", int(count))
                self._bytes -= int(size)
        return int(count)

    def _drop_over_bounds(self, extra_bytes: int) -> None:
        """Inside a transaction: drop aged windows, then the oldest until ``extra_bytes`` fit."""
        self._prune()
        dropped = 0
        while self._bytes + extra_bytes > self.max_bytes:
            row = self._db.execute("SELECT seq, size FROM windows ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM windows WHERE seq = ?", (row[0],))
            self._bytes -= int(row[1])
            dropped += 1
        self._dropped("size", dropped)

    def _dropped(self, reason: DropReason, count: int) -> None:
        """Count drops in the database; log the 1st, 10th, 100th and every 1000th."""
        if not count:
            return
        self._count(f"dropped_{reason}", count)
        total = self._db.execute(
            "SELECT value FROM counters WHERE name = ?", (f"dropped_{reason}",)
        ).fetchone()[0]
        if any(n in (1, 10, 100) or n % 1000 == 0 for n in range(total - count + 1, total + 1)):
            bound = f"{self.max_bytes} bytes" if reason == "size" else f"{self.max_age_s:g} s"
            logger.warning(
                "telemetry: %d windows dropped from the outbox so far (over its %s bound of %s)",
                total,
                reason,
                bound,
            )

    def _count(self, name: str, by: int) -> None:
        if by:
            self._db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One committed transaction; nested uses join the outer one."""
        db = self._db
        if db.in_transaction:
            yield
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Hold the lock; turn SQLite's errors into an :class:`OutboxError` that says what to do."""
        with self._lock:
            bytes_before = getattr(self, "_bytes", 0)
            try:
                yield
            except sqlite3.OperationalError as exc:
                self._bytes = bytes_before
                text = str(exc)
                if "locked" in text or "busy" in text:
                    raise OutboxError(
                        f"cannot {action} the outbox {self.path}: it is locked by another "
                        "process (is a second agent using the same data directory?)"
                    ) from None
                raise OutboxError(f"cannot {action} the outbox {self.path}: {text}") from None
            except sqlite3.DatabaseError as exc:
                self._bytes = bytes_before
                raise OutboxError(
                    f"cannot {action} the outbox {self.path}: the file is not an outbox or is "
                    f"corrupt ({exc}); move it aside and the agent starts a new, empty one"
                ) from None
