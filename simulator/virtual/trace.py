"""A virtual run's trace: the seed-derived events, one JSON object a line.

The first line holds the scenario (``{"kind": "scenario", ...}``); each later
line is one event the run drew from its seed: a device's window sent
(``window``: when, its size and the seed of its rows and latencies), an
install's download finished (``fetched``), an operator's step (``step``).
Everything else a run does follows from these by the real rules, so a run
driven by a trace (:func:`simulator.virtual.replay`) reports what the run that
wrote it reported. A line that is no event is refused naming its number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from simulator.scenario import Scenario

TRACE_VERSION = 1


class TraceError(ValueError):
    """A trace file that cannot be replayed: the file, the line and what is wrong with it."""


@dataclass(frozen=True)
class WindowSent:
    """A device's window: it ends at ``t`` and holds ``requests`` requests drawn from ``seed``."""

    t: float
    device: str
    requests: int
    seed: int


@dataclass(frozen=True)
class Fetched:
    """A device's download of its desired version finishes at ``t``."""

    t: float
    device: str
    version: str


@dataclass(frozen=True)
class StepTaken:
    """The operator's step ``index`` of the scenario, at ``t``."""

    t: float
    index: int


Event = WindowSent | Fetched | StepTaken


class TraceWriter:
    """Writes the scenario and then every event as it is drawn."""

    def __init__(self, path: Path, scenario: Scenario) -> None:
        self._out: IO[str] = path.open("w", encoding="utf-8")
        head = {
            "kind": "scenario",
            "version": TRACE_VERSION,
            "scenario": scenario.model_dump(mode="json"),
        }
        self._out.write(json.dumps(head, sort_keys=True) + "\n")

    def write(self, event: Event) -> None:
        if isinstance(event, WindowSent):
            line: dict[str, Any] = {
                "kind": "window", "t": event.t, "device": event.device,
                "requests": event.requests, "seed": event.seed,
            }  # fmt: skip
        elif isinstance(event, Fetched):
            line = {
                "kind": "fetched",
                "t": event.t,
                "device": event.device,
                "version": event.version,
            }
        else:
            line = {"kind": "step", "t": event.t, "index": event.index}
        self._out.write(json.dumps(line, sort_keys=True) + "\n")

    def close(self) -> None:
        self._out.close()


@dataclass(frozen=True)
class Trace:
    scenario: Scenario
    events: list[Event]


def read_trace(path: Path) -> Trace:
    """The scenario and events of ``path``; :class:`TraceError` naming the first bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from exc
    if not lines:
        raise TraceError(f"{path}: empty; a trace starts with its scenario line")
    scenario = _scenario(path, lines[0])
    known = {d for ids in scenario.device_ids().values() for d in ids}
    events = []
    for number, text in _numbered(lines):
        event = _event(path, number, text)
        if isinstance(event, WindowSent | Fetched) and event.device not in known:
            raise TraceError(f"{path}:{number}: no device {event.device!r} in the scenario")
        if isinstance(event, StepTaken) and not 0 <= event.index < len(scenario.steps):
            raise TraceError(
                f"{path}:{number}: no step {event.index}; the scenario has {len(scenario.steps)}"
            )
        events.append(event)
    return Trace(scenario, events)


def _numbered(lines: list[str]) -> Iterator[tuple[int, str]]:
    for number, text in enumerate(lines[1:], start=2):
        if text.strip():
            yield number, text


def _object(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{number}: not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}:{number}: not a JSON object")
    return value


def _scenario(path: Path, text: str) -> Scenario:
    head = _object(path, 1, text)
    if head.get("kind") != "scenario" or head.get("version") != TRACE_VERSION:
        raise TraceError(
            f"{path}:1: not a trace's first line (kind scenario, version {TRACE_VERSION})"
        )
    try:
        return Scenario.model_validate(head.get("scenario"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(scenario)"
        raise TraceError(f"{path}:1: not a scenario: {where}: {first['msg']}") from None


_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "window": {"t": (int, float), "device": str, "requests": int, "seed": int},
    "fetched": {"t": (int, float), "device": str, "version": str},
    "step": {"t": (int, float), "index": int},
}


def _event(path: Path, number: int, text: str) -> Event:
    line = _object(path, number, text)
    kind = line.get("kind")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise TraceError(f"{path}:{number}: kind {kind!r} is none of {sorted(_FIELDS)}")
    for name, kinds in fields.items():
        value = line.get(name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise TraceError(f"{path}:{number}: a {kind} event needs {name}, got {value!r}")
    unknown = sorted(set(line) - set(fields) - {"kind"})
    if unknown:
        raise TraceError(f"{path}:{number}: a {kind} event has no field {unknown[0]!r}")
    if line["t"] < 0:
        raise TraceError(f"{path}:{number}: t must be >= 0, got {line['t']!r}")
    t = float(line["t"])
    if kind == "window":
        if line["requests"] < 1:
            raise TraceError(f"{path}:{number}: requests must be >= 1, got {line['requests']}")
        return WindowSent(t, line["device"], line["requests"], line["seed"])
    if kind == "fetched":
        return Fetched(t, line["device"], line["version"])
    return StepTaken(t, line["index"])
