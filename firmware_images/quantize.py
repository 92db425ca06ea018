"""Post-training int8 quantization of a sample network, and what its graph computes.

A :class:`QuantizedNetwork` is the graph ``features`` (float32) -> MUL, ADD
(standardisation, float32) -> QUANTIZE (int8) -> int8 FULLY_CONNECTED layers
(ReLU fused between them) -> DEQUANTIZE -> SOFTMAX: weights, activations and
arithmetic are int8 with int32 accumulators, only the standardisation before
and the softmax after are float.

Every scale is a power of two, chosen from the ranges a calibration sample
reaches (:func:`quantize_network`). Then each layer's requantization factor
``input_scale * weight_scale / output_scale`` is a power of two ``2**-k``
too, which the runtime's fixed-point multiplier holds exactly, and
:func:`quantized_scores` computes bit for bit what the runtime computes: its
requantization (ruy's fixed-point multiply by ``2**30``, then a rounding
shift right by ``k - 1``, each rounding half up: in all
``floor((acc + 1 + 2**(k-1)) / 2**k)``), and ``x / scale`` exact when
quantizing the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from firmware_images.train import Network

__all__ = ["QuantizedDense", "QuantizedNetwork", "quantize_network", "quantized_scores"]

_QMIN, _QMAX = -128, 127
# Weights are symmetric in [-127, 127], as TFLite's int8 scheme asks.
_WMAX = 127
# The share of calibration values an activation range covers; the rest saturates.
_RANGE_QUANTILE = 0.9995


@dataclass(frozen=True)
class QuantizedDense:
    """An int8 dense layer: ``weights`` int8 ``[out, in]`` (zero point 0), ``bias`` int32.

    The bias has scale ``input_scale * weight_scale``; the int8 output has
    ``output_scale`` and ``output_zero_point``; ``relu`` is fused.
    """

    weights: NDArray[np.int8]
    weight_scale: float
    bias: NDArray[np.int32]
    output_scale: float
    output_zero_point: int
    relu: bool


@dataclass(frozen=True)
class QuantizedNetwork:
    """Float standardisation, int8 input quantization, then int8 dense layers.

    ``input_scale``/``input_offset`` (float32 ``[in]``) standardise a raw row;
    the result is quantized with ``z_scale`` and ``z_zero_point``.
    """

    input_scale: NDArray[np.float32]
    input_offset: NDArray[np.float32]
    z_scale: float
    z_zero_point: int
    layers: tuple[QuantizedDense, ...]

    @property
    def parameters(self) -> int:
        """Weights and biases of the dense layers."""
        return sum(layer.weights.size + layer.bias.size for layer in self.layers)


def quantize_network(network: Network, X_calibration: ArrayLike) -> QuantizedNetwork:
    """Quantize ``network`` (trained with its standardisation kept apart) to int8.

    Activation ranges come from the float network on ``X_calibration`` (raw
    rows the network was trained on); weights are quantized per tensor,
    symmetric. Every scale is a power of two (see the module's docstring).
    """
    if network.input_scale is None or network.input_offset is None:
        raise ValueError("quantize_network needs a network whose standardisation is not folded")
    scale, offset = network.input_scale, network.input_offset
    h = _standardise(scale, offset, X_calibration).astype(np.float64)
    z_scale = _pow2_at_least(_range(np.abs(h)) / _QMAX)
    layers = []
    in_scale = z_scale
    last = len(network.layers) - 1
    for k, layer in enumerate(network.layers):
        W = layer.weights.astype(np.float64)
        b = layer.bias.astype(np.float64)
        h = h @ W.T + b
        relu = k < last
        if relu:
            h = np.maximum(h, 0.0)
            out_scale, out_zp = _pow2_at_least(_range(h) / (_QMAX - _QMIN)), _QMIN
        else:
            # Logits saturate sooner: past a margin of ~16 the softmax is certain anyway,
            # and a finer scale keeps the confidence the device escalates by smooth.
            out_scale, out_zp = _pow2_at_least(min(_range(np.abs(h)), 15.0) / _QMAX), 0
        w_scale = _pow2_at_least(float(np.max(np.abs(W))) / _WMAX)
        w_q = np.clip(np.rint(W / w_scale), -_WMAX, _WMAX).astype(np.int8)
        b_q = np.rint(b / (in_scale * w_scale)).astype(np.int32)
        layers.append(QuantizedDense(w_q, w_scale, b_q, out_scale, out_zp, relu))
        in_scale = out_scale
    return QuantizedNetwork(scale, offset, z_scale, 0, tuple(layers))


def quantized_scores(network: QuantizedNetwork, X: ArrayLike) -> NDArray[np.float64]:
    """Class probabilities, float64 ``[n, classes]``, the int8 graph gives for raw rows ``X``."""
    z = _standardise(network.input_scale, network.input_offset, X)
    inv = np.float32(1.0 / network.z_scale)
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(z * inv) + network.z_zero_point, _QMIN, _QMAX)
    q = np.nan_to_num(q, nan=float(network.z_zero_point)).astype(np.int64)
    zp, in_scale = network.z_zero_point, network.z_scale
    for layer in network.layers:
        acc = (q - zp) @ layer.weights.astype(np.int64).T + layer.bias.astype(np.int64)
        shift = _shift(in_scale * layer.weight_scale / layer.output_scale)
        low = layer.output_zero_point if layer.relu else _QMIN
        out = _requantize(acc, shift) + layer.output_zero_point
        q = np.clip(out, low, _QMAX)
        zp, in_scale = layer.output_zero_point, layer.output_scale
    logits = ((q - zp).astype(np.float32) * np.float32(in_scale)).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    probabilities: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return probabilities


def _standardise(
    scale: NDArray[np.float32], offset: NDArray[np.float32], X: ArrayLike
) -> NDArray[np.float32]:
    """``x * scale + offset`` in float32, one rounding per operation (MUL, then ADD)."""
    x = np.asarray(X, dtype=np.float32)
    out: NDArray[np.float32] = (x * scale[None, :]).astype(np.float32) + offset[None, :]
    return out.astype(np.float32)


def _shift(factor: float) -> int:
    """``k`` for a requantization factor ``2**-k`` (``k >= 1``), refusing any other factor."""
    k = -math.log2(factor)
    if k != round(k) or k < 1:
        raise ValueError(f"requantization factor {factor} is not a power of two below 1")
    return round(k)


def _requantize(acc: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """``acc * 2**-k`` rounded as the runtime's int8 dense layer does for multiplier ``2**30``.

    A doubling high multiply rounding half up, ``floor((acc + 1) / 2)``, then
    a shift right by ``k - 1`` rounding half up.
    """
    x = (acc + 1) >> 1
    e = k - 1
    out: NDArray[np.int64] = (x + ((1 << e) >> 1)) >> e
    return out


def _range(values: NDArray[np.float64]) -> float:
    return max(float(np.quantile(values, _RANGE_QUANTILE)), 1e-6)


def _pow2_at_least(x: float) -> float:
    """The smallest power of two ``>= x``."""
    return float(2.0 ** math.ceil(math.log2(x)))
