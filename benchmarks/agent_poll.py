"""What an update poll costs the device in CPU: with the poll gate against without it.

A real fleet on loopback (release keys, an image repository and a director
with real signatures, served over HTTP from this process) and one device
that runs v1, whose director assigns v1 and signs it a hybrid plan. The
device's side runs in a process of its own, importing only what the agent
imports (no TUF), and does what the agent's poll does
(:meth:`agent.daemon.AgentDaemon._poll`): ask for the plan, the assignment
and the shadow. Two fetchers side by side in it, polls alternating between
them (the order swapped every round, so the machine's load falls on both):

- ``child``: :class:`~agent.ota.parts.ProcessFetcher` alone, a child process
  for each of the three questions (the agent before the gate);
- ``gate``: the same behind :class:`~agent.ota.poll_gate.PollGate`.

CPU of a poll: user + system time of the device's process
(``RUSAGE_SELF``) and of its fetcher children (``RUSAGE_CHILDREN``), before
and after. Measured for polls that find nothing new, and for polls just after
the director re-signed its timestamp (the gate then runs the children: its own
cost on top of theirs).

Run: ``python -m benchmarks.agent_poll [--polls N] [--changed N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

GOAL_MS = 20.0


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def device_side(config_path: Path, counter: int) -> None:
    """The device's process: one poll per line read (``gate`` or ``child``), a JSON line each."""
    from agent.config import AgentConfig
    from agent.ota.parts import ProcessFetcher
    from agent.ota.poll_gate import PollGate

    config = AgentConfig.load(config_path)
    child = ProcessFetcher(config_path)
    gate = PollGate(ProcessFetcher(config_path), config)
    loop = asyncio.new_event_loop()

    async def poll(fetcher: ProcessFetcher | PollGate) -> list[str]:
        plan = await fetcher.plan()
        check = await fetcher.check(counter)
        shadow = await fetcher.shadow(counter, ())
        return [plan.status, check.status, shadow.status]

    for line in sys.stdin:
        which = line.strip()
        fetcher = gate if which == "gate" else child
        asked = gate.asked
        cpu, wall = _cpu_s(), time.perf_counter()
        answers = loop.run_until_complete(poll(fetcher))
        cpu, wall = _cpu_s() - cpu, time.perf_counter() - wall
        children = gate.asked - asked if which == "gate" else 3
        report = {
            "which": which,
            "cpu_ms": cpu * 1000,
            "wall_ms": wall * 1000,
            "children": children,
            "answers": answers,
            "tuf_imported": "tuf" in sys.modules,
        }
        print(json.dumps(report), flush=True)


def _ask(proc: subprocess.Popen[str], which: str) -> dict[str, Any]:
    stdin: IO[str] | None = proc.stdin
    stdout: IO[str] | None = proc.stdout
    assert stdin is not None and stdout is not None
    stdin.write(which + "\n")
    stdin.flush()
    line = stdout.readline()
    if not line:
        raise RuntimeError("the device's process ended")
    result: dict[str, Any] = json.loads(line)
    return result


def _summary(rows: list[dict[str, Any]], which: str) -> dict[str, float]:
    cpu = sorted(r["cpu_ms"] for r in rows if r["which"] == which)
    wall = sorted(r["wall_ms"] for r in rows if r["which"] == which)
    children = [r["children"] for r in rows if r["which"] == which]
    return {
        "n": len(cpu),
        "cpu_p50": statistics.median(cpu),
        "cpu_max": cpu[-1],
        "cpu_min": cpu[0],
        "wall_p50": statistics.median(wall),
        "children": sum(children) / len(children),
    }


def main(polls: int = 20, changed: int = 5) -> None:
    from fleet_server.release.keys import init_keys
    from testbed.fleet import Fleet, escalate_plan
    from testbed.images import make_bundle

    device = "bench-1"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet = Fleet(root / "fleet", init_keys(root / "release"), init_keys(root / "director"))
        try:
            fleet.director.register(fleet.director_keys, device)
            (root / "built").mkdir()
            v1 = fleet.release(make_bundle(root / "built", "v1", "1.0.0"))
            fleet.assign(device, v1)
            plan = escalate_plan(device, "bench-plan", timedelta(hours=6))
            fleet.director.sign_plan(fleet.director_keys, device, plan)
            config = fleet.agent_config(device)
            side = ["--device-side", str(config), "--counter", str(v1.release_counter)]
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.agent_poll", *side],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                warm = [_ask(proc, "gate"), _ask(proc, "child")]  # the gate keeps its answers
                idle: list[dict[str, Any]] = []
                for i in range(polls):
                    for which in ("gate", "child") if i % 2 == 0 else ("child", "gate"):
                        idle.append(_ask(proc, which))
                after_change: list[dict[str, Any]] = []
                for i in range(changed):
                    for which in ("gate", "child") if i % 2 == 0 else ("child", "gate"):
                        fleet.director.refresh_timestamp(fleet.director_keys, device)
                        after_change.append(_ask(proc, which))
            finally:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=60)
        finally:
            fleet.close()

    answers = {tuple(r["answers"]) for r in [*warm, *idle, *after_change]}
    print(f"answers (plan, check, shadow): {sorted(answers)}")
    print(f"TUF imported by the device's process: {any(r['tuf_imported'] for r in idle)}")
    for title, rows in (("nothing new", idle), ("after a re-signed timestamp", after_change)):
        gate, child = _summary(rows, "gate"), _summary(rows, "child")
        print(f"\npolls finding {title} (n = {gate['n']:.0f} each, alternating):")
        print("| fetcher | CPU p50 | CPU min–max | wall p50 | children a poll |")
        print("|---|---|---|---|---|")
        for name, s in (("gate", gate), ("child", child)):
            print(
                f"| {name} | {s['cpu_p50']:.1f} ms | {s['cpu_min']:.1f}–{s['cpu_max']:.1f} ms "
                f"| {s['wall_p50']:.1f} ms | {s['children']:.1f} |"
            )
        print(f"gate / child CPU (p50): {gate['cpu_p50'] / child['cpu_p50']:.3f}")
        if title == "nothing new":
            verdict = "met" if gate["cpu_p50"] <= GOAL_MS else "NOT met"
            print(f"goal: an idle poll ≤ {GOAL_MS:.0f} ms of CPU: {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=20, help="idle polls of each fetcher")
    parser.add_argument("--changed", type=int, default=5, help="polls after a change, each")
    parser.add_argument("--device-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--counter", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device_side is not None:
        device_side(args.device_side, args.counter)
    else:
        main(args.polls, args.changed)
