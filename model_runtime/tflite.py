"""TFLite models through tflite-runtime, or LiteRT (``ai-edge-litert``) where that is installed."""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model_runtime.base import ModelLoadError, ModelRunError, RuntimeNotInstalled, Tensors
from model_runtime.platforms import this_platform_message
from protocol.manifest import TensorSpec

_MODULES = ("tflite_runtime.interpreter", "ai_edge_litert.interpreter")

logger = logging.getLogger(__name__)

# The runtime's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for
# CPU." to stderr when the first interpreter takes its default delegate (in the middle of
# `fleetctl bundle build`'s output, and in the agent's log). XNNPACK is kept
# (without it the sample models take 1.4x the CPU, a dense 16-layer model 2.9x:
# benchmarks/runtime_delegate.py); the logger's threshold is raised to WARNING instead. The
# Python package does not expose that setting, so it is set through the symbols its
# wrapper library exports (tflite-runtime 2.14); a build without them keeps its default.
_LOGGER = "_ZN6tflite16logging_internal13MinimalLogger"
_SET_SEVERITY = _LOGGER + "21SetMinimumLogSeverityENS_11LogSeverityE"
_SEVERITY_NAME = _LOGGER + "15GetSeverityNameENS_11LogSeverityE"
_INFO, _WARNING = 1, 2  # tflite::LogSeverity, checked against the names the runtime gives


@functools.cache
def _severity_setter(package: str) -> Any:
    """The runtime's ``SetMinimumLogSeverity``, or ``None`` if this build does not export it."""
    try:
        wrapper = importlib.import_module(f"{package}._pywrap_tensorflow_interpreter_wrapper")
        library = ctypes.CDLL(str(wrapper.__file__))
        name_of = getattr(library, _SEVERITY_NAME)
        setter = getattr(library, _SET_SEVERITY)
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    name_of.argtypes, name_of.restype = [ctypes.c_int], ctypes.c_char_p
    if (name_of(_INFO), name_of(_WARNING)) != (b"INFO", b"WARNING"):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


def set_runtime_verbose(package: str, verbose: bool) -> bool:
    """Let the runtime ``package`` log its INFO lines (``verbose``) or only warnings and errors.

    Returns whether the runtime took the setting (``False``: this build offers no way to).
    """
    setter = _severity_setter(package)
    if setter is None:
        return False
    setter(_INFO if verbose else _WARNING)
    return True


def _interpreter_class() -> tuple[str, Any]:
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module_name.split(".")[0], module.Interpreter
    raise RuntimeNotInstalled(this_platform_message())


class TFLiteModel:
    """One interpreter; calls are serialised because an interpreter is not re-entrant."""

    def __init__(self, interpreter: Any) -> None:
        self._interpreter = interpreter
        self._inputs = interpreter.get_input_details()
        self._outputs = interpreter.get_output_details()
        self._dynamic = all(
            len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1 for d in self._inputs
        )
        self._batch = 1
        self._lock = threading.Lock()

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(d) for d in self._inputs]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(d) for d in self._outputs]

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        """Outputs for a batch of arrays of the model's dtypes, by input name.

        A model without a dynamic batch runs row by row.
        """
        rows = int(next(iter(inputs.values())).shape[0])
        with self._lock:
            if rows == 1 or self._dynamic:
                return self._invoke(inputs, rows)
            parts = [
                self._invoke({k: v[i : i + 1] for k, v in inputs.items()}, 1) for i in range(rows)
            ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _invoke(self, inputs: Mapping[str, npt.NDArray[Any]], rows: int) -> Tensors:
        interpreter = self._interpreter
        try:
            if rows != self._batch:
                for d in self._inputs:
                    interpreter.resize_tensor_input(d["index"], [rows, *d["shape"][1:]])
                interpreter.allocate_tensors()
                self._batch = rows
            for d in self._inputs:
                interpreter.set_tensor(d["index"], inputs[d["name"]])
            interpreter.invoke()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelRunError(f"the model failed to run: {_first_line(exc)}") from None
        return {d["name"]: interpreter.get_tensor(d["index"]) for d in self._outputs}


class TFLiteRuntime:
    """Loads ``.tflite`` models; ``num_threads`` bounds the interpreter's threads.

    The runtime's own INFO lines on stderr are shown only while this module's
    logger is enabled for DEBUG (``edge-agent run --verbose``).
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.name, self._interpreter_class = _interpreter_class()
        self.num_threads = num_threads
        set_runtime_verbose(self.name, logger.isEnabledFor(logging.DEBUG))

    def load(self, model: Path | bytes) -> TFLiteModel:
        """The model in file ``model``, or the model whose content ``model`` is."""
        source: dict[str, bytes | str]
        if isinstance(model, bytes):
            source, what = {"model_content": model}, "the TFLite runtime cannot run this model"
        else:
            source, what = {"model_path": str(model)}, model.name
        try:
            interpreter = self._interpreter_class(**source, num_threads=self.num_threads)
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{what}: {_first_line(exc)}") from None
        return TFLiteModel(interpreter)


def default_runtime() -> TFLiteRuntime:
    """The runtime installed on this device."""
    return TFLiteRuntime()


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
