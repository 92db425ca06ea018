"""Deterministic numpy training of the sample classifiers.

Models are trained in float64 on standardised inputs with Adam over fixed,
seeded mini-batches. The standardisation is then folded into the first layer,
so the exported graph takes raw sensor values, and every weight is rounded to
:data:`SIGNIFICANT_BITS` significant bits. Training touches BLAS, whose kernels
differ in the last bits between CPUs; the coarse grid absorbs those
differences, so a rebuild gives the same float32 weights on any machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["SIGNIFICANT_BITS", "Dense", "Network", "train_mlp", "train_softmax_regression"]

# float32 keeps 24; 16 bits is about 4.8 significant decimals, far finer than
# the accuracy of the fit and far coarser than any BLAS rounding difference.
SIGNIFICANT_BITS = 16


@dataclass(frozen=True)
class Dense:
    """A dense layer ``x @ weights.T + bias`` in TFLite's FULLY_CONNECTED layout.

    ``weights`` is float32 ``[out, in]`` and ``bias`` float32 ``[out]``.
    """

    weights: NDArray[np.float32]
    bias: NDArray[np.float32]


@dataclass(frozen=True)
class Network:
    """Dense layers with ReLU between them and softmax after the last one.

    A single layer is softmax regression.
    """

    layers: tuple[Dense, ...]
    # Standardisation ``x * input_scale + input_offset`` before the first layer
    # (float32 ``[in]``); ``None``: folded into the first layer.
    input_scale: NDArray[np.float32] | None = None
    input_offset: NDArray[np.float32] | None = None

    @property
    def n_inputs(self) -> int:
        """Width of the input the first layer expects."""
        return int(self.layers[0].weights.shape[1])

    @property
    def n_outputs(self) -> int:
        """Number of classes the last layer scores."""
        return int(self.layers[-1].weights.shape[0])


def train_softmax_regression(
    X: ArrayLike,
    y: ArrayLike,
    *,
    n_classes: int,
    seed: int,
    epochs: int = 60,
    batch_size: int = 256,
    learning_rate: float = 0.02,
    l2: float = 1e-4,
) -> Network:
    """Fit multinomial logistic regression on raw features ``X`` and labels ``y``.

    Deterministic for a given seed and data; the result takes raw features.
    """
    return train_mlp(
        X,
        y,
        hidden=(),
        n_classes=n_classes,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        l2=l2,
    )


def train_mlp(
    X: ArrayLike,
    y: ArrayLike,
    *,
    hidden: Sequence[int],
    n_classes: int,
    seed: int,
    epochs: int = 60,
    batch_size: int = 256,
    learning_rate: float = 0.003,
    l2: float = 1e-4,
    fold_standardisation: bool = True,
) -> Network:
    """Fit an MLP (ReLU hidden layers of the given widths, softmax output).

    Minimises cross-entropy plus ``l2`` times the squared weights with Adam
    over seeded mini-batches. Deterministic for a given seed and data; the
    result takes raw features (standardisation is folded into the first
    layer, or with ``fold_standardisation=False`` kept apart as the
    network's ``input_scale`` and ``input_offset``, what a quantized graph
    applies in float before its int8 layers) and its weights lie on the
    :data:`SIGNIFICANT_BITS` grid.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"expected X [n, d] and y [n], got {X.shape} and {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("training features must be finite")
    rng = np.random.default_rng(seed)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    Z = (X - mean) / std
    onehot = np.eye(n_classes)[y]

    widths = [X.shape[1], *hidden, n_classes]
    # He initialisation suits ReLU; weights here are [in, out] for x @ W.
    Ws = [rng.standard_normal((a, b)) * np.sqrt(2.0 / a) for a, b in itertools.pairwise(widths)]
    bs = [np.zeros(b) for b in widths[1:]]
    params = [p for pair in zip(Ws, bs, strict=True) for p in pair]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    n = X.shape[0]
    total_steps = epochs * -(-n // batch_size)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            grads = _gradients(params, Z[idx], onehot[idx], l2)
            # Cosine decay: large steps early, a quiet final iterate to export.
            rate = learning_rate * 0.5 * (1.0 + np.cos(np.pi * step / total_steps))
            step += 1
            for k, (p, g) in enumerate(zip(params, grads, strict=True)):
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat = m[k] / (1 - beta1**step)
                v_hat = v[k] / (1 - beta2**step)
                p -= rate * m_hat / (np.sqrt(v_hat) + eps)

    Ws, bs = params[0::2], params[1::2]
    if not fold_standardisation:
        layers = tuple(
            Dense(weights=_on_grid(W.T), bias=_on_grid(b)) for W, b in zip(Ws, bs, strict=True)
        )
        return Network(layers, input_scale=_on_grid(1.0 / std), input_offset=_on_grid(-mean / std))
    # Fold z = (x - mean) / std into the first layer: x @ (W / std) + (b - (mean / std) @ W).
    W0 = Ws[0] / std[:, None]
    b0 = bs[0] - (mean / std) @ Ws[0]
    folded = [(W0, b0), *zip(Ws[1:], bs[1:], strict=True)]
    return Network(tuple(Dense(weights=_on_grid(W.T), bias=_on_grid(b)) for W, b in folded))


def _gradients(
    params: list[NDArray[np.float64]],
    Z: NDArray[np.float64],
    onehot: NDArray[np.float64],
    l2: float,
) -> list[NDArray[np.float64]]:
    """Gradients of mean cross-entropy plus L2 penalty, in the order of ``params``."""
    Ws, bs = params[0::2], params[1::2]
    activations = [Z]
    h = Z
    for k, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        h = h @ W + b
        if k < len(Ws) - 1:
            h = np.maximum(h, 0.0)
        activations.append(h)
    logits = activations[-1]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    delta = (p - onehot) / Z.shape[0]
    grads: list[NDArray[np.float64]] = []
    for k in range(len(Ws) - 1, -1, -1):
        a = activations[k]
        grads.append(delta.sum(axis=0))
        grads.append(a.T @ delta + l2 * Ws[k])
        if k > 0:
            delta = (delta @ Ws[k].T) * (activations[k] > 0)
    grads.reverse()
    return grads


def _on_grid(a: ArrayLike) -> NDArray[np.float32]:
    """Round to :data:`SIGNIFICANT_BITS` significant bits, then to float32.

    ``frexp`` and ``ldexp`` are exact, so the grid itself never depends on the
    machine's math library.
    """
    mantissa, exponent = np.frexp(np.asarray(a, dtype=np.float64))
    rounded = np.ldexp(np.round(np.ldexp(mantissa, SIGNIFICANT_BITS)), exponent - SIGNIFICANT_BITS)
    return np.ascontiguousarray(rounded.astype(np.float32))
