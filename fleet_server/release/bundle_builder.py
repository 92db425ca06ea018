"""Building a bundle from any ``.tflite`` model and its baseline data.

The builder reads the input/output contract from the model itself, runs the
model on the baseline with the real runtime (so a model the runtime cannot run
is refused here, not on a device), summarises the baseline in the format
devices upload, and picks golden vectors for the on-device self-test.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from model_runtime import LoadedModel, ModelLoadError, ModelRunError, TFLiteRuntime
from protocol.bundle import file_entry, write_bundle
from protocol.cbpe import Calibration, calibrate
from protocol.derivation import InputDerivation, choose_method, derive, derived_names
from protocol.golden import pack_golden
from protocol.manifest import (
    Baseline,
    FallbackPolicy,
    FeatureBaseline,
    FeatureSpec,
    GoldenVectors,
    Manifest,
    ResourceBudget,
    TensorSpec,
)
from protocol.summary import edges_id, quantile_edges, score_histogram, summarize
from protocol.versioning import default_release_counter, parse_semver

MODEL_MEMBER = "model.tflite"
GOLDEN_MEMBER = "golden.npz"
# Fewer labelled rows than this leave most calibration cells to the prior.
MIN_CALIBRATION_ROWS = 200
# A probability output sums to one per row within this tolerance.
_PROBABILITY_TOLERANCE = 1e-3


class BundleBuildError(Exception):
    """The model or its baseline cannot make a bundle; the message says why."""


@dataclass
class BundleSpec:
    """What a release engineer says about a bundle beyond the model and baseline."""

    name: str
    version: str
    hardware_ids: Sequence[str]
    release_counter: int | None = None
    min_agent_version: str = "0.1.0"
    description: str = ""
    feature_specs: Sequence[FeatureSpec] | None = None
    classes: Sequence[str] | None = None
    confidence_threshold: float = 0.6
    # Temperature calibrating the score output's confidence, softmax(log(p) / T),
    # fitted on labelled rows the model was not trained on (the sample models'
    # are in firmware_images/models/models.json); 1.0: the scores as given.
    temperature: float = 1.0
    safe_default: Mapping[str, Sequence[float]] | None = None
    budget: ResourceBudget = field(default_factory=ResourceBudget)
    golden_count: int = 8


@dataclass(frozen=True)
class BuiltBundle:
    """A bundle in memory: its manifest and members, ready to write."""

    manifest: Manifest
    members: dict[str, bytes]

    def write(self, path: Path) -> None:
        """Write the bundle file (atomically: a partial file never has the final name)."""
        tmp = path.with_name(path.name + ".partial")
        with tmp.open("wb") as out:
            write_bundle(out, self.manifest, self.members)
        tmp.replace(path)


def load_feature_file(path: Path) -> tuple[list[FeatureSpec], list[str] | None]:
    """Read ``{"features": [...], "classes": [...]}``: feature names, units, valid ranges."""
    try:
        data = json.loads(path.read_text())
        features = [FeatureSpec.model_validate(f) for f in data["features"]]
    except FileNotFoundError:
        raise BundleBuildError(f"feature file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise BundleBuildError(f"feature file {path} is not valid: {exc}") from None
    classes = data.get("classes")
    return features, [str(c) for c in classes] if classes else None


def load_baseline(
    path: Path, inputs: Sequence[TensorSpec]
) -> tuple[dict[str, npt.NDArray[Any]], list[str] | None]:
    """Baseline rows per input, and feature names if the file carries them.

    ``.npy``: one array whose rows match the (single) input's example shape;
    ``.npz``: one such array per input name; ``.csv``: a header of feature
    names, one row per example of a single flat input.
    """
    suffix = path.suffix.lower()
    names: list[str] | None = None
    try:
        if suffix == ".npy":
            arrays = (
                {inputs[0].name: np.load(path, allow_pickle=False)} if len(inputs) == 1 else None
            )
            if arrays is None:
                raise BundleBuildError(
                    f"the model has {len(inputs)} inputs; give the baseline as .npz "
                    "with one array per input name"
                )
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        elif suffix == ".csv":
            if len(inputs) != 1:
                raise BundleBuildError("a .csv baseline is only for a model with one input")
            names, rows = _read_csv(path)
            arrays = {inputs[0].name: rows}
        else:
            raise BundleBuildError(f"baseline {path} must be .npy, .npz or .csv")
    except FileNotFoundError:
        raise BundleBuildError(f"baseline {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BundleBuildError(f"cannot read baseline {path}: {exc}") from None
    return _match_inputs(arrays, inputs), names


def _read_csv(path: Path) -> tuple[list[str], npt.NDArray[np.float64]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError("the CSV has no header of feature names")
        try:
            rows = [[float(v) for v in row] for row in reader if row]
        except ValueError as exc:
            raise ValueError(f"a CSV value is not a number ({exc})") from None
    if any(len(r) != len(header) for r in rows):
        raise ValueError("a CSV row has a different number of values than the header")
    return header, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header))


def _match_inputs(
    arrays: Mapping[str, npt.NDArray[Any]], inputs: Sequence[TensorSpec], what: str = "baseline"
) -> dict[str, npt.NDArray[Any]]:
    """``arrays`` as the model's inputs; ``what`` names the data in errors."""
    expected = {t.name for t in inputs}
    if set(arrays) != expected:
        raise BundleBuildError(
            f"{what} arrays {sorted(arrays)} do not match the model's inputs {sorted(expected)}"
        )
    out: dict[str, npt.NDArray[Any]] = {}
    rows = None
    for spec in inputs:
        array = np.asarray(arrays[spec.name])
        example = list(spec.example_shape)
        if array.ndim == 1 and len(example) == 1:
            array = array.reshape(-1, 1) if example == [1] else array.reshape(1, -1)
        if list(array.shape[1:]) != example:
            raise BundleBuildError(
                f"{what} for input {spec.name!r} has rows of shape {list(array.shape[1:])}, "
                f"the model expects {example}"
            )
        if array.dtype.kind not in "biuf":
            raise BundleBuildError(f"{what} for input {spec.name!r} is not numeric")
        if np.issubdtype(np.dtype(spec.dtype), np.integer) and not np.all(np.isfinite(array)):
            raise BundleBuildError(f"{what} for integer input {spec.name!r} holds NaN")
        rows = array.shape[0] if rows is None else rows
        if array.shape[0] != rows:
            raise BundleBuildError(f"{what} arrays have different numbers of rows")
        out[spec.name] = array.astype(spec.dtype)
    if not rows:
        raise BundleBuildError(f"the {what} holds no rows")
    return out


def build_bundle(
    model: bytes,
    baseline: Mapping[str, npt.NDArray[Any]] | Path,
    spec: BundleSpec,
    baseline_feature_names: Sequence[str] | None = None,
    calibration: Mapping[str, npt.NDArray[Any]] | Path | None = None,
) -> BuiltBundle:
    """Build a bundle for ``model``; raises ``BundleBuildError`` with the reason.

    ``calibration`` is labelled reference data (see :func:`load_labelled`),
    rows the model was not trained on: the builder runs the model on it and
    measures how often it is right per predicted class and top-score bin, which
    is what the server estimates accuracy without labels with (CBPE,
    :mod:`protocol.cbpe`).
    """
    try:
        parse_semver(spec.version)
        counter = spec.release_counter or default_release_counter(spec.version)
    except ValueError as exc:
        raise BundleBuildError(str(exc)) from None
    try:
        loaded = TFLiteRuntime().load(model)
    except ModelLoadError as exc:
        raise BundleBuildError(str(exc)) from None
    inputs, outputs = loaded.inputs, loaded.outputs
    if isinstance(baseline, Path):
        rows_by_input, csv_names = load_baseline(baseline, inputs)
        baseline_feature_names = baseline_feature_names or csv_names
    else:
        rows_by_input = _match_inputs(baseline, inputs)
    try:
        results = loaded.run(rows_by_input)
    except ModelRunError as exc:
        raise BundleBuildError(f"{exc} (on the baseline)") from None

    derivations = [
        InputDerivation(input=t.name, method=choose_method(t.example_shape)) for t in inputs
    ]
    derived = np.concatenate(
        [derive(d.method, rows_by_input[d.input]) for d in derivations], axis=1
    )
    features = _feature_specs(derivations, inputs, derived.shape[1], spec, baseline_feature_names)
    edges = [quantile_edges(derived[:, j]) for j in range(derived.shape[1])]
    summaries = summarize(derived, edges, [(f.valid_min, f.valid_max) for f in features])

    score_output = _probability_output(outputs, results)
    classes = None
    scores = None
    if score_output is not None:
        width = int(np.prod(score_output.example_shape))
        classes = (
            list(spec.classes)
            if spec.classes and len(spec.classes) == width
            else [f"class_{i}" for i in range(width)]
        )
        scores = score_histogram(results[score_output.name].reshape(-1, width), classes)
    elif spec.classes:
        raise BundleBuildError("classes were given but the model has no probability output")
    calibrated = None
    if calibration is not None:
        if score_output is None or classes is None:
            raise BundleBuildError(
                "calibration data was given but the model has no probability output"
            )
        calibrated = _calibrate(loaded, calibration, inputs, score_output, classes, derivations)

    golden_index = np.unique(
        np.linspace(0, derived.shape[0] - 1, min(spec.golden_count, derived.shape[0])).astype(int)
    )
    golden_out = {k: v[golden_index] for k, v in results.items()}
    for name, value in golden_out.items():
        bad = ~np.isfinite(value.reshape(len(golden_index), -1)).all(axis=1)
        if bad.any():
            row = int(golden_index[int(np.argmax(bad))])
            raise BundleBuildError(
                f"the model gives NaN or Inf in output {name!r} for baseline row {row}"
            )
    golden_bytes = pack_golden({k: v[golden_index] for k, v in rows_by_input.items()}, golden_out)

    try:
        manifest = Manifest(
            name=spec.name,
            version=spec.version,
            release_counter=counter,
            hardware_ids=list(spec.hardware_ids),
            min_agent_version=spec.min_agent_version,
            description=spec.description,
            files={MODEL_MEMBER: file_entry(model), GOLDEN_MEMBER: file_entry(golden_bytes)},
            model_file=MODEL_MEMBER,
            inputs=inputs,
            outputs=outputs,
            classes=classes,
            derivations=derivations,
            features=features,
            baseline=Baseline(
                id=edges_id(edges),
                rows=int(derived.shape[0]),
                features=[
                    FeatureBaseline(edges=e, summary=s)
                    for e, s in zip(edges, summaries, strict=True)
                ],
                scores=scores,
                calibration=calibrated,
            ),
            golden=GoldenVectors(file=GOLDEN_MEMBER, count=len(golden_index)),
            fallback=FallbackPolicy(
                safe_default=_safe_default(outputs, results, spec.safe_default),
                confidence_output=score_output.name if score_output else None,
                confidence_threshold=spec.confidence_threshold,
                temperature=spec.temperature,
            ),
            budget=spec.budget,
        )
    except ValueError as exc:
        raise BundleBuildError(_validation_message(exc)) from None
    return BuiltBundle(manifest, {MODEL_MEMBER: model, GOLDEN_MEMBER: golden_bytes})


LABELS_ARRAY = "labels"
_LABELS_ALIASES = (LABELS_ARRAY, "y")


def load_labelled(
    source: Mapping[str, npt.NDArray[Any]] | Path,
    inputs: Sequence[TensorSpec],
    classes: Sequence[str],
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.int64]]:
    """Labelled reference rows: the model's inputs and each row's true class index.

    A ``.npz`` file (or a mapping) with one array per input name and the labels
    in ``labels`` (or ``y``): class indices, or class names. A model with one
    input may have its rows under any other name (``X``).
    """
    try:
        if isinstance(source, Path):
            if source.suffix.lower() != ".npz":
                raise BundleBuildError(f"calibration data {source} must be .npz")
            with np.load(source, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        else:
            arrays = dict(source)
    except FileNotFoundError:
        raise BundleBuildError(f"calibration data {source} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BundleBuildError(f"cannot read calibration data {source}: {exc}") from None
    label_key = next((k for k in _LABELS_ALIASES if k in arrays), None)
    if label_key is None:
        raise BundleBuildError(
            f"calibration data has no labels: name the array {LABELS_ARRAY!r} (or 'y')"
        )
    raw_labels = np.asarray(arrays.pop(label_key))
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    rows = _match_inputs(arrays, inputs, what="calibration data")
    count = next(iter(rows.values())).shape[0]
    if raw_labels.shape != (count,):
        raise BundleBuildError(f"calibration data has {raw_labels.size} labels for {count} rows")
    if raw_labels.dtype.kind in "US":
        names = raw_labels.astype(str).tolist()  # bytes (dtype S) decoded too
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise BundleBuildError(
                f"calibration labels {unknown[:5]} are not classes of the model {list(classes)}"
            )
        labels = np.array([index[name] for name in names], dtype=np.int64)
    elif raw_labels.dtype.kind in "iu":
        labels = raw_labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise BundleBuildError(
                f"calibration labels must be class indices in [0, {len(classes)}) or class names"
            )
    else:
        raise BundleBuildError("calibration labels must be class indices or class names")
    return rows, labels


def _calibrate(
    loaded: LoadedModel,
    source: Mapping[str, npt.NDArray[Any]] | Path,
    inputs: Sequence[TensorSpec],
    score_output: TensorSpec,
    classes: Sequence[str],
    derivations: Sequence[InputDerivation],
) -> Calibration:
    """The calibration on labelled rows, with its misspecification allowance.

    The allowance tilts the rows' summarised features (those devices upload),
    so it is measured along the directions drift is watched in.
    """
    rows, labels = load_labelled(source, inputs, classes)
    if labels.size < MIN_CALIBRATION_ROWS:
        raise BundleBuildError(
            f"calibration data has {labels.size} rows; at least {MIN_CALIBRATION_ROWS} are needed"
        )
    try:
        scores = loaded.run(rows)[score_output.name].reshape(labels.size, len(classes))
    except ModelRunError as exc:
        raise BundleBuildError(f"{exc} (on the calibration data)") from None
    features = np.concatenate([derive(d.method, rows[d.input]) for d in derivations], axis=1)
    return calibrate(scores, labels, classes, features=features)


def _validation_message(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"invalid bundle {where}: {err['msg']}".replace(": Value error, ", ": ")
    return str(exc)


def _feature_specs(
    derivations: Sequence[InputDerivation],
    inputs: Sequence[TensorSpec],
    count: int,
    spec: BundleSpec,
    names: Sequence[str] | None,
) -> list[FeatureSpec]:
    if spec.feature_specs is not None:
        if len(spec.feature_specs) != count:
            raise BundleBuildError(
                f"the feature file describes {len(spec.feature_specs)} features; "
                f"the model's inputs give {count}"
            )
        if names is not None and list(names) != [f.name for f in spec.feature_specs]:
            raise BundleBuildError("the baseline's column names differ from the feature file's")
        return list(spec.feature_specs)
    if names is not None:
        if len(names) != count:
            raise BundleBuildError(f"{len(names)} column names for {count} features")
        return [FeatureSpec(name=n) for n in names]
    by_name = {t.name: t for t in inputs}
    return [
        FeatureSpec(name=n)
        for d in derivations
        for n in derived_names(d.input, d.method, by_name[d.input].example_shape)
    ]


def _probability_output(
    outputs: Sequence[TensorSpec], results: Mapping[str, npt.NDArray[Any]]
) -> TensorSpec | None:
    """The first float output whose rows look like class probabilities."""
    for spec in outputs:
        width = int(np.prod(spec.example_shape)) if spec.example_shape else 1
        if width < 2 or not spec.dtype.startswith("float"):
            continue
        rows = results[spec.name].reshape(-1, width).astype(np.float64)
        rows = rows[np.isfinite(rows).all(axis=1)]
        if (
            rows.size
            and (rows >= -1e-6).all()
            and (rows <= 1 + 1e-6).all()
            and np.allclose(rows.sum(axis=1), 1.0, atol=_PROBABILITY_TOLERANCE)
        ):
            return spec
    return None


def _safe_default(
    outputs: Sequence[TensorSpec],
    results: Mapping[str, npt.NDArray[Any]],
    given: Mapping[str, Sequence[float]] | None,
) -> dict[str, list[float]]:
    """The output served when every stage failed: given, or the baseline's mean output.

    For a classifier the mean output is the class prior of the baseline: an
    answer that claims no more confidence than the data supports.
    """
    out: dict[str, list[float]] = {}
    for spec in outputs:
        size = int(np.prod(spec.example_shape)) if spec.example_shape else 1
        if given is not None:
            if spec.name not in given:
                raise BundleBuildError(f"the safe default gives no value for output {spec.name!r}")
            values = [float(v) for v in given[spec.name]]
            if len(values) != size:
                raise BundleBuildError(
                    f"the safe default for {spec.name!r} has {len(values)} values, expected {size}"
                )
        else:
            rows = results[spec.name].reshape(-1, size).astype(np.float64)
            rows = rows[np.isfinite(rows).all(axis=1)]
            values = [round(float(v), 6) for v in rows.mean(axis=0)] if rows.size else [0.0] * size
        out[spec.name] = values
    if given is not None and set(given) - set(out):
        raise BundleBuildError(
            f"the safe default names unknown outputs {sorted(set(given) - set(out))}"
        )
    return out


def parse_safe_default(text: str) -> dict[str, list[float]]:
    """Parse ``--safe-default`` JSON: ``{"output name": [values...]}``."""
    try:
        data = json.load(io.StringIO(text))
        return {str(k): [float(x) for x in v] for k, v in data.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise BundleBuildError(
            f"the safe default is not valid JSON of output -> values: {exc}"
        ) from None
