"""Where the install journal and the install events live on the device.

``DIR/journal.json`` holds the :class:`~agent.ota.journal.Journal`, replaced
atomically and fsynced on every save, so a power cut leaves the old or the new
journal, never a mix; ``DIR/events.jsonl`` is an append-only, fsynced event log
(the last few hundred kept) that ``edge-agent status`` and the server read.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from agent.ota.durable import append_line, atomic_write
from agent.ota.journal import Journal, JournalError

MAX_EVENTS_KEPT = 500


class JournalStore:
    """Keeps the journal in ``DIR/journal.json`` and events in ``DIR/events.jsonl``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "journal.json"
        self.events_path = directory / "events.jsonl"

    def load(self) -> Journal:
        """The saved journal, or a fresh one on a new device."""
        try:
            return Journal.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return Journal()
        except ValidationError as exc:
            # atomic_write never leaves a torn file, so this is outside damage.
            raise JournalError(f"{self.path} is corrupt: {exc.errors()[0]['msg']}") from None

    def save(self, journal: Journal) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, journal.model_dump_json(indent=1).encode())

    def event(self, at: float, kind: str, **fields: object) -> None:
        """Record an event for ``edge-agent status`` and the server."""
        self.directory.mkdir(parents=True, exist_ok=True)
        append_line(self.events_path, json.dumps({"at": at, "event": kind, **fields}))
        self._trim()

    def events(self, last: int = 20) -> list[dict[str, object]]:
        try:
            lines = self.events_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines[-last:]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append
        return out

    def _trim(self) -> None:
        if self.events_path.stat().st_size < MAX_EVENTS_KEPT * 400:
            return
        lines = self.events_path.read_text(encoding="utf-8").splitlines()[-MAX_EVENTS_KEPT // 2 :]
        atomic_write(self.events_path, ("\n".join(lines) + "\n").encode())
