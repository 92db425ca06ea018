"""The sample models: what they compute, how they fail, and that they rebuild exactly."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tflite

from firmware_images import (
    CLASSES,
    FEATURES,
    MODELS_DIR,
    FieldConditions,
    GraphBuilder,
    build_unresolved_custom_op_model,
    generate,
)
from firmware_images.build import SampleModel, build, train_sample_models

try:
    from tflite_runtime.interpreter import Interpreter
except ImportError:  # LiteRT, tflite-runtime's successor
    from ai_edge_litert.interpreter import Interpreter  # type: ignore[no-redef]

MODEL_NAMES = ("v1", "v2", "v3-bad", "cloud")
RPM = [f.name for f in FEATURES].index("shaft_rpm")


@pytest.fixture(scope="module")
def trained() -> dict[str, SampleModel]:
    return {m.name: m for m in train_sample_models()}


@pytest.fixture(scope="module")
def rebuilt(
    trained: dict[str, SampleModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("rebuilt")
    build(out, models=list(trained.values()))
    yield out


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS_DIR / "heldout.npz") as data:
        return data["X"], data["y"]


@pytest.fixture(scope="module")
def baseline() -> np.ndarray:
    return np.load(MODELS_DIR / "baseline.npy")


def run(model: Path | bytes, X: np.ndarray) -> np.ndarray:
    """Scores of the real runtime for rows ``X``, as one batch."""
    if isinstance(model, Path):
        interpreter = Interpreter(model_path=str(model))
    else:
        interpreter = Interpreter(model_content=model)
    inp = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(inp, list(X.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp, np.ascontiguousarray(X, dtype=np.float32))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def accuracy(name: str, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run(MODELS_DIR / f"{name}.tflite", X).argmax(axis=1) == y))


# -- the committed models against the numpy reference ------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_committed_model_matches_reference_on_a_batch(
    name: str, trained: dict[str, SampleModel], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    X = heldout[0][:300]
    got = run(MODELS_DIR / f"{name}.tflite", X)
    assert got.shape == (300, len(CLASSES))
    np.testing.assert_allclose(got, trained[name].scores(X), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_committed_model_matches_reference_one_row_at_a_time(
    name: str, trained: dict[str, SampleModel], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    interpreter = Interpreter(model_path=str(MODELS_DIR / f"{name}.tflite"))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    X = heldout[0][300:340]
    for row in X:
        interpreter.set_tensor(inp["index"], row[None, :])
        interpreter.invoke()
        np.testing.assert_allclose(
            interpreter.get_tensor(out["index"]),
            trained[name].scores(row[None, :]),
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_takes_resizable_features_and_returns_named_scores(name: str) -> None:
    interpreter = Interpreter(model_path=str(MODELS_DIR / f"{name}.tflite"))
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["name"] == "features"
    assert inp["dtype"] == np.float32
    assert list(inp["shape"]) == [1, len(FEATURES)]
    assert list(inp["shape_signature"]) == [-1, len(FEATURES)]
    assert out["name"] == "scores"
    assert list(out["shape"]) == [1, len(CLASSES)]


# -- accuracy ordering --------------------------------------------------------


def test_v2_is_more_accurate_than_v1_on_heldout(heldout: tuple[np.ndarray, np.ndarray]) -> None:
    v1, v2 = accuracy("v1", *heldout), accuracy("v2", *heldout)
    assert 0.80 <= v1 <= 0.88
    assert v2 >= v1 + 0.02


def test_cloud_is_at_least_as_accurate_as_v2(heldout: tuple[np.ndarray, np.ndarray]) -> None:
    assert accuracy("cloud", *heldout) >= accuracy("v2", *heldout)


# -- v3-bad: fine on the baseline, NaN on idle machines ---------------------


def test_v3_bad_is_finite_and_accurate_on_baseline_like_data(
    baseline: np.ndarray, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    assert np.isfinite(run(MODELS_DIR / "v3-bad.tflite", baseline)).all()
    assert accuracy("v3-bad", *heldout) >= accuracy("v1", *heldout)


def test_v3_bad_gives_nan_on_every_idle_row_and_finite_scores_when_running(
    trained: dict[str, SampleModel],
) -> None:
    X, _ = generate(1500, seed=77, conditions=FieldConditions(idle_share=0.3))
    idle = X[:, RPM] == 0.0
    assert 300 < idle.sum() < 600
    scores = run(MODELS_DIR / "v3-bad.tflite", X)
    assert np.isnan(scores[idle]).all()
    assert np.isfinite(scores[~idle]).all()
    # The reference agrees on where the NaN are, and v2 survives the same rows.
    assert np.array_equal(np.isnan(trained["v3-bad"].scores(X)).any(axis=1), idle)
    assert np.isfinite(run(MODELS_DIR / "v2.tflite", X)).all()


# -- the custom-op model -----------------------------------------------------


def test_model_with_unknown_custom_op_fails_naming_the_op() -> None:
    data = build_unresolved_custom_op_model()
    assert tflite.Model.GetRootAs(data, 0).OperatorCodes(0).CustomCode() == b"EdgefleetMysteryOp"
    with pytest.raises(RuntimeError, match="EdgefleetMysteryOp"):
        interpreter = Interpreter(model_content=data)
        interpreter.allocate_tensors()


# -- the file format ---------------------------------------------------------


def test_written_flatbuffer_follows_tflite_conventions() -> None:
    g = GraphBuilder(description="conventions")
    x = g.add_input("x", (1, 3))
    weights = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5
    h = g.fully_connected(x, weights, np.array([1.0, -1.0]), "fc")
    m = g.mean(
        g.div(h, g.add_constant("two", np.full((1, 2), 2.0, np.float32)), "half"), [1], "avg"
    )
    g.mark_output(g.reshape(g.add(h, g.mul(m, m, "sq"), "sum"), (-1, 2), "y"))
    data = g.to_bytes()

    assert data == g.to_bytes()
    assert data[4:8] == b"TFL3"
    model = tflite.Model.GetRootAs(data, 0)
    assert model.Version() == 3
    assert model.Description() == b"conventions"
    assert model.Buffers(0).DataLength() == 0
    assert data.find(weights.tobytes()) % 16 == 0
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    assert all(c.DeprecatedBuiltinCode() == min(c.BuiltinCode(), 127) for c in codes)
    assert {c.BuiltinCode() for c in codes} == {
        tflite.BuiltinOperator.FULLY_CONNECTED,
        tflite.BuiltinOperator.DIV,
        tflite.BuiltinOperator.MEAN,
        tflite.BuiltinOperator.MUL,
        tflite.BuiltinOperator.ADD,
        tflite.BuiltinOperator.RESHAPE,
    }

    X = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    h_ref = X @ weights.T + np.array([1.0, -1.0])
    m_ref = (h_ref / 2.0).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(run(data, X), h_ref + m_ref**2, rtol=1e-6)


# -- rebuilding ----------------------------------------------------------------


def test_rebuild_is_byte_identical_to_committed_files(rebuilt: Path) -> None:
    committed = sorted(p.name for p in MODELS_DIR.iterdir())
    assert sorted(p.name for p in rebuilt.iterdir()) == committed
    for name in committed:
        assert (rebuilt / name).read_bytes() == (MODELS_DIR / name).read_bytes(), name


def test_baseline_csv_holds_the_same_rows_as_the_npy(baseline: np.ndarray) -> None:
    with open(MODELS_DIR / "baseline.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [f.name for f in FEATURES]
    assert np.array_equal(np.array(rows[1:], dtype=np.float32), baseline)
    assert baseline.dtype == np.float32 and baseline.shape == (5000, len(FEATURES))
    assert (baseline[:, RPM] > 0).all()


def test_features_json_describes_features_and_classes() -> None:
    doc = json.loads((MODELS_DIR / "features.json").read_text())
    assert doc["classes"] == list(CLASSES)
    assert [(f["name"], f["unit"], f["valid_min"], f["valid_max"]) for f in doc["features"]] == [
        (f.name, f.unit, f.valid_min, f.valid_max) for f in FEATURES
    ]


# -- the generator ---------------------------------------------------------------


def test_generate_is_deterministic_and_typed() -> None:
    X1, y1 = generate(500, seed=42)
    X2, y2 = generate(500, seed=np.random.default_rng(42))
    assert X1.dtype == np.float32 and X1.shape == (500, 16)
    assert y1.dtype == np.int64 and y1.shape == (500,)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.array_equal(X1, generate(500, seed=43)[0])


def test_training_distribution_has_no_idle_rows_and_the_training_mix() -> None:
    X, y = generate(20_000, seed=5)
    assert X[:, RPM].min() > 500.0
    np.testing.assert_allclose(np.bincount(y) / len(y), [0.55, 0.15, 0.15, 0.15], atol=0.015)


def test_fault_classes_leave_their_signatures() -> None:
    X, y = generate(20_000, seed=6)
    col = {f.name: j for j, f in enumerate(FEATURES)}

    def mean(cls: str, feature: str) -> float:
        return float(X[y == CLASSES.index(cls), col[feature]].mean())

    for feature in ("band_1x", "vib_rms_x"):
        assert mean("imbalance", feature) > 1.5 * mean("normal", feature)
    for feature in ("kurtosis", "crest_factor", "band_bpfo", "band_hf"):
        assert mean("bearing_wear", feature) > 1.2 * mean("normal", feature)
    for feature in ("bearing_temp_c", "motor_temp_c"):
        assert mean("overheating", feature) > mean("normal", feature) + 5.0
    fast = X[:, RPM] > 3000
    slow = X[:, RPM] < 1500
    normal = y == 0
    assert X[fast & normal, col["vib_rms_x"]].mean() > X[slow & normal, col["vib_rms_x"]].mean()


def test_covariate_shift_moves_the_mean_by_the_requested_sigmas() -> None:
    col = {f.name: j for j, f in enumerate(FEATURES)}
    shift = {"ambient_temp_c": 1.0, "band_1x": 2.0, "motor_current_a": -0.5}
    X0, y0 = generate(20_000, seed=8)
    X1, y1 = generate(20_000, seed=8, conditions=FieldConditions(covariate_shift=shift))
    assert np.array_equal(y0, y1)
    for name, sigmas in shift.items():
        j = col[name]
        moved = (X1[:, j].mean() - X0[:, j].mean()) / X0[:, j].astype(np.float64).std()
        assert moved == pytest.approx(sigmas, abs=0.05), name
    untouched = [j for name, j in col.items() if name not in shift]
    assert np.array_equal(X0[:, untouched], X1[:, untouched])


def test_class_mix_sets_label_frequencies() -> None:
    mix = (0.1, 0.2, 0.3, 0.4)
    _, y = generate(20_000, seed=9, conditions=FieldConditions(class_mix=mix))
    np.testing.assert_allclose(np.bincount(y, minlength=4) / len(y), mix, atol=0.015)


def test_idle_share_gives_rows_with_zero_rpm_and_near_zero_activity() -> None:
    col = {f.name: j for j, f in enumerate(FEATURES)}
    X, _ = generate(8000, seed=10, conditions=FieldConditions(idle_share=0.25))
    idle = X[:, RPM] == 0.0
    assert idle.mean() == pytest.approx(0.25, abs=0.02)
    assert X[idle, col["motor_current_a"]].max() < 0.5
    assert X[idle, col["vib_rms_x"]].max() < 0.2
    assert X[~idle, RPM].min() > 500.0


def test_noise_scale_scales_measurement_noise() -> None:
    col = {f.name: j for j, f in enumerate(FEATURES)}

    def axis_scatter(noise: float) -> float:
        X, _ = generate(5000, seed=11, conditions=FieldConditions(noise_scale=noise))
        # x and y see the same vibration through independent sensor noise.
        return float(np.std(np.log(X[:, col["vib_rms_y"]] / X[:, col["vib_rms_x"]])))

    quiet, normal, loud = axis_scatter(0.0), axis_scatter(1.0), axis_scatter(2.0)
    assert quiet < 0.01 < normal < loud
    assert loud == pytest.approx(2 * normal, rel=0.1)


def test_drifted_field_data_stays_inside_valid_ranges() -> None:
    conditions = FieldConditions(
        covariate_shift={f.name: 3.0 for f in FEATURES}, idle_share=0.2, noise_scale=2.0
    )
    field, _ = generate(5000, seed=12, conditions=conditions)
    lo = np.array([f.valid_min for f in FEATURES], dtype=np.float32)
    hi = np.array([f.valid_max for f in FEATURES], dtype=np.float32)
    assert ((field >= lo) & (field <= hi)).all()
    training, _ = generate(5000, seed=12)
    inside = (training > lo) & (training < hi)
    assert inside.all(), "training data must sit strictly inside the valid ranges"


@pytest.mark.parametrize(
    "bad",
    [
        {"covariate_shift": {"no_such_sensor": 1.0}},
        {"class_mix": (0.5, 0.5)},
        {"class_mix": (0.5, 0.5, 0.5, -0.5)},
        {"idle_share": 1.5},
        {"noise_scale": -1.0},
    ],
)
def test_field_conditions_refuse_nonsense(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FieldConditions(**bad)  # type: ignore[arg-type]
