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
    from protocol.golden import unpack_golden  # the zip reader is only needed while installing

    try:
        inputs, expected = unpack_golden((slot_dir / manifest.golden.file).read_bytes())
    except (OSError, ValueError) as exc:
        raise SelfTestFailed(f"the golden vectors cannot be read: {exc}") from None
    worst = 0.0
    try:
        outputs = model.run(inputs)
        for name, want in expected.items():
            got = np.asarray(outputs[name], dtype=np.float64)
            want64 = want.astype(np.float64)
            if not np.all(np.isfinite(got)):
                raise SelfTestFailed(f"output {name!r} is NaN or Inf on a golden vector")
            excess = np.abs(got - want64) - (
                manifest.golden.atol + manifest.golden.rtol * np.abs(want64)
            )
            if np.any(excess > 0):
                row = int(np.argmax(excess.reshape(len(excess), -1).max(axis=1)))
                raise SelfTestFailed(
                    f"golden vector {row}: output {name!r} differs by "
                    f"{float(np.abs(got - want64).max()):.3g}, beyond atol {manifest.golden.atol} "
                    f"+ rtol {manifest.golden.rtol}"
                )
            worst = max(worst, float(np.abs(got - want64).max()))
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
    def shape(specs: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.dtype, t.shape) for t in specs]

    if shape(model.inputs) != shape(manifest.inputs) or shape(model.outputs) != shape(
        manifest.outputs
    ):
        raise SelfTestFailed(
            "the model's tensors differ from the manifest's contract: "
            f"{shape(model.inputs)} -> {shape(model.outputs)}"
        )


def _latency_p95_ms(model: LoadedModel, inputs: dict[str, Any]) -> float:
    one = {k: v[:1] for k, v in inputs.items()}
    model.run(one)  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        model.run(one)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 95))
