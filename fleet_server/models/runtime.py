"""Running TFLite models on the server: checking them at build time, and serving.

tflite-runtime is used where installed, otherwise LiteRT (``ai-edge-litert``),
its successor; both expose the same ``Interpreter``.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.manifest import TensorSpec

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on which runtime is installed
    from ai_edge_litert.interpreter import Interpreter

# The runtime's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for
# CPU." to stderr with the first interpreter (in the middle of `fleetctl bundle build`'s
# output). XNNPACK is kept (benchmarks/runtime_delegate.py: 1.4-2.9x faster); the
# logger's threshold is raised to WARNING through the symbol the runtime's wrapper
# library exports (the Python package does not offer the setting). As in
# agent/runtime/tflite.py, which this package may not import.
_LOGGER = "_ZN6tflite16logging_internal13MinimalLogger"
_WARNING = 2  # tflite::LogSeverity, checked against the name the runtime gives it


def _quiet_runtime_info() -> None:
    package = Interpreter.__module__.split(".")[0]
    try:
        wrapper = importlib.import_module(f"{package}._pywrap_tensorflow_interpreter_wrapper")
        library = ctypes.CDLL(str(wrapper.__file__))
        name_of = getattr(library, _LOGGER + "15GetSeverityNameENS_11LogSeverityE")
        setter = getattr(library, _LOGGER + "21SetMinimumLogSeverityENS_11LogSeverityE")
    except (ImportError, OSError, AttributeError, TypeError):
        return  # a build without the symbols keeps its default
    name_of.argtypes, name_of.restype = [ctypes.c_int], ctypes.c_char_p
    if name_of(_WARNING) == b"WARNING":
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        setter(_WARNING)


_quiet_runtime_info()


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
