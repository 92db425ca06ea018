"""The stages of the fallback chain: ways to answer a request, each on its own.

A model on this device (:class:`ModelStage`, the active or the previous one),
the manifest's safe default (:class:`SafeDefaultStage`), or any other
:class:`Stage` (the cloud, :mod:`agent.serving.cloud`). Which stage answers is
the chain's decision (:mod:`agent.serving.chain`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from model_runtime import LoadedModel
from protocol.inference import StageName
from protocol.manifest import Manifest

Tensors = dict[str, npt.NDArray[Any]]

# The asyncio.to_thread hop costs 0.1-0.7 ms of CPU (measured; more on a busy or
# small CPU), which is most of a fast model's cost: a model faster than this runs
# on the event loop itself, a slower one in a worker thread so the loop stays
# responsive to other requests. Configurable per device ([serving] in agent.toml).
INLINE_BELOW_S = 0.02


class Stage(Protocol):
    """One way to answer a request; the chain enforces ``timeout_s`` (``None``: no limit).

    ``model_version`` is read after ``infer`` returns, so a stage whose version
    is only known from its answer (the cloud) may update it there.
    """

    @property
    def name(self) -> StageName: ...

    @property
    def model_version(self) -> str | None: ...

    @property
    def timeout_s(self) -> float | None: ...

    async def infer(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors: ...


class ModelStage:
    """A model on this device (the active or the previous one).

    Runs the model on the event loop while its measured run time (a moving
    average) stays below ``inline_below_s``, in a worker thread otherwise; the
    first run, of unknown cost, goes to a thread. ``inline`` forces either way.
    """

    def __init__(
        self,
        name: Literal["active", "previous"],
        model_version: str,
        model: LoadedModel,
        *,
        timeout_s: float | None = 1.0,
        inline: bool | None = None,
        inline_below_s: float = INLINE_BELOW_S,
    ) -> None:
        self.name: StageName = name
        self.model_version: str | None = model_version
        self.model = model
        self.timeout_s = timeout_s
        self._forced = inline
        self._inline_below_s = inline_below_s
        self._average_s: float | None = None

    @property
    def runs_inline(self) -> bool:
        """Whether the next run happens on the event loop."""
        if self._forced is not None:
            return self._forced
        return self._average_s is not None and self._average_s < self._inline_below_s

    async def infer(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        if self.runs_inline:
            return self._timed_run(tensors)
        return await asyncio.to_thread(self._timed_run, tensors)

    def run_inline(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        """Run on the caller's thread (the chain does this for fast models)."""
        return self._timed_run(tensors)

    def _timed_run(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        start = time.perf_counter()
        outputs = self.model.run(tensors)
        elapsed = time.perf_counter() - start
        average = self._average_s
        self._average_s = elapsed if average is None else 0.8 * average + 0.2 * elapsed
        return outputs


class SafeDefaultStage:
    """The manifest's safe default, repeated for every row; it always answers."""

    timeout_s: float | None = None

    def __init__(self, manifest: Manifest) -> None:
        self.name: StageName = "safe_default"
        self.model_version: str | None = manifest.version
        self._examples = {
            spec.name: np.asarray(
                manifest.fallback.safe_default[spec.name], dtype=spec.dtype
            ).reshape(spec.example_shape)
            for spec in manifest.outputs
        }

    async def infer(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        return self.answer(batch_rows(tensors))

    def answer(self, rows: int) -> Tensors:
        """The safe default for a batch of ``rows``."""
        return {
            name: np.repeat(example[np.newaxis], rows, axis=0)
            for name, example in self._examples.items()
        }


def batch_rows(tensors: Mapping[str, npt.NDArray[Any]]) -> int:
    """The batch size of ``tensors``."""
    return int(next(iter(tensors.values())).shape[0])
