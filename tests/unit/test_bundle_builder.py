"""Building bundles: the contract comes from the model, the baseline from the data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from firmware_images.tflite_writer import (
    GraphBuilder,
    build_image_model,
    build_unresolved_custom_op_model,
)
from fleet_server.release.bundle_builder import (
    BundleBuildError,
    BundleSpec,
    build_bundle,
    load_feature_file,
)
from model_runtime import TFLiteRuntime
from protocol.bundle import read_bundle
from protocol.cbpe import DEFAULT_ALLOWANCE, calibrate, estimate_accuracy
from protocol.derivation import derive_features
from protocol.golden import unpack_golden
from protocol.manifest import Manifest
from protocol.summary import summarize
from testbed.images import MODELS


def spec(**kw: object) -> BundleSpec:
    fields: dict[str, object] = {
        "name": "pump-health",
        "version": "1.0.0",
        "hardware_ids": ["rpi4-arm64"],
    }
    fields.update(kw)
    return BundleSpec(**fields)  # type: ignore[arg-type]


def test_sample_model_bundle_carries_contract_baseline_and_golden_vectors() -> None:
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        (MODELS / "v2.tflite").read_bytes(),
        MODELS / "baseline.npy",
        spec(feature_specs=features, classes=classes),
    )
    m = built.manifest
    baseline = np.load(MODELS / "baseline.npy")
    assert [t.name for t in m.inputs] == ["features"]
    assert m.inputs[0].shape_signature == [-1, baseline.shape[1]]
    assert m.classes == classes and m.fallback.confidence_output == m.outputs[0].name
    assert [f.name for f in m.features] == [f.name for f in features]
    assert m.release_counter == 1_000_000_999
    # The baseline summary is exactly the summary of the baseline data in the manifest's bins.
    expected = summarize(
        baseline,
        [f.edges for f in m.baseline.features],
        [(f.valid_min, f.valid_max) for f in features],
    )
    assert [f.summary for f in m.baseline.features] == expected
    assert 15 <= len(m.baseline.features[0].edges) <= 19
    assert m.baseline.scores is not None
    assert sum(map(sum, m.baseline.scores.counts)) == baseline.shape[0]
    # Golden outputs are what the real runtime gives for the golden inputs.
    inputs, outputs = unpack_golden(built.members["golden.npz"])
    rerun = TFLiteRuntime().load(built.members["model.tflite"]).run(inputs)
    np.testing.assert_array_equal(rerun[m.outputs[0].name], outputs[m.outputs[0].name])
    assert m.golden.count == len(inputs["features"]) == 8
    # The safe default of a classifier is the baseline's class prior.
    assert sum(m.fallback.safe_default[m.outputs[0].name]) == pytest.approx(1.0, abs=1e-5)


def test_bundles_are_reproducible(tmp_path: Path) -> None:
    model = (MODELS / "v1.tflite").read_bytes()
    first = build_bundle(model, MODELS / "baseline.npy", spec())
    second = build_bundle(model, MODELS / "baseline.npy", spec())
    first.write(tmp_path / "a.bundle")
    second.write(tmp_path / "b.bundle")
    assert (tmp_path / "a.bundle").read_bytes() == (tmp_path / "b.bundle").read_bytes()


def test_image_model_is_summarised_by_channel_moments(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 1, size=(24, 128, 128, 3)).astype(np.float32)
    images[:, :, :, 0] *= 0.5
    np.save(tmp_path / "images.npy", images)
    built = build_bundle(build_image_model(), tmp_path / "images.npy", spec(name="camera-qa"))
    m = built.manifest
    assert [(t.name, t.shape) for t in m.inputs] == [("image", [1, 128, 128, 3])]
    assert {t.name for t in m.outputs} == {"class_scores", "brightness"}
    assert [d.method for d in m.derivations] == ["channel_moments"]
    assert [f.name for f in m.features] == [
        "image.c0_mean",
        "image.c0_std",
        "image.c1_mean",
        "image.c1_std",
        "image.c2_mean",
        "image.c2_std",
    ]
    assert m.fallback.confidence_output == "class_scores"
    assert m.classes == ["class_0", "class_1", "class_2", "class_3"]
    # The device computes the same derived features from the same images.
    derived = derive_features(m.derivations, {"image": images})
    assert m.baseline.features[0].summary.mean == pytest.approx(derived[:, 0].mean())
    assert m.baseline.features[0].summary.mean == pytest.approx(0.25, abs=0.01)
    with io.BytesIO() as buf:
        from protocol.bundle import write_bundle

        write_bundle(buf, m, built.members)
        assert len(buf.getvalue()) < 2 * 1024 * 1024 + 20_000


def test_csv_baseline_gives_feature_names(tmp_path: Path) -> None:
    csv_path = MODELS / "baseline.csv"
    built = build_bundle((MODELS / "v1.tflite").read_bytes(), csv_path, spec())
    header = csv_path.read_text().splitlines()[0].split(",")
    assert [f.name for f in built.manifest.features] == header


def test_model_with_unresolved_custom_op_is_refused() -> None:
    with pytest.raises(BundleBuildError, match="unresolved custom op: EdgefleetMysteryOp"):
        build_bundle(build_unresolved_custom_op_model(), MODELS / "baseline.npy", spec())


def test_not_a_model_is_refused() -> None:
    with pytest.raises(BundleBuildError, match="cannot run this model"):
        build_bundle(b"definitely not a flatbuffer", MODELS / "baseline.npy", spec())


def test_baseline_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((10, 5), dtype=np.float32))
    with pytest.raises(BundleBuildError, match=r"rows of shape \[5\], the model expects \[16\]"):
        build_bundle((MODELS / "v1.tflite").read_bytes(), tmp_path / "bad.npy", spec())


def test_model_that_gives_nan_on_its_baseline_is_refused(tmp_path: Path) -> None:
    baseline = np.load(MODELS / "baseline.npy")
    features = json.loads((MODELS / "features.json").read_text())["features"]
    rpm = [f["name"] for f in features].index("shaft_rpm")
    baseline[:, rpm] = 0.0  # an idle machine: v3-bad divides by the shaft speed
    np.save(tmp_path / "idle.npy", baseline)
    with pytest.raises(BundleBuildError, match="NaN or Inf"):
        build_bundle((MODELS / "v3-bad.tflite").read_bytes(), tmp_path / "idle.npy", spec())


def test_feature_file_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text(json.dumps({"features": [{"name": "a"}]}))
    features, _ = load_feature_file(tmp_path / "f.json")
    with pytest.raises(BundleBuildError, match="describes 1 features"):
        build_bundle(
            (MODELS / "v1.tflite").read_bytes(),
            MODELS / "baseline.npy",
            spec(feature_specs=features),
        )


def test_bundle_round_trips_through_the_file_format(tmp_path: Path) -> None:
    built = build_bundle((MODELS / "v1.tflite").read_bytes(), MODELS / "baseline.npy", spec())
    built.write(tmp_path / "b.bundle")
    with (tmp_path / "b.bundle").open("rb") as f:
        manifest, members = read_bundle(f)
    assert manifest == built.manifest and members == built.members
    assert not list(tmp_path.glob("*.partial"))


def test_calibration_is_measured_on_the_labelled_rows(tmp_path: Path) -> None:
    features, classes = load_feature_file(MODELS / "features.json")
    built = build_bundle(
        (MODELS / "v2.tflite").read_bytes(),
        MODELS / "baseline.npy",
        spec(feature_specs=features, classes=classes),
        calibration=MODELS / "heldout.npz",
    )
    calibration = built.manifest.baseline.calibration
    assert calibration is not None and calibration.classes == classes
    heldout = np.load(MODELS / "heldout.npz")
    model = TFLiteRuntime().load(built.members["model.tflite"])
    scores = model.run({"features": heldout["X"]})["scores"]
    # The calibration of those rows, and the allowance measured on their features.
    without = calibration.model_copy(update={"allowance": None})
    assert without == calibrate(scores, heldout["y"], classes)
    assert calibration.allowance is not None and 0.0 < calibration.allowance < 0.05
    # The sample model's documented held-out accuracy (firmware_images/models/MODELS.md).
    assert calibration.reference_accuracy == pytest.approx(0.8876, abs=5e-4)
    # It survives the file format, and labels given as class names give the same calibration.
    path = tmp_path / "calibrated.bundle"
    built.write(path)
    with path.open("rb") as f:
        assert read_bundle(f)[0].baseline.calibration == calibration
    names = np.array(classes)[heldout["y"]]
    for labels in (names, names.astype(bytes)):
        again = build_bundle(
            (MODELS / "v2.tflite").read_bytes(),
            MODELS / "baseline.npy",
            spec(feature_specs=features, classes=classes),
            calibration={"X": heldout["X"], "labels": labels},
        )
        assert again.manifest.baseline.calibration == calibration

    # A manifest written before the allowance existed still loads, and its
    # estimates carry the stated default instead.
    older = json.loads(built.manifest.model_dump_json())
    del older["baseline"]["calibration"]["allowance"]
    old = Manifest.model_validate(older).baseline
    assert old.calibration is not None and old.calibration.allowance is None
    assert old.scores is not None
    estimate = estimate_accuracy(old.calibration, old.scores)
    assert (estimate.allowance, estimate.allowance_measured) == (DEFAULT_ALLOWANCE, False)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((300, 16), np.float32)}, "has no labels"),
        (
            {"X": np.zeros((300, 16), np.float32), "y": np.zeros(299, np.int64)},
            "299 labels for 300 rows",
        ),
        (
            {"X": np.zeros((300, 16), np.float32), "y": np.full(300, 4)},
            "class indices in [0, 4)",
        ),
        (
            {"X": np.zeros((300, 16), np.float32), "labels": np.array(["normal", "broken"] * 150)},
            "['broken'] are not classes",
        ),
        ({"X": np.zeros((300, 15), np.float32), "y": np.zeros(300, np.int64)}, "shape [15]"),
        ({"X": np.zeros((50, 16), np.float32), "y": np.zeros(50, np.int64)}, "at least 200"),
        ({"X": np.zeros((300, 16), np.float32), "y": np.zeros(300) + 0.5}, "class indices"),
    ],
)
def test_calibration_data_that_does_not_fit_is_refused(
    arrays: dict[str, np.ndarray], message: str
) -> None:
    features, classes = load_feature_file(MODELS / "features.json")
    with pytest.raises(BundleBuildError, match="calibration") as caught:
        build_bundle(
            (MODELS / "v2.tflite").read_bytes(),
            MODELS / "baseline.npy",
            spec(feature_specs=features, classes=classes),
            calibration=arrays,
        )
    assert message in str(caught.value)


def test_calibration_needs_a_probability_output_and_an_npz(tmp_path: Path) -> None:
    brightness = GraphBuilder("regression")
    x = brightness.add_input("x", [1, 3])
    brightness.mark_output(brightness.fully_connected(x, np.ones((1, 3)), np.zeros(1), "y"))
    rows = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    with pytest.raises(BundleBuildError, match="no probability output"):
        build_bundle(
            brightness.to_bytes(),
            {"x": rows},
            spec(),
            calibration={"x": rows, "y": np.zeros(300, np.int64)},
        )
    with pytest.raises(BundleBuildError, match=r"must be \.npz"):
        build_bundle(
            (MODELS / "v2.tflite").read_bytes(),
            MODELS / "baseline.npy",
            spec(),
            calibration=MODELS / "baseline.npy",
        )
    with pytest.raises(BundleBuildError, match="does not exist"):
        build_bundle(
            (MODELS / "v2.tflite").read_bytes(),
            MODELS / "baseline.npy",
            spec(),
            calibration=tmp_path / "missing.npz",
        )
