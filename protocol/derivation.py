"""Which features a device summarises for each model input.

A small input (a vector of sensor readings) is summarised element by element.
An input with many elements (an image, an audio frame, a long vector) is
summarised through a few derived features instead — per-channel moments or
global moments — so that a summary stays about 100-150 bytes per feature.
The bundle's manifest records the method per input; device and server both
call :func:`derive_features`, so they compute exactly the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

# numpy is imported by the functions that compute: the manifest reads this module's
# models, and `edge-agent verify` reads the manifest without loading numpy.
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

DerivationMethod = Literal["elements", "channel_moments", "global_moments"]

# Above this many elements per example, an input is summarised by derived features.
MAX_ELEMENT_FEATURES = 64
# Channels-last tensors with at most this many channels get per-channel moments.
MAX_CHANNELS = 16


class InputDerivation(BaseModel):
    """How one input tensor becomes summary features."""

    model_config = ConfigDict(frozen=True)

    input: str
    method: DerivationMethod


def choose_method(example_shape: Sequence[int]) -> DerivationMethod:
    """Pick the derivation for an input whose per-example shape is ``example_shape``."""
    size = math.prod(example_shape) if len(example_shape) else 1
    if size <= MAX_ELEMENT_FEATURES:
        return "elements"
    if len(example_shape) >= 2 and example_shape[-1] <= MAX_CHANNELS:
        return "channel_moments"
    return "global_moments"


def derived_names(
    input_name: str, method: DerivationMethod, example_shape: Sequence[int]
) -> list[str]:
    """Default feature names for an input, e.g. ``image.c0_mean`` or ``features[3]``."""
    if method == "elements":
        size = math.prod(example_shape) if len(example_shape) else 1
        return [f"{input_name}[{i}]" for i in range(size)]
    if method == "channel_moments":
        return [
            f"{input_name}.c{c}_{stat}"
            for c in range(example_shape[-1])
            for stat in ("mean", "std")
        ]
    return [f"{input_name}.{stat}" for stat in ("mean", "std", "min", "max")]


def derive(method: DerivationMethod, batch: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Derived features of one input: ``[batch, *example_shape]`` -> ``[batch, k]``."""
    import numpy as np

    x = np.asarray(batch, dtype=np.float64)
    rows = x.shape[0]
    out: npt.NDArray[np.float64]
    if method == "elements":
        out = x.reshape(rows, -1)
    elif method == "channel_moments":
        per_channel = x.reshape(rows, -1, x.shape[-1])
        moments = [per_channel.mean(axis=1), per_channel.std(axis=1)]
        out = np.stack(moments, axis=2).reshape(rows, -1)
    else:
        flat = x.reshape(rows, -1)
        out = np.stack([flat.mean(axis=1), flat.std(axis=1), flat.min(axis=1), flat.max(axis=1)], 1)
    return out


def derive_features(
    derivations: Sequence[InputDerivation], inputs: Mapping[str, npt.ArrayLike]
) -> npt.NDArray[np.float64]:
    """All summary features of a batch, inputs in manifest order: ``[batch, features]``."""
    import numpy as np

    parts = [derive(d.method, inputs[d.input]) for d in derivations]
    return np.concatenate(parts, axis=1)
