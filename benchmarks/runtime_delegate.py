"""The TFLite runtime with its default delegate (XNNPACK) against without it, in one run.

tflite-runtime applies XNNPACK to every interpreter unless it is built with
``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``, and says so on stderr
("INFO: Created TensorFlow Lite XNNPACK delegate for CPU."). This measures
what turning the delegate off (one way to lose the line) would cost: the
sample models ``v2.tflite`` and ``cloud.tflite`` and the 10 ms-class dense
model of ``benchmarks/agent_inference.py`` (16 layers), each on one thread as
the agent runs them, on a ``[1, 16]`` row. Blocks alternate between the two
interpreters; per model, the median of the blocks' mean CPU time per call
(steadier than wall time on a shared machine), and the median
of the rounds' ratios (without / with); the largest difference of the outputs
is printed too.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.agent_inference import heavy_model

MODELS = Path(__file__).resolve().parents[1] / "firmware_images" / "models"
ROUNDS = 31


def interpreter(model: bytes, delegate: bool) -> Any:
    from tflite_runtime.interpreter import Interpreter, OpResolverType

    options = (
        {}
        if delegate
        else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    built = Interpreter(model_content=model, num_threads=1, **options)
    built.allocate_tensors()
    return built


def block(built: Any, x: np.ndarray[Any, Any], n: int) -> tuple[float, np.ndarray[Any, Any]]:
    index = built.get_input_details()[0]["index"]
    start = time.process_time()
    for _ in range(n):
        built.set_tensor(index, x)
        built.invoke()
    seconds = (time.process_time() - start) / n
    return seconds, built.get_tensor(built.get_output_details()[0]["index"])


def run() -> dict[str, dict[str, float]]:
    x = np.load(MODELS / "baseline.npy")[:1].copy()
    models = {
        "v2.tflite": ((MODELS / "v2.tflite").read_bytes(), 2000),
        "cloud.tflite": ((MODELS / "cloud.tflite").read_bytes(), 2000),
        "dense, 16 layers": (heavy_model(16), 10),
    }
    results = {}
    for name, (model, calls) in models.items():
        with_delegate, without = interpreter(model, True), interpreter(model, False)
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(ROUNDS):
            t_with, out_with = block(with_delegate, x, calls)
            t_without, out_without = block(without, x, calls)
            times["with"].append(t_with)
            times["without"].append(t_without)
        results[name] = {
            "with": statistics.median(times["with"]),
            "without": statistics.median(times["without"]),
            "ratio": statistics.median(
                b / a for a, b in zip(times["with"], times["without"], strict=True)
            ),
            "max_diff": float(np.abs(out_with - out_without).max()),
        }
    return results


def main() -> None:
    print("CPU per call, one thread; ratio: without the default delegate / with it")
    for name, f in run().items():
        print(
            f"  {name:<18} XNNPACK {f['with'] * 1e6:9.1f} µs, "
            f"without {f['without'] * 1e6:9.1f} µs, {f['ratio']:.2f}x; "
            f"outputs differ by at most {f['max_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
