"""CBPE: accuracy estimated from score histograms, checked against accuracy measured with labels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from firmware_images.datagen import CLASSES, FEATURES, FieldConditions, generate, tilted
from protocol.cbpe import (
    ASSUMPTION,
    DEFAULT_ALLOWANCE,
    Calibration,
    calibrate,
    estimate_accuracy,
    misspecification_allowance,
)
from protocol.summary import ScoreHistogram, score_histogram

MODELS = Path(__file__).resolve().parents[2] / "firmware_images" / "models"
NAMES = [f.name for f in FEATURES]


def _v2_scores(X: np.ndarray) -> np.ndarray:
    from tflite_runtime.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(MODELS / "v2.tflite"))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(X.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, np.ascontiguousarray(X, dtype=np.float32))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return np.array(out, dtype=np.float64)


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    """v2's calibration on 20,000 labelled rows of the training distribution."""
    X, y = generate(20_000, 41)
    return calibrate(_v2_scores(X), y, CLASSES)


def _shift(X: np.ndarray, tilt: dict[str, float]) -> dict[str, float]:
    """How far each tilted feature's mean moved, in training standard deviations."""
    reference, _ = generate(20_000, 99)
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    return {
        n: float((X[:, NAMES.index(n)].mean() - mean[NAMES.index(n)]) / std[NAMES.index(n)])
        for n in tilt
    }


def test_perfectly_calibrated_scores_give_their_mean_top_score() -> None:
    # Synthetic classifier: the top score is the probability of being right.
    rng = np.random.default_rng(0)
    rows = 50_000
    top = rng.uniform(0.5, 1.0, rows)
    predicted = rng.integers(0, 2, rows)
    scores = np.zeros((rows, 2))
    scores[np.arange(rows), predicted] = top
    scores[np.arange(rows), 1 - predicted] = 1 - top
    right = rng.random(rows) < top
    labels = np.where(right, predicted, 1 - predicted)
    cal = calibrate(scores[:25_000], labels[:25_000], ["a", "b"])
    midpoints = (np.arange(20) + 0.5) / 20
    seen = np.asarray(cal.total) > 500
    assert np.allclose(
        cal.probabilities()[seen], np.broadcast_to(midpoints, (2, 20))[seen], atol=0.03
    )

    estimate = estimate_accuracy(cal, score_histogram(scores[25_000:], ["a", "b"]))
    measured = float(right[25_000:].mean())
    assert estimate.accuracy == pytest.approx(0.75, abs=0.005)
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low <= measured <= estimate.high
    assert estimate.n == 25_000
    assert estimate.unseen_share == 0.0


def test_in_distribution_estimate_matches_labelled_accuracy(calibration: Calibration) -> None:
    X, y = generate(20_000, 42)
    scores = _v2_scores(X)
    measured = float((scores.argmax(axis=1) == y).mean())
    estimate = estimate_accuracy(calibration, score_histogram(scores, CLASSES))
    assert estimate.accuracy == pytest.approx(measured, abs=0.01)
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low <= measured <= estimate.high


@pytest.mark.parametrize(
    "tilt",
    [
        # Quieter, better-mounted machines: the model is less sure, accuracy falls.
        # (Vibration is skewed by how machines are mounted, and bounded by 0: a
        # tilt of -2 moves its mean by about half a standard deviation.)
        {"vib_rms_z": -2.0, "acoustic_db": -1.0},
        # Hotter, more loaded machines.
        {"bearing_temp_c": 1.0, "motor_current_a": 1.0, "shaft_rpm": 1.0},
        # Clear impacts in the signal: accuracy rises.
        {"crest_factor": 1.0, "kurtosis": 1.0},
    ],
)
def test_under_covariate_shift_the_estimate_is_within_three_points(
    calibration: Calibration, tilt: dict[str, float]
) -> None:
    X, y = tilted(tilt, 20_000, seed=43)
    shift = _shift(X, tilt)
    assert all(abs(s) > 0.5 for s in shift.values()), shift
    scores = _v2_scores(X)
    measured = float((scores.argmax(axis=1) == y).mean())
    estimate = estimate_accuracy(calibration, score_histogram(scores, CLASSES))
    assert estimate.accuracy is not None
    assert abs(estimate.accuracy - measured) <= 0.03, (estimate.accuracy, measured)


def test_cbpe_is_blind_to_concept_drift(calibration: Calibration) -> None:
    # datagen's covariate_shift adds to a feature of rows that keep their labels:
    # band_1x now reads high on healthy machines too, so the input-label relation
    # changed. The model stays confident, CBPE reports the old accuracy, and only
    # labels show the collapse — by design, and why input drift is watched too.
    X, y = generate(20_000, 44, FieldConditions(covariate_shift={"band_1x": 1.0}))
    scores = _v2_scores(X)
    measured = float((scores.argmax(axis=1) == y).mean())
    estimate = estimate_accuracy(calibration, score_histogram(scores, CLASSES))
    assert estimate.accuracy is not None
    assert measured < 0.6
    assert estimate.accuracy > 0.85


def test_an_empty_histogram_has_no_estimate(calibration: Calibration) -> None:
    empty = ScoreHistogram(classes=list(CLASSES), counts=[[0] * 20 for _ in CLASSES])
    estimate = estimate_accuracy(calibration, empty)
    assert (estimate.accuracy, estimate.low, estimate.high, estimate.n) == (None, None, None, 0)


def test_cells_without_reference_rows_fall_back_to_the_score_and_are_counted() -> None:
    cal = Calibration(
        classes=["a", "b"],
        total=[[0] * 19 + [100], [0] * 20],
        correct=[[0] * 19 + [99], [0] * 20],
    )
    seen = ScoreHistogram(classes=["a", "b"], counts=[[0] * 19 + [10], [0] * 10 + [10] + [0] * 9])
    estimate = estimate_accuracy(cal, seen)
    assert estimate.unseen_share == pytest.approx(0.5)
    expected = 0.5 * (99 + 2 * 0.975) / 102 + 0.5 * 0.525
    assert estimate.accuracy == pytest.approx(expected)


def test_mismatched_classes_and_bad_labels_are_refused(calibration: Calibration) -> None:
    other = ScoreHistogram(classes=["x", "y", "z", "w"], counts=[[0] * 20 for _ in range(4)])
    with pytest.raises(ValueError, match="classes"):
        estimate_accuracy(calibration, other)
    with pytest.raises(ValueError, match="labels must lie"):
        calibrate(np.full((3, 4), 0.25), np.array([0, 1, 4]), CLASSES)
    with pytest.raises(ValueError, match="correct <= total"):
        Calibration(classes=["a", "b"], total=[[1], [1]], correct=[[2], [0]])


# -- the interval under covariate shift, on a model and data from elsewhere -----------


class _Misspecified:
    """An independent generator: labels from a logistic model with an interaction, and a
    logistic classifier fitted without it (mildly misspecified), in plain numpy."""

    classes = ("negative", "positive")

    def __init__(self, seed: int, interaction: float = 0.9) -> None:
        self.interaction = interaction
        rng = np.random.default_rng(seed)
        X = self.features(rng, 20_000)
        self.weights = self._fit(X, self.labels(rng, X))

    @staticmethod
    def features(
        rng: np.random.Generator, rows: int, shift: np.ndarray | None = None
    ) -> np.ndarray:
        X = np.column_stack(
            [
                rng.normal(0.0, 1.0, rows),
                rng.normal(0.0, 1.0, rows),
                rng.gamma(2.0, 1.0, rows) - 2.0,  # skewed
                rng.uniform(-2.0, 2.0, rows),
                rng.normal(0.0, 1.0, rows),  # irrelevant
            ]
        )
        return X if shift is None else X + shift

    def labels(self, rng: np.random.Generator, X: np.ndarray) -> np.ndarray:
        logit = (
            1.2 * X[:, 0]
            - 0.8 * X[:, 1]
            + 0.6 * X[:, 2]
            + 0.3 * X[:, 3]
            + self.interaction * X[:, 0] * X[:, 1]
        )
        return (rng.random(X.shape[0]) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    @staticmethod
    def _fit(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        A = np.column_stack([np.ones(X.shape[0]), X])
        w = np.zeros(A.shape[1])
        for _ in range(25):  # Newton's method (IRLS) for the logistic likelihood
            p = 1.0 / (1.0 + np.exp(-A @ w))
            hessian = A.T @ (A * (p * (1.0 - p))[:, None]) + 1e-6 * np.eye(A.shape[1])
            w += np.linalg.solve(hessian, A.T @ (y - p))
        return w

    def scores(self, X: np.ndarray) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-(np.column_stack([np.ones(X.shape[0]), X]) @ self.weights)))
        return np.column_stack([1.0 - p, p])


def _shifted_coverage(
    model: _Misspecified, calibration: Calibration, magnitude: float, seed: int
) -> tuple[int, float]:
    """How many of 20 covariate-shifted sets the interval covers, and the largest error."""
    covered, worst = 0, 0.0
    for k in range(20):
        rng = np.random.default_rng(seed * 1000 + k)
        direction = rng.normal(0.0, 1.0, 5)
        X = model.features(rng, 5000, direction / np.linalg.norm(direction) * magnitude)
        y = model.labels(rng, X)
        scores = model.scores(X)
        measured = float((scores.argmax(axis=1) == y).mean())
        estimate = estimate_accuracy(calibration, score_histogram(scores, model.classes))
        assert estimate.accuracy is not None and estimate.low is not None
        assert estimate.high is not None
        covered += estimate.low <= measured <= estimate.high
        worst = max(worst, abs(estimate.accuracy - measured))
    return covered, worst


@pytest.mark.parametrize(
    ("interaction", "magnitude", "seed"),
    # Shifts of 0.8 and 1.0 standard deviations along a random direction. Over
    # seeds 1-6 of each (interaction 0.5, 0.9, 1.5) the interval covered 18 to
    # 20 of 20 sets, 8 to 16 without the allowance.
    [(0.9, 0.8, 1), (0.9, 1.0, 5), (1.5, 0.8, 2), (0.5, 1.0, 2)],
)
def test_the_interval_covers_a_misspecified_model_under_covariate_shift(
    interaction: float, magnitude: float, seed: int
) -> None:
    model = _Misspecified(seed, interaction)
    rng = np.random.default_rng(seed + 500)
    X = model.features(rng, 5000)  # labelled rows at build time, training distribution
    y = model.labels(rng, X)
    scores = model.scores(X)
    calibration = calibrate(scores, y, model.classes, features=X)
    assert calibration.allowance is not None and 0.005 < calibration.allowance < 0.05
    covered, worst = _shifted_coverage(model, calibration, magnitude, seed)
    assert covered >= 18, (covered, worst, calibration.allowance)
    # Without the allowance (the calibration's sampling error alone) it did not.
    bare = calibration.model_copy(update={"allowance": 0.0})
    if interaction >= 0.9:
        assert _shifted_coverage(model, bare, magnitude, seed)[0] < 18


def test_an_older_calibration_without_an_allowance_gets_the_stated_default() -> None:
    cal = Calibration.model_validate(
        {
            "classes": ["a", "b"],
            "total": [[0] * 19 + [100], [0] * 20],
            "correct": [[0] * 19 + [90], [0] * 20],
        }
    )
    assert cal.allowance is None
    seen = ScoreHistogram(classes=["a", "b"], counts=[[0] * 19 + [1000], [0] * 20])
    estimate = estimate_accuracy(cal, seen)
    assert estimate.allowance == DEFAULT_ALLOWANCE and not estimate.allowance_measured
    assert estimate.assumption == ASSUMPTION and "concept drift" in estimate.assumption
    p = (90 + 2 * 0.975) / 102
    sampling, reference = p * (1 - p) / 1000, p * (1 - p) / 102
    half = 1.959964 * math.sqrt(sampling + reference + DEFAULT_ALLOWANCE**2)
    assert estimate.high is not None and estimate.low is not None
    assert estimate.high - estimate.accuracy == pytest.approx(half, rel=1e-5)
    measured = cal.model_copy(update={"allowance": 0.0})
    assert estimate_accuracy(measured, seen).allowance_measured


def test_a_bias_carried_by_one_feature_of_many_is_not_averaged_away() -> None:
    # The model's confidence misses that it is right far more often where x0 is high;
    # eleven other features carry nothing. The allowance is about a shift in any one
    # feature, so adding the eleven must not dilute what x0 shows.
    rng = np.random.default_rng(3)
    rows = 4000
    x = rng.normal(size=(rows, 12))
    scores = np.column_stack([np.full(rows, 0.7), np.full(rows, 0.3)])
    right = rng.random(rows) < 1.0 / (1.0 + np.exp(-2.0 * x[:, 0]))
    labels = np.where(right, 0, 1)
    alone = misspecification_allowance(scores, labels, x[:, :1], classes=2)
    among_many = misspecification_allowance(scores, labels, x, classes=2)
    assert alone > 0.02, alone
    assert among_many >= 0.9 * alone, (among_many, alone)
