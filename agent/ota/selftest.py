"""The self-test a staged model must pass in the agent's own process before it serves.

It loads (an unresolved custom op is a refusal, not a crash), its tensors are
the ones the manifest promises, the golden vectors give the expected outputs
within tolerance, and latency and memory stay within the manifest's budget.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.ota.errors import SelfTestFailed
from model_runtime import LoadedModel, ModelLoadError, ModelRunError, Runtime
from protocol.manifest import Manifest

LATENCY_RUNS = 20


@dataclass(frozen=True)
class SelfTestReport:
    """What the self-test measured."""

    latency_p95_ms: float
    memory_mb: float
    golden_max_error: float


def rss_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc``)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def self_test(
    runtime: Runtime, slot_dir: Path, manifest: Manifest
) -> tuple[LoadedModel, SelfTestReport]:
    """Load the slot's model and check it; raises :class:`SelfTestFailed` with the reason."""
    before = rss_mb()
    try:
        model = runtime.load(slot_dir / manifest.model_file)
    except ModelLoadError as exc:
        raise SelfTestFailed(f"the model does not load: {exc}") from None
    _check_contract(model, manifest)
    from protocol.golden import golden_disagreement, unpack_golden  # only while installing

    try:
        inputs, expected = unpack_golden((slot_dir / manifest.golden.file).read_bytes())
    except (OSError, ValueError) as exc:
        raise SelfTestFailed(f"the golden vectors cannot be read: {exc}") from None
    try:
        worst, problem = golden_disagreement(
            model.run(inputs), expected, manifest.golden.atol, manifest.golden.rtol
        )
        if problem is not None:
            raise SelfTestFailed(problem)
        latency = _latency_p95_ms(model, inputs)
    except ModelRunError as exc:
        raise SelfTestFailed(f"the model fails on its golden vectors: {exc}") from None
    memory = max(0.0, rss_mb() - before)
    budget = manifest.budget
    if latency > budget.max_latency_ms:
        raise SelfTestFailed(
            f"latency p95 {latency:.3g} ms is over the budget of {budget.max_latency_ms:g} ms"
        )
    if memory > budget.max_memory_mb:
        raise SelfTestFailed(
            f"the model takes {memory:.1f} MB, over the budget of {budget.max_memory_mb:g} MB"
        )
    return model, SelfTestReport(latency_p95_ms=latency, memory_mb=memory, golden_max_error=worst)


def _check_contract(model: LoadedModel, manifest: Manifest) -> None:
    if (problem := manifest.tensor_disagreement(model.inputs, model.outputs)) is not None:
        raise SelfTestFailed(problem)


def _latency_p95_ms(model: LoadedModel, inputs: dict[str, Any]) -> float:
    one = {k: v[:1] for k, v in inputs.items()}
    model.run(one)  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        model.run(one)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 95))
