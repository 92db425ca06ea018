"""The telemetry outbox: a real SQLite file, a fake clock, restarts and bounds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.telemetry import Outbox, OutboxError
from protocol.summary import summarize
from protocol.window import WindowSummary, decode_window, encode_window

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def payload(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


def open_outbox(path: Path, clock: FakeClock, **kwargs: float) -> Outbox:
    options: dict[str, float] = {"max_bytes": 10_000, "max_age_s": 3600.0, **kwargs}
    return Outbox(
        path,
        max_bytes=int(options["max_bytes"]),
        max_age_s=options["max_age_s"],
        clock=clock,
        busy_timeout_s=options.get("busy_timeout_s", 2.0),
    )


def test_windows_are_pending_oldest_first_until_acknowledged(tmp_path: Path) -> None:
    clock = FakeClock()
    with open_outbox(tmp_path / "outbox.db", clock) as outbox:
        for i in range(5):
            assert outbox.put(f"w{i}", payload(i), created_at=T0 + i)
        assert outbox.pending() == [(f"w{i}", payload(i)) for i in range(5)]
        assert [w for w, _ in outbox.pending(limit=2)] == ["w0", "w1"]
        assert outbox.acknowledge(["w1", "w3", "unknown"]) == 2
        assert outbox.acknowledge(["w1"]) == 0  # a repeated acknowledgement
        assert [w for w, _ in outbox.pending()] == ["w0", "w2", "w4"]
        stats = outbox.stats()
    assert (stats.pending, stats.pending_bytes, stats.oldest_created_at) == (3, 300, T0)
    assert (stats.stored_total, stats.acknowledged_total, stats.dropped_total) == (5, 2, 0)


def test_an_encoded_window_comes_back_byte_for_byte_after_a_restart(tmp_path: Path) -> None:
    rows = [[float(i), float(i % 7)] for i in range(50)]
    window = WindowSummary(
        window_id="0f" * 16,
        device_id="pump-0042",
        model_name="pump-health",
        model_version="2.0.0",
        baseline_id="b1",
        start=T0,
        end=T0 + 60.0,
        requests=50,
        served={"active": 50},
        features=summarize(rows, [[10.0, 20.0], [3.0]]),
    )
    data = encode_window(window)
    with open_outbox(tmp_path / "outbox.db", FakeClock()) as outbox:
        outbox.put(window.window_id, data, created_at=window.end)
    with open_outbox(tmp_path / "outbox.db", FakeClock()) as outbox:
        [(window_id, stored)] = outbox.pending()
    assert (window_id, stored) == (window.window_id, data)
    back = decode_window(stored)
    assert (back.window_id, back.requests, back.served) == (window.window_id, 50, {"active": 50})


def test_putting_a_window_again_changes_nothing(tmp_path: Path) -> None:
    with open_outbox(tmp_path / "outbox.db", FakeClock()) as outbox:
        assert outbox.put("w0", payload(0), T0)
        assert outbox.put("w0", payload(9, 50), T0 + 5)
        assert outbox.pending() == [("w0", payload(0))]
        assert outbox.stats().stored_total == 1


def test_everything_unacknowledged_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    clock = FakeClock()
    with open_outbox(path, clock) as outbox:
        for i in range(4):
            outbox.put(f"w{i}", payload(i), T0 + i)
        outbox.mark_sent(["w0", "w1", "w2"])
        outbox.acknowledge(["w0"])
    with open_outbox(path, clock) as outbox:
        assert outbox.pending() == [(f"w{i}", payload(i)) for i in (1, 2, 3)]
        # A new process has nothing in flight: sent but unacknowledged is due again.
        assert [w for w, _ in outbox.pending(resend_after_s=60.0)] == ["w1", "w2", "w3"]
        assert outbox.stats().acknowledged_total == 1


def test_a_killed_process_loses_nothing_it_put(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from agent.telemetry.outbox import Outbox
        outbox = Outbox(Path({str(path)!r}), clock=lambda: {T0})
        for i in range(20):
            outbox.put(f"w{{i}}", bytes([i]) * 64, created_at={T0})
        outbox.acknowledge(["w0", "w1"])
        os._exit(0)  # no close, no cleanup
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    with open_outbox(path, FakeClock()) as outbox:
        assert [w for w, _ in outbox.pending()] == [f"w{i}" for i in range(2, 20)]
        assert outbox.pending(limit=1) == [("w2", bytes([2]) * 64)]


def test_resending_waits_for_the_acknowledgement_timeout(tmp_path: Path) -> None:
    clock = FakeClock()
    with open_outbox(tmp_path / "outbox.db", clock) as outbox:
        outbox.put("w0", payload(0), T0)
        outbox.put("w1", payload(1), T0)
        outbox.mark_sent(["w0"])
        assert [w for w, _ in outbox.pending(resend_after_s=30.0)] == ["w1"]
        clock.now += 30.0
        assert [w for w, _ in outbox.pending(resend_after_s=30.0)] == ["w0", "w1"]


def test_over_the_size_bound_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    clock = FakeClock()
    with open_outbox(path, clock, max_bytes=1000) as outbox:
        for i in range(10):
            assert outbox.put(f"w{i}", payload(i), T0 + i)
        assert outbox.stats().dropped_total == 0
        assert outbox.put("w10", payload(10, 250), T0 + 10)  # needs 250 bytes: w0-w2 go
        assert [w for w, _ in outbox.pending()] == [f"w{i}" for i in range(3, 11)]
        assert outbox.stats().pending_bytes == 950
    # Drops are persisted, with their reason.
    with open_outbox(path, clock, max_bytes=1000) as outbox:
        stats = outbox.stats()
        assert stats.dropped == {"size": 3, "age": 0}
        assert stats.dropped_total == 3
        # A window that alone is larger than the bound is dropped at once.
        assert not outbox.put("huge", payload(0, 1001), T0 + 11)
        assert outbox.stats().dropped == {"size": 4, "age": 0}
        assert len(outbox.pending()) == 8


def test_windows_older_than_the_age_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 100.0)
    with open_outbox(tmp_path / "outbox.db", clock, max_age_s=60.0) as outbox:
        assert not outbox.put("stale", payload(0), created_at=T0)  # already too old
        outbox.put("w1", payload(1), created_at=T0 + 50.0)
        outbox.put("w2", payload(2), created_at=T0 + 90.0)
        clock.now = T0 + 115.0
        assert [w for w, _ in outbox.pending()] == ["w2"]
        clock.now = T0 + 200.0
        assert outbox.prune() == 1
        stats = outbox.stats()
    assert stats.dropped == {"size": 0, "age": 3}
    assert (stats.pending, stats.pending_bytes) == (0, 0)


def test_the_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with open_outbox(path, FakeClock()) as outbox:
        outbox.put("w0", payload(0), T0)
        db = outbox._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_file_that_is_not_an_outbox_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database, it is a text file " * 200)
    with pytest.raises(OutboxError, match=r"not an outbox or is corrupt.*move it aside"):
        Outbox(path)


def test_a_corrupt_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with open_outbox(path, FakeClock(), max_bytes=10**6) as outbox:
        for i in range(200):
            outbox.put(f"w{i}", payload(i, 1000), T0)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : page * 6] = b"\xa5" * (page * 5)  # overwrite interior b-tree pages
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match=r"outbox\.db.*(corrupt|malformed)"):
        outbox = Outbox(path)
        outbox.pending(limit=1000)


def test_a_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = open_outbox(path, FakeClock(), busy_timeout_s=0.1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(OutboxError, match="locked by another process"):
            outbox.put("w0", payload(0), T0)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert outbox.put("w0", payload(0), T0)  # and it recovers once the lock is gone
    assert outbox.stats().pending_bytes == 100
    outbox.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(OutboxError, match=r"schema version 99.*upgrade the agent"):
        Outbox(path)


def test_a_missing_directory_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(tmp_path / "no" / "such" / "dir" / "outbox.db")
