"""The interface every model runtime implements."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from protocol.manifest import TensorSpec

Tensors = dict[str, npt.NDArray[Any]]


class ModelLoadError(Exception):
    """The runtime cannot load or prepare the model (bad file, unresolved custom op)."""


class RuntimeNotInstalled(ModelLoadError):
    """No TFLite runtime imports on this device; the message says what to install or use."""


class ModelRunError(Exception):
    """The model failed while running on an input."""


class LoadedModel(Protocol):
    """A model ready to run; ``run`` takes and returns ``[batch, ...]`` arrays by name."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Tensors: ...


class Runtime(Protocol):
    """Loads models from files; replaceable (tflite-runtime, LiteRT, a test double)."""

    name: str

    def load(self, path: Path) -> LoadedModel: ...
