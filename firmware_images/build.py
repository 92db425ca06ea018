"""Train the sample models and write them, with their data, to a folder.

``python -m firmware_images.build [--out DIR]`` (default: ``firmware_images/models``)
writes:

* ``v1.tflite`` — softmax regression;
* ``v2.tflite`` — int8-quantized MLP, one hidden layer of 8 ReLU units: the
  small device model;
* ``v3-bad.tflite`` — MLP like v2 on vibration normalised by shaft speed
  inside the graph: accurate on training-like data, NaN for an idle machine;
* ``cloud.tflite`` — MLP, hidden layers of 128 and 64 units, trained on more data:
  the clearly stronger model a cloud endpoint serves;
* ``baseline.npy`` / ``baseline.csv`` — rows of the training distribution that
  a release engineer bundles with a model (golden vectors, drift bins);
* ``heldout.npz`` — held-out ``X`` and ``y`` for measuring accuracy;
* ``features.json`` — feature names, units, valid ranges and class names;
* ``models.json`` — per model: its calibration temperature (fitted on
  calibration rows, neither training nor held-out), parameters, bytes and
  held-out accuracy; what a bundle builder reads the temperature from;
* ``MODELS.md`` — each model's graph, size, accuracy per class, calibration,
  and the accuracy of v2 escalating its least confident rows to cloud.

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

from firmware_images.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    offload_curve,
)
from firmware_images.datagen import (
    CLASSES,
    FEATURES,
    RESOLUTION_DECIMALS,
    FieldConditions,
    generate,
)
from firmware_images.quantize import QuantizedNetwork, quantize_network, quantized_scores
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
CALIBRATION_SEED = 5
N_TRAIN_EDGE = 12_000
N_TRAIN_CLOUD = 40_000
N_HELDOUT = 5_000
N_BASELINE = 5_000
N_CALIBRATION = 5_000
# Offload shares MODELS.md reports the hybrid's accuracy at.
OFFLOAD_SHARES = tuple(k / 10 for k in range(11))
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
    # The int8 form the graph holds; ``None``: a float32 graph of ``network``.
    quantized: QuantizedNetwork | None = None

    @property
    def filename(self) -> str:
        """The file the build writes the model to."""
        return f"{self.name}.tflite"

    def scores(self, X: ArrayLike) -> NDArray[np.float64]:
        """Class probabilities the model's graph computes for raw rows ``X`` (numpy reference)."""
        if self.quantized is not None:
            return quantized_scores(self.quantized, X)
        if self.speed_normalised:
            return speed_normalised_scores(self.network, X)
        return network_scores(self.network, X)

    @property
    def parameters(self) -> int:
        """Weights and biases of the dense layers."""
        return sum(layer.weights.size + layer.bias.size for layer in self.network.layers)

    def to_tflite(self) -> bytes:
        """The model as ``.tflite`` bytes: ``features`` [batch, 16] -> ``scores`` [batch, 4]."""
        g = GraphBuilder(
            description=f"{_PURPOSE}; {self.name}: {self.graph}; classes: {', '.join(CLASSES)}"
        )
        x = g.add_input("features", (1, len(FEATURES)))
        if self.quantized is not None:
            g.mark_output(g.softmax(_int8_layers(g, x, self.quantized), "scores"))
            return g.to_bytes()
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


def _int8_layers(g: GraphBuilder, x: TensorRef, q: QuantizedNetwork) -> TensorRef:
    """Graph form of :func:`firmware_images.quantize.quantized_scores` up to the logits.

    MUL and ADD standardise in float32, QUANTIZE makes int8, int8
    FULLY_CONNECTED layers (ReLU fused) follow, DEQUANTIZE gives float32 logits.
    """
    z = g.mul(x, g.add_constant("standardise/scale", q.input_scale[None, :]), "standardise/mul")
    z = g.add(z, g.add_constant("standardise/offset", q.input_offset[None, :]), "standardised")
    h = g.quantize(z, q.z_scale, q.z_zero_point, "standardised/int8")
    last = len(q.layers) - 1
    for k, layer in enumerate(q.layers):
        name = f"dense_{k}/int8" if k < last else "logits/int8"
        h = g.fully_connected_int8(
            h,
            layer.weights,
            layer.weight_scale,
            layer.bias,
            (layer.output_scale, layer.output_zero_point),
            name,
            relu=layer.relu,
        )
    return g.dequantize(h, "logits")


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
    v2 = train_mlp(
        Xe,
        ye,
        hidden=(8,),
        n_classes=k,
        seed=12,
        epochs=100,
        learning_rate=0.005,
        fold_standardisation=False,
    )
    v3 = train_mlp(
        speed_normalise(Xe), ye, hidden=(32,), n_classes=k, seed=13, epochs=100, learning_rate=0.005
    )
    cloud = train_mlp(
        X, y, hidden=(128, 64), n_classes=k, seed=14, epochs=30, learning_rate=0.002, l2=1e-3
    )
    return (
        SampleModel("v1", "softmax regression (FULLY_CONNECTED 16->4, SOFTMAX)", v1),
        SampleModel(
            "v2",
            "int8 MLP (MUL, ADD standardise in float; QUANTIZE to int8; FULLY_CONNECTED "
            "int8 16->8 with RELU, FULLY_CONNECTED int8 8->4; DEQUANTIZE; SOFTMAX)",
            v2,
            quantized=quantize_network(v2, Xe),
        ),
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

    X_cal, y_cal = generate(N_CALIBRATION, CALIBRATION_SEED)

    files: dict[str, bytes] = {m.filename: m.to_tflite() for m in models}
    files["baseline.npy"] = _npy(X_base)
    files["baseline.csv"] = _csv(X_base)
    files["heldout.npz"] = _npz(X=X_held, y=y_held)
    files["features.json"] = _features_json()
    reports = [_report(m, files[m.filename], X_cal, y_cal, X_held, y_held) for m in models]
    files["models.json"] = _models_json(reports)
    files["MODELS.md"] = _models_md(models, reports, files, X_held, y_held).encode()

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


@dataclass(frozen=True)
class _Report:
    """What the build measured of one model."""

    name: str
    parameters: int
    size: int
    sha256: str
    temperature: float
    heldout_scores: NDArray[np.float64]
    accuracy: float
    class_accuracy: tuple[float, ...]
    ece: float
    ece_calibrated: float


def _report(
    model: SampleModel,
    data: bytes,
    X_cal: NDArray[np.float32],
    y_cal: NDArray[np.int64],
    X_held: NDArray[np.float32],
    y_held: NDArray[np.int64],
) -> _Report:
    """Fit the model's temperature on the calibration rows; measure it on the held-out ones."""
    temperature = fit_temperature(model.scores(X_cal), y_cal)
    scores = model.scores(X_held)
    right = scores.argmax(axis=1) == y_held
    return _Report(
        name=model.name,
        parameters=model.parameters,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        temperature=temperature,
        heldout_scores=scores,
        accuracy=float(right.mean()),
        class_accuracy=tuple(float(right[y_held == k].mean()) for k in range(len(CLASSES))),
        ece=expected_calibration_error(scores, y_held),
        ece_calibrated=expected_calibration_error(scores, y_held, temperature),
    )


def _models_json(reports: Sequence[_Report]) -> bytes:
    """Per model: the temperature a bundle's fallback policy carries, and its figures."""
    doc = {
        "calibration": {"rows": N_CALIBRATION, "seed": CALIBRATION_SEED},
        "models": {
            r.name: {
                "file": f"{r.name}.tflite",
                "heldout_accuracy": round(r.accuracy, 4),
                "parameters": r.parameters,
                "bytes": r.size,
                "sha256": r.sha256,
                "temperature": r.temperature,
            }
            for r in reports
        },
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _pair_section(
    reports: dict[str, _Report], y_held: NDArray[np.int64], device: str, cloud: str
) -> str:
    """Per-class accuracy of the device and cloud models, and the hybrid's offload curve."""
    d, c = reports[device], reports[cloud]
    counts = np.bincount(y_held, minlength=len(CLASSES))
    class_rows = "\n".join(
        f"| `{name}` | {counts[k]} | {_pct(d.class_accuracy[k])} | {_pct(c.class_accuracy[k])} |"
        for k, name in enumerate(CLASSES)
    )
    d_right = d.heldout_scores.argmax(axis=1) == y_held
    c_right = c.heldout_scores.argmax(axis=1) == y_held
    curve = offload_curve(d.heldout_scores, c.heldout_scores, y_held, d.temperature, OFFLOAD_SHARES)
    curve_rows = "\n".join(
        f"| {100 * share:.0f} % | {_pct(acc)} | "
        f"{(acc - d.accuracy) / (c.accuracy - d.accuracy):.2f} |"
        for share, acc in curve
    )
    gaps = [c.class_accuracy[k] - d.class_accuracy[k] for k in range(len(CLASSES))]
    widest = int(np.argmax(gaps))
    d_wrong, c_wrong = int((~d_right).sum()), int((~c_right).sum())
    cloud_fixes, device_fixes = int((~d_right & c_right).sum()), int((~c_right & d_right).sum())
    at20 = dict(curve)[0.2]
    recovered = (at20 - d.accuracy) / (c.accuracy - d.accuracy)
    verdict = "recovers" if recovered >= 0.5 else "does not recover"
    return f"""## `{device}` on the device, `{cloud}` in the cloud

`{device}` is the small model a device runs; `{cloud}` the model a cloud endpoint
serves. Held-out accuracy per class (true class rows):

| class | rows | `{device}` | `{cloud}` |
|---|---|---|---|
{class_rows}
| all | {y_held.size} | {_pct(d.accuracy)} | {_pct(c.accuracy)} |

`{device}` gets the pronounced faults and most healthy rows right; the widest
difference is on `{CLASSES[widest]}` ({_pct(d.class_accuracy[widest])} against
{_pct(c.class_accuracy[widest])}). What it misses are the mild faults whose
signature shows only against what speed, load, mounting and cooling
explain (vibration bands relative to the machine's own level through the
frame resonance, temperature above the copper losses at that load and
speed), which its 8 int8 units cannot model but `{cloud}`'s 128 and 64 can.
Of the {d_wrong} rows `{device}` gets wrong, `{cloud}` gets {cloud_fixes} right; of
the {c_wrong} rows `{cloud}` gets wrong, `{device}` gets {device_fixes} right.

### Hybrid: `{device}` escalates its least confident rows to `{cloud}`

Rows are ranked by `{device}`'s calibrated confidence
(`protocol.hybrid.calibrated_confidence`, T = {d.temperature:g}); the lowest
share goes to `{cloud}`, the rest is answered by `{device}`. Offline, on the
held-out rows ("recovered": the share of the accuracy gap between `{device}` alone
and `{cloud}` alone that the hybrid closes).

| offload | accuracy | recovered |
|---|---|---|
{curve_rows}

At 20 % offload the hybrid {verdict} at least half of the gap
({_pct(d.accuracy)} -> {_pct(at20)}, `{cloud}` alone {_pct(c.accuracy)}: {recovered:.2f} of it).
"""


def _models_md(
    models: Sequence[SampleModel],
    reports: Sequence[_Report],
    files: dict[str, bytes],
    X_held: NDArray[np.float32],
    y_held: NDArray[np.int64],
) -> str:
    rows = []
    by_name = {r.name: r for r in reports}
    accuracy = {r.name: r.accuracy for r in reports}
    for m in models:
        r = by_name[m.name]
        rows.append(
            f"| `{m.filename}` | {m.graph} | {r.parameters} | {r.size} | "
            f"{m.trained_on} | {_pct(r.accuracy)} | `{r.sha256[:16]}` |"
        )
    calibration_rows = "\n".join(
        f"| `{r.name}` | {r.temperature:g} | {r.ece:.4f} | {r.ece_calibrated:.4f} |"
        for r in reports
    )
    pair = _pair_section(by_name, y_held, "v2", "cloud") if {"v2", "cloud"} <= set(by_name) else ""

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
output `scores`: float32 `[batch, 4]` class probabilities. The float models
fold input standardisation into their first dense layer; the int8 model
standardises in float (MUL, ADD), then quantizes: its weights, activations
and arithmetic are int8 (int32 accumulators) up to the logits, and every
scale is a power of two (see `firmware_images/quantize.py`).

## Models

Accuracy is on `heldout.npz` ({N_HELDOUT} rows: {mix}).

| file | graph | parameters | bytes | training rows | held-out accuracy | sha256 (first 16) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Calibration

Each model's temperature T is fitted by temperature scaling (Guo et al.,
2017): the T minimising the negative log-likelihood of `softmax(log(p) / T)`
on {N_CALIBRATION} labelled calibration rows (seed {CALIBRATION_SEED}), neither training
nor held-out rows. `models.json` carries it; bundles of the sample models carry it as
`fallback.temperature`. Expected calibration error (top label, {ECE_BINS} equal
bins) on the held-out rows, before and after:

| model | T | ECE as given | ECE calibrated |
|---|---|---|---|
{calibration_rows}

{pair}
## Why `v3-bad` is bad

`v3-bad` divides the vibration features ({vibration})
by shaft speed inside the graph. Offline it looks fine:
{_pct(accuracy[v3.name])} on held-out data (`v2`: {_pct(accuracy["v2"])}),
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
