"""Train the sample models and write them, with their data, to a folder.

``python -m firmware_images.build [--out DIR]`` (default: ``firmware_images/models``)
writes:

* ``v1.tflite`` — softmax regression;
* ``v2.tflite`` — MLP, one hidden layer of 32 ReLU units;
* ``v3-bad.tflite`` — MLP like v2 on vibration normalised by shaft speed
  inside the graph: accurate on training-like data, NaN for an idle machine;
* ``cloud.tflite`` — MLP, hidden layers of 128 and 64 units, trained on more data;
* ``baseline.npy`` / ``baseline.csv`` — rows of the training distribution that
  a release engineer bundles with a model (golden vectors, drift bins);
* ``heldout.npz`` — held-out ``X`` and ``y`` for measuring accuracy;
* ``features.json`` — feature names, units, valid ranges and class names;
* ``MODELS.md`` — each model's graph, size and held-out accuracy.

Every model takes ``features`` float32 ``[batch, 16]`` (batch resizable) and
returns ``scores``, float32 ``[batch, 4]`` class probabilities. Two runs give
byte-identical files: all randomness is seeded, nothing records a time, JSON
keys are sorted and numbers have fixed formats.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from firmware_images.datagen import (
    CLASSES,
    FEATURES,
    RESOLUTION_DECIMALS,
    FieldConditions,
    generate,
)
from firmware_images.reference import (
    VIBRATION_FEATURES,
    network_scores,
    speed_masks,
    speed_normalise,
    speed_normalised_scores,
)
from firmware_images.tflite_writer import GraphBuilder, TensorRef
from firmware_images.train import Network, train_mlp, train_softmax_regression

__all__ = ["DEFAULT_OUT", "SampleModel", "build", "main", "train_sample_models"]

DEFAULT_OUT = Path(__file__).resolve().parent / "models"

TRAIN_SEED = 1
HELDOUT_SEED = 2
BASELINE_SEED = 3
FIELD_SEED = 4
N_TRAIN_EDGE = 12_000
N_TRAIN_CLOUD = 40_000
N_HELDOUT = 5_000
N_BASELINE = 5_000
# The field sample MODELS.md reports v3-bad's behaviour on.
FIELD_CHECK = FieldConditions(idle_share=0.1)
N_FIELD_CHECK = 2_000

_PURPOSE = "edgefleet sample model: predictive maintenance of a rotating machine"


@dataclass(frozen=True)
class SampleModel:
    """A trained sample model: its file name, what its graph is, and its weights."""

    name: str
    graph: str
    network: Network
    speed_normalised: bool = False
    trained_on: int = N_TRAIN_EDGE

    @property
    def filename(self) -> str:
        """The file the build writes the model to."""
        return f"{self.name}.tflite"

    def scores(self, X: ArrayLike) -> NDArray[np.float64]:
        """Class probabilities the model's graph computes for raw rows ``X`` (numpy reference)."""
        if self.speed_normalised:
            return speed_normalised_scores(self.network, X)
        return network_scores(self.network, X)

    def to_tflite(self) -> bytes:
        """The model as ``.tflite`` bytes: ``features`` [batch, 16] -> ``scores`` [batch, 4]."""
        g = GraphBuilder(
            description=f"{_PURPOSE}; {self.name}: {self.graph}; classes: {', '.join(CLASSES)}"
        )
        x = g.add_input("features", (1, len(FEATURES)))
        if self.speed_normalised:
            x = _speed_normalising_layer(g, x)
        last = len(self.network.layers) - 1
        h = x
        for k, layer in enumerate(self.network.layers):
            if k < last:
                h = g.relu(
                    g.fully_connected(h, layer.weights, layer.bias, f"dense_{k}"), f"dense_{k}/relu"
                )
            else:
                h = g.fully_connected(h, layer.weights, layer.bias, "logits")
        g.mark_output(g.softmax(h, "scores"))
        return g.to_bytes()


def _speed_normalising_layer(g: GraphBuilder, x: TensorRef) -> TensorRef:
    """Graph form of :func:`firmware_images.reference.speed_normalise`.

    A dense layer with a one-hot weight picks ``shaft_rpm`` as a ``[batch, 1]``
    column, DIV broadcasts every feature by it, and MUL/ADD with constant masks
    keep the quotient on vibration columns and the raw value elsewhere. The
    whole row is divided before masking, so at ``shaft_rpm == 0`` every column
    turns NaN — the defect this model exists to demonstrate.
    """
    names = [f.name for f in FEATURES]
    pick = np.zeros((1, len(FEATURES)), dtype=np.float32)
    pick[0, names.index("shaft_rpm")] = 1.0
    rpm = g.fully_connected(x, pick, np.zeros(1, dtype=np.float32), "shaft_rpm")
    per_rpm = g.div(x, rpm, "per_rpm")
    scale, keep = speed_masks()
    vibration = g.mul(per_rpm, g.add_constant("vibration_scale", scale), "vibration_per_krpm")
    passthrough = g.mul(x, g.add_constant("passthrough_mask", keep), "passthrough")
    return g.add(vibration, passthrough, "speed_normalised")


def train_sample_models() -> tuple[SampleModel, ...]:
    """Train v1, v2, v3-bad and cloud, deterministically, from the seeded training data."""
    X, y = generate(N_TRAIN_CLOUD, TRAIN_SEED)
    # Edge models see the first rows; the cloud model, which has the capacity, sees all.
    Xe, ye = X[:N_TRAIN_EDGE], y[:N_TRAIN_EDGE]
    k = len(CLASSES)
    v1 = train_softmax_regression(Xe, ye, n_classes=k, seed=11, epochs=60, learning_rate=0.02)
    v2 = train_mlp(Xe, ye, hidden=(32,), n_classes=k, seed=12, epochs=100, learning_rate=0.005)
    v3 = train_mlp(
        speed_normalise(Xe), ye, hidden=(32,), n_classes=k, seed=13, epochs=100, learning_rate=0.005
    )
    cloud = train_mlp(
        X, y, hidden=(128, 64), n_classes=k, seed=14, epochs=30, learning_rate=0.002, l2=1e-3
    )
    return (
        SampleModel("v1", "softmax regression (FULLY_CONNECTED 16->4, SOFTMAX)", v1),
        SampleModel("v2", "MLP (FULLY_CONNECTED 16->32, RELU, FULLY_CONNECTED 32->4, SOFTMAX)", v2),
        SampleModel(
            "v3-bad",
            "speed-normalised MLP (FULLY_CONNECTED one-hot picks shaft_rpm, "
            "DIV features by it, MUL masks, ADD; then FULLY_CONNECTED 16->32, "
            "RELU, FULLY_CONNECTED 32->4, SOFTMAX)",
            v3,
            speed_normalised=True,
        ),
        SampleModel(
            "cloud",
            "MLP (FULLY_CONNECTED 16->128, RELU, FULLY_CONNECTED 128->64, RELU, "
            "FULLY_CONNECTED 64->4, SOFTMAX)",
            cloud,
            trained_on=N_TRAIN_CLOUD,
        ),
    )


def build(out_dir: Path, models: Sequence[SampleModel] | None = None) -> dict[str, Path]:
    """Write every sample file into ``out_dir``, training the models unless given.

    ``models`` lets a caller that already trained them (with
    :func:`train_sample_models`) skip training again. Returns the written
    paths by file name. The bytes depend only on the code and the library
    versions, never on the time or the host.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = train_sample_models()
    X_held, y_held = generate(N_HELDOUT, HELDOUT_SEED)
    X_base, _ = generate(N_BASELINE, BASELINE_SEED)

    files: dict[str, bytes] = {m.filename: m.to_tflite() for m in models}
    files["baseline.npy"] = _npy(X_base)
    files["baseline.csv"] = _csv(X_base)
    files["heldout.npz"] = _npz(X=X_held, y=y_held)
    files["features.json"] = _features_json()
    files["MODELS.md"] = _models_md(models, files, X_held, y_held).encode()

    written = {}
    for name, data in files.items():
        path = out_dir / name
        path.write_bytes(data)
        written[name] = path
    return written


def _npy(a: NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npz(**arrays: NDArray[Any]) -> bytes:
    # Uncompressed: zip entries carry the fixed 1980 timestamp and no host data.
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _csv(X: NDArray[np.float32]) -> bytes:
    """Rows at each sensor's resolution; parsed back to float32 they equal ``X``."""
    lines = [",".join(f.name for f in FEATURES)]
    columns = [
        [f"{v:.{d}f}" for v in X[:, j].astype(np.float64)]
        for j, d in enumerate(RESOLUTION_DECIMALS)
    ]
    lines.extend(",".join(row) for row in zip(*columns, strict=True))
    return ("\n".join(lines) + "\n").encode()


def _features_json() -> bytes:
    doc = {
        "features": [
            {"name": f.name, "unit": f.unit, "valid_min": f.valid_min, "valid_max": f.valid_max}
            for f in FEATURES
        ],
        "classes": list(CLASSES),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _accuracy(model: SampleModel, X: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    return float(np.mean(model.scores(X).argmax(axis=1) == y))


def _models_md(
    models: Sequence[SampleModel],
    files: dict[str, bytes],
    X_held: NDArray[np.float32],
    y_held: NDArray[np.int64],
) -> str:
    rows = []
    accuracy = {m.name: _accuracy(m, X_held, y_held) for m in models}
    for m in models:
        data = files[m.filename]
        params = sum(layer.weights.size + layer.bias.size for layer in m.network.layers)
        rows.append(
            f"| `{m.filename}` | {m.graph} | {params} | {len(data)} | "
            f"{m.trained_on} | {100 * accuracy[m.name]:.2f} % | "
            f"`{hashlib.sha256(data).hexdigest()[:16]}` |"
        )

    v3 = next(m for m in models if m.speed_normalised)
    X_field, _ = generate(N_FIELD_CHECK, FIELD_SEED, FIELD_CHECK)
    idle = X_field[:, 0] == 0.0
    nan_rows = np.isnan(v3.scores(X_field)).any(axis=1)
    X_base = np.load(io.BytesIO(files["baseline.npy"]))
    base_finite = np.isfinite(v3.scores(X_base)).all(axis=1)
    vibration = ", ".join(f"`{v}`" for v in VIBRATION_FEATURES)

    counts = np.bincount(y_held, minlength=len(CLASSES))
    mix = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts, strict=True))
    feature_lines = "\n".join(
        f"| {j} | `{f.name}` | {f.unit} | {f.valid_min:g} | {f.valid_max:g} |"
        for j, f in enumerate(FEATURES)
    )
    return f"""# Sample models

Built by `python -m firmware_images.build`; do not edit by hand. Every model
classifies one measurement window of a rotating machine as one of
{", ".join(f"`{c}`" for c in CLASSES)}. Input `features`: float32
`[batch, 16]` of raw sensor values (batch resizable with `resize_tensor_input`);
output `scores`: float32 `[batch, 4]` class probabilities. Input
standardisation is folded into the first dense layer.

## Models

Accuracy is on `heldout.npz` ({N_HELDOUT} rows: {mix}).

| file | graph | parameters | bytes | training rows | held-out accuracy | sha256 (first 16) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Why `v3-bad` is bad

`v3-bad` divides the vibration features ({vibration})
by shaft speed inside the graph. Offline it looks fine:
{100 * accuracy[v3.name]:.2f} % on held-out data (`v2`: {100 * accuracy["v2"]:.2f} %),
and finite scores on {int(base_finite.sum())} of {N_BASELINE} baseline rows,
so golden vectors taken from the baseline pass.

But the graph divides the whole row by `shaft_rpm` before masking. On an
idle machine (`shaft_rpm == 0`) that is `0/0` or `x/0`; the masks turn
`inf * 0` into NaN in every column, and NaN flows through the dense layers
and the softmax. On {N_FIELD_CHECK} field rows with
`idle_share={FIELD_CHECK.idle_share}`, {int(nan_rows[idle].sum())} of
{int(idle.sum())} idle rows score NaN and {int(nan_rows[~idle].sum())} of
{int((~idle).sum())} running rows do.

## Data

| file | contents |
|---|---|
| `baseline.npy` | {N_BASELINE} rows of the training distribution (no idle rows), float32 |
| `baseline.csv` | the same rows; header of feature names, each sensor's resolution |
| `heldout.npz` | `X` float32 `[{N_HELDOUT}, 16]`, `y` int64 class indices |
| `features.json` | names, units, valid ranges, classes: a bundle builder's input |

Seeds: training {TRAIN_SEED}, held-out {HELDOUT_SEED}, baseline {BASELINE_SEED}.

| # | feature | unit | valid min | valid max |
|---|---|---|---|---|
{feature_lines}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build into ``--out`` and list what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_images.build", description="Train and write the sample models."
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    for name, path in build(args.out).items():
        print(f"{path.stat().st_size:>9}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
