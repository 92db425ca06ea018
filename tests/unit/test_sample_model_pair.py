"""The device/cloud pair of sample models: int8 v2, a clearly stronger cloud model, calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from firmware_images import MODELS_DIR, GraphBuilder, generate
from firmware_images.build import CALIBRATION_SEED, N_CALIBRATION
from firmware_images.calibration import (
    expected_calibration_error,
    fit_temperature,
    offload_curve,
)
from firmware_images.tflite_writer import GraphError
from fleet_server.release.bundle_builder import (
    BundleBuildError,
    BundleSpec,
    build_bundle,
    load_feature_file,
)
from model_runtime import TFLiteRuntime
from protocol.bundle import read_bundle
from testbed.images import HARDWARE, make_bundle, temperature

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # LiteRT, tflite-runtime's successor
    from ai_edge_litert.interpreter import Interpreter  # type: ignore[no-redef]


def scores(name: str, X: np.ndarray) -> np.ndarray:
    """The real runtime's scores of sample model ``name`` for rows ``X``."""
    model = TFLiteRuntime().load(MODELS_DIR / f"{name}.tflite")
    return np.asarray(model.run({"features": np.ascontiguousarray(X, dtype=np.float32)})["scores"])


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS_DIR / "heldout.npz") as data:
        return data["X"], data["y"]


@pytest.fixture(scope="module")
def models_json() -> dict[str, dict[str, object]]:
    doc = json.loads((MODELS_DIR / "models.json").read_text())
    models: dict[str, dict[str, object]] = doc["models"]
    return models


def test_v2_is_int8_from_quantize_to_dequantize() -> None:
    interpreter = Interpreter(model_path=str(MODELS_DIR / "v2.tflite"))
    interpreter.allocate_tensors()
    tensors = {d["name"]: d for d in interpreter.get_tensor_details()}
    int8 = {name for name, d in tensors.items() if d["dtype"] == np.int8}
    assert int8 == {
        "standardised/int8",
        "dense_0/int8/weights",
        "dense_0/int8",
        "logits/int8/weights",
        "logits/int8",
    }
    for name in int8:
        scale, _ = tensors[name]["quantization"]
        assert scale > 0, name
    assert tensors["dense_0/int8/bias"]["dtype"] == np.int32
    weights = interpreter.get_tensor(tensors["dense_0/int8/weights"]["index"])
    assert weights.shape == (8, 16) and len(np.unique(weights)) > 20
    # The contract stays float32 features in, float32 scores out.
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert (inp["name"], inp["dtype"], out["name"], out["dtype"]) == (
        "features",
        np.float32,
        "scores",
        np.float32,
    )


def test_v2_is_small_and_cloud_clearly_stronger(
    heldout: tuple[np.ndarray, np.ndarray], models_json: dict[str, dict[str, object]]
) -> None:
    X, y = heldout
    v2 = float((scores("v2", X).argmax(axis=1) == y).mean())
    cloud = float((scores("cloud", X).argmax(axis=1) == y).mean())
    assert cloud >= v2 + 0.05
    assert models_json["v2"]["heldout_accuracy"] == pytest.approx(v2, abs=1e-4)
    assert models_json["cloud"]["heldout_accuracy"] == pytest.approx(cloud, abs=1e-4)
    v2_params = models_json["v2"]["parameters"]
    assert isinstance(v2_params, int) and v2_params < 676  # the float v2 it replaced
    assert (MODELS_DIR / "v2.tflite").stat().st_size < (MODELS_DIR / "cloud.tflite").stat().st_size


def test_escalating_a_fifth_of_v2_rows_recovers_half_the_gap(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    X, y = heldout
    local, cloud = scores("v2", X), scores("cloud", X)
    curve = dict(offload_curve(local, cloud, y, temperature("v2"), [0.0, 0.2, 1.0]))
    gap = curve[1.0] - curve[0.0]
    assert gap >= 0.05
    assert curve[0.2] - curve[0.0] >= gap / 2


@pytest.mark.parametrize("name", ["v1", "v2", "v3-bad", "cloud"])
def test_committed_temperature_is_the_fit_on_the_calibration_rows(
    name: str,
    heldout: tuple[np.ndarray, np.ndarray],
    models_json: dict[str, dict[str, object]],
) -> None:
    X_cal, y_cal = generate(N_CALIBRATION, CALIBRATION_SEED)
    t = fit_temperature(scores(name, X_cal), y_cal)
    assert models_json[name]["temperature"] == t == temperature(name)
    # Fitted elsewhere, it still calibrates the held-out rows at least as well.
    X, y = heldout
    p = scores(name, X)
    assert expected_calibration_error(p, y, t) <= expected_calibration_error(p, y)


def test_fit_temperature_recovers_the_temperature_of_overconfident_scores() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, (20_000, 4))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in true])
    overconfident = np.exp(2.0 * logits)
    overconfident /= overconfident.sum(axis=1, keepdims=True)
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.05)
    assert expected_calibration_error(overconfident, labels, 2.0) < 0.5 * (
        expected_calibration_error(overconfident, labels)
    )
    with pytest.raises(ValueError, match="expected probabilities"):
        fit_temperature(overconfident, labels[:10])


def test_sample_bundles_carry_the_temperature(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "v2", "2.0.0")
    with path.open("rb") as f:
        manifest = read_bundle(f)[0]
    assert manifest.fallback.temperature == temperature("v2")
    assert manifest.fallback.confidence_output == "scores"


def test_bundle_builder_refuses_a_temperature_out_of_range() -> None:
    features, classes = load_feature_file(MODELS_DIR / "features.json")
    with pytest.raises(BundleBuildError, match="temperature"):
        build_bundle(
            (MODELS_DIR / "cloud.tflite").read_bytes(),
            MODELS_DIR / "baseline.npy",
            BundleSpec(
                name="pump-health-cloud",
                version="1.0.0",
                hardware_ids=(HARDWARE,),
                feature_specs=features,
                classes=classes,
                temperature=0.0,
            ),
        )


def test_int8_graph_refuses_float_input_and_bad_scales() -> None:
    g = GraphBuilder()
    x = g.add_input("features", (1, 4))
    with pytest.raises(GraphError, match="dense_0: the input of an int8 dense layer"):
        g.fully_connected_int8(
            x, np.ones((2, 4), np.int8), 0.5, np.zeros(2, np.int32), (1.0, 0), "dense_0"
        )
    with pytest.raises(GraphError, match="'q' needs a positive quantization scale"):
        g.quantize(x, 0.0, 0, "q")
    with pytest.raises(GraphError, match="d: DEQUANTIZE needs an int8 input"):
        g.dequantize(x, "d")
