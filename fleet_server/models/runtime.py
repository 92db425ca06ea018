"""Running TFLite models on the server: checking them at build time, and serving.

tflite-runtime is used where installed, otherwise LiteRT (``ai-edge-litert``),
its successor; both expose the same ``Interpreter``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.manifest import TensorSpec

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on which runtime is installed
    from ai_edge_litert.interpreter import Interpreter


class ModelRuntimeError(Exception):
    """The model cannot be loaded or run by the TFLite runtime."""


class LoadedModel:
    """A model loaded into an interpreter, run on batches of examples."""

    def __init__(self, model: bytes) -> None:
        try:
            self._interpreter = Interpreter(model_content=model)
            self._interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelRuntimeError(
                f"the TFLite runtime cannot run this model: {_first_line(exc)}"
            ) from None
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()
        self._batch = 1

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(d) for d in self._inputs]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(d) for d in self._outputs]

    @property
    def dynamic_batch(self) -> bool:
        """Whether every input's first dimension may be resized."""
        return all(
            len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1 for d in self._inputs
        )

    def run(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """Outputs for a batch; ``inputs`` maps names to ``[batch, *example_shape]``."""
        arrays = {d["name"]: np.asarray(inputs[d["name"]], dtype=d["dtype"]) for d in self._inputs}
        rows = next(iter(arrays.values())).shape[0]
        if self.dynamic_batch:
            return self._invoke(arrays, rows)
        parts = [self._invoke({k: v[i : i + 1] for k, v in arrays.items()}, 1) for i in range(rows)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _invoke(
        self, arrays: dict[str, npt.NDArray[Any]], rows: int
    ) -> dict[str, npt.NDArray[Any]]:
        interpreter = self._interpreter
        try:
            if rows != self._batch:
                for d in self._inputs:
                    interpreter.resize_tensor_input(d["index"], [rows, *d["shape"][1:]])
                interpreter.allocate_tensors()
                self._batch = rows
            for d in self._inputs:
                interpreter.set_tensor(d["index"], arrays[d["name"]])
            interpreter.invoke()
        except (RuntimeError, ValueError) as exc:
            raise ModelRuntimeError(f"the model failed to run: {_first_line(exc)}") from None
        return {d["name"]: interpreter.get_tensor(d["index"]).copy() for d in self._outputs}


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=detail["name"],
        dtype=np.dtype(detail["dtype"]).name,  # type: ignore[arg-type]
        shape=[int(x) for x in detail["shape"]],
        shape_signature=[int(x) for x in detail["shape_signature"]],
        quantization=(float(scale), int(zero_point)) if scale else None,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
