"""Numpy forward passes that compute what the sample ``.tflite`` graphs compute.

These are the reference the runtime is checked against: for finite inputs
they agree with the TFLite interpreter to float32 rounding, and they follow
IEEE arithmetic the same way the graphs do (``x / 0`` is ``inf``, ``0 / 0``
and ``inf * 0`` are NaN, NaN survives a dense layer and softmax).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from firmware_images.datagen import FEATURES
from firmware_images.train import Network

__all__ = [
    "SPEED_REFERENCE_RPM",
    "VIBRATION_FEATURES",
    "network_scores",
    "speed_masks",
    "speed_normalise",
    "speed_normalised_scores",
]

# Vibration grows with speed; the speed-normalised model divides these by it.
VIBRATION_FEATURES: tuple[str, ...] = (
    "vib_rms_x",
    "vib_rms_y",
    "vib_rms_z",
    "vib_peak_mm_s",
    "band_1x",
    "band_2x",
    "band_bpfo",
    "band_hf",
)
# Vibration is expressed per this many rpm, which keeps values near their raw size.
SPEED_REFERENCE_RPM = 1000.0

_RPM = [f.name for f in FEATURES].index("shaft_rpm")


def speed_masks() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The ``(scale, keep)`` rows, float32 ``[1, 16]``, that the normalising graph applies.

    ``scale`` is :data:`SPEED_REFERENCE_RPM` on vibration columns and 0 elsewhere;
    ``keep`` is 1 where a feature passes through unchanged and 0 on vibration columns.
    """
    vib = np.array([f.name in VIBRATION_FEATURES for f in FEATURES])
    scale = np.where(vib, SPEED_REFERENCE_RPM, 0.0).astype(np.float32)[None, :]
    keep = np.where(vib, 0.0, 1.0).astype(np.float32)[None, :]
    return scale, keep


def speed_normalise(X: ArrayLike) -> NDArray[np.float32]:
    """Vibration features per :data:`SPEED_REFERENCE_RPM`; other features unchanged.

    Computed as the graph does, in float32: ``(X / rpm) * scale + X * keep``.
    Every column of a row is divided by its speed before the masks pick the
    vibration columns, so a row with ``shaft_rpm == 0`` becomes NaN in every
    column (``0/0``, or ``inf * 0``) or ``inf``.
    """
    X = np.asarray(X, dtype=np.float32)
    scale, keep = speed_masks()
    with np.errstate(divide="ignore", invalid="ignore"):
        per_rpm = X / X[:, _RPM : _RPM + 1]
        out: NDArray[np.float32] = per_rpm * scale + X * keep
    return out


def network_scores(network: Network, X: ArrayLike) -> NDArray[np.float64]:
    """Class probabilities, float64 ``[n, classes]``, of ``network`` on raw rows ``X``.

    Dense layers with ReLU between them and softmax at the end, as the plain
    sample graphs (v1, v2, cloud) compute them.
    """
    x = np.asarray(X, dtype=np.float32)
    if network.input_scale is not None and network.input_offset is not None:
        x = (x * network.input_scale[None, :]).astype(np.float32) + network.input_offset[None, :]
    h = x.astype(np.float64)
    last = len(network.layers) - 1
    with np.errstate(invalid="ignore", over="ignore"):
        for k, layer in enumerate(network.layers):
            h = h @ layer.weights.astype(np.float64).T + layer.bias.astype(np.float64)
            if k < last:
                # np.maximum keeps NaN, as the runtime's ReLU does.
                h = np.maximum(h, 0.0)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        probabilities: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return probabilities


def speed_normalised_scores(network: Network, X: ArrayLike) -> NDArray[np.float64]:
    """Class probabilities of the speed-normalising graph (v3-bad) on raw rows ``X``.

    NaN in every column for rows whose ``shaft_rpm`` is 0; finite otherwise.
    """
    return network_scores(network, speed_normalise(X))
