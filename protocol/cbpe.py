"""Accuracy without labels: confidence-based performance estimation (CBPE).

The idea is NannyML's. On labelled reference data we measure, for every
predicted class ``c`` and top-score bin ``k`` (the bins of
:class:`~protocol.summary.ScoreHistogram`), the share of rows the model got
right: the calibrated probability ``p[c][k]`` that such a prediction is
correct. A device uploads only how many of its predictions fell in each cell,
and the expected accuracy is ``Σ count[c][k] · p[c][k] / Σ count[c][k]``.

What it assumes, and where it is blind:

- **The calibration carries over.** ``P(correct | predicted class, top score)``
  must be the same in the field as on the reference data. Under covariate
  shift — the inputs move, but the relation between an input and its label
  does not — that holds to the extent that the score says all the model knows
  about being right: inputs re-weighted inside one cell can still move the
  cell's share a little. This is the case CBPE is for: when the fleet sees
  more of the hard (or easy) inputs, the estimate follows (within a point on
  the sample models, tests/unit/test_cbpe.py).
- **No concept drift.** If the relation between inputs and labels changes
  (a fault now looks different, sensors are miscalibrated so the same reading
  means something else), the model is as confident as before and CBPE reports
  the old accuracy while the real one falls. CBPE cannot see this; only labels,
  or drift in the inputs (:mod:`protocol.drift`) as a warning, can.
- **Label shift is not covered exactly.** When class frequencies change with
  the inputs' distribution given each class unchanged, ``P(correct | score)``
  changes too; the estimate is then approximate.
- **Reference coverage.** A cell with no reference rows falls back to the
  model's own score (the bin's midpoint); ``unseen_share`` says how much of the
  field data landed in such cells, and a large value means the estimate leans
  on the model's raw confidence.

The interval combines two sources: which predictions happen to be right in
this sample (``Σ n p (1 - p)``) and the calibration's own estimation error
(``Σ (n / N)² p (1 - p) / (reference rows + prior)``). It is the interval for
the accuracy labels would measure on the same rows if the calibration
carried over exactly; it does not cover the bias when it does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.summary import ScoreHistogram, score_histogram

# Pseudo-rows at the bin's midpoint score: a sparse cell leans on the model's
# own confidence instead of on one or two reference rows.
DEFAULT_PRIOR_ROWS: Final = 2.0


class Calibration(BaseModel):
    """How often the model was right, per predicted class and top-score bin, on labelled data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: list[str] = Field(min_length=2)
    total: list[list[int]] = Field(description="reference rows per [predicted class][score bin]")
    correct: list[list[int]] = Field(description="of those, rows whose label was the prediction")
    prior_rows: float = Field(default=DEFAULT_PRIOR_ROWS, ge=0.0)

    @model_validator(mode="after")
    def _is_consistent(self) -> Calibration:
        shape = [len(row) for row in self.total]
        if len(self.total) != len(self.classes) or len(set(shape)) != 1 or not shape[0]:
            raise ValueError("total needs one row per class, all with the same number of bins")
        if [len(row) for row in self.correct] != shape:
            raise ValueError("correct must have the shape of total")
        for t_row, c_row in zip(self.total, self.correct, strict=True):
            if any(not 0 <= c <= t for t, c in zip(t_row, c_row, strict=True)):
                raise ValueError("every cell needs 0 <= correct <= total")
        if self.prior_rows == 0 and any(t == 0 for row in self.total for t in row):
            raise ValueError("a calibration with empty cells needs prior_rows > 0")
        return self

    @property
    def bins(self) -> int:
        """Score bins per class."""
        return len(self.total[0])

    @property
    def reference_rows(self) -> int:
        """How many labelled rows the calibration was measured on."""
        return sum(sum(row) for row in self.total)

    @property
    def reference_accuracy(self) -> float:
        """The model's accuracy on the reference data (0 when it had no rows)."""
        rows = self.reference_rows
        return sum(sum(row) for row in self.correct) / rows if rows else 0.0

    def probabilities(self) -> npt.NDArray[np.float64]:
        """``p[c][k]``: the smoothed share of correct predictions per cell."""
        total = np.asarray(self.total, dtype=np.float64)
        correct = np.asarray(self.correct, dtype=np.float64)
        midpoint = (np.arange(self.bins, dtype=np.float64) + 0.5) / self.bins
        p: npt.NDArray[np.float64] = (correct + self.prior_rows * midpoint) / (
            total + self.prior_rows
        )
        return p


class AccuracyEstimate(BaseModel):
    """Estimated accuracy of some predictions, with its interval."""

    model_config = ConfigDict(frozen=True)

    accuracy: float | None = Field(description="None when there were no predictions")
    low: float | None
    high: float | None
    confidence: float
    n: int = Field(description="predictions the estimate covers")
    unseen_share: float = Field(description="share of predictions in cells without reference rows")


def calibrate(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    classes: Sequence[str],
    prior_rows: float = DEFAULT_PRIOR_ROWS,
) -> Calibration:
    """Measure the calibration on labelled reference data.

    ``scores`` are ``[rows, classes]`` probabilities (rows with NaN or Inf are
    skipped, as devices skip them), ``labels`` the true class indices.
    """
    probs = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"scores must be [rows, {len(classes)}], got shape {probs.shape}")
    if truth.shape != (probs.shape[0],):
        raise ValueError(f"{truth.shape} labels for {probs.shape[0]} rows of scores")
    if not np.issubdtype(truth.dtype, np.integer):
        raise ValueError("labels must be class indices (integers)")
    if truth.size and (truth.min() < 0 or truth.max() >= len(classes)):
        raise ValueError(f"labels must lie in [0, {len(classes)})")
    finite = np.all(np.isfinite(probs), axis=1)
    probs, truth = probs[finite], truth[finite]
    right = probs.argmax(axis=1) == truth
    return Calibration(
        classes=list(classes),
        total=score_histogram(probs, classes).counts,
        correct=score_histogram(probs[right], classes).counts,
        prior_rows=prior_rows,
    )


def estimate_accuracy(
    calibration: Calibration, observed: ScoreHistogram, confidence: float = 0.95
) -> AccuracyEstimate:
    """Expected accuracy of the predictions counted in ``observed``, with an interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if observed.classes != calibration.classes:
        raise ValueError(
            f"the histogram's classes {observed.classes} are not the calibration's "
            f"{calibration.classes}"
        )
    counts = np.asarray(observed.counts, dtype=np.float64)
    if counts.shape != (len(calibration.classes), calibration.bins):
        raise ValueError(
            f"the histogram has {counts.shape} cells, the calibration "
            f"{(len(calibration.classes), calibration.bins)}"
        )
    n = float(counts.sum())
    if n == 0:
        return AccuracyEstimate(
            accuracy=None, low=None, high=None, confidence=confidence, n=0, unseen_share=0.0
        )
    p = calibration.probabilities()
    total = np.asarray(calibration.total, dtype=np.float64)
    accuracy = float((counts * p).sum() / n)
    sampling = float((counts * p * (1 - p)).sum()) / n**2
    reference = float(((counts / n) ** 2 * p * (1 - p) / (total + calibration.prior_rows)).sum())
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(sampling + reference)
    return AccuracyEstimate(
        accuracy=accuracy,
        low=max(0.0, accuracy - half),
        high=min(1.0, accuracy + half),
        confidence=confidence,
        n=int(n),
        unseen_share=float(counts[total == 0].sum() / n),
    )


AccuracyVerdict = Literal["not_enough_data", "below", "uncertain", "within"]


class AccuracyPolicy(BaseModel):
    """When an estimated accuracy is bad enough to alert on.

    The threshold is the model's accuracy on its calibration data minus
    ``max_drop``. ``below``: the whole interval lies under the threshold (the
    drop is real at the interval's confidence); ``within``: the estimate itself
    is at or above it; ``uncertain``: neither. An alert opens on ``below`` and
    closes on ``within``, so an estimate wavering at the threshold neither
    opens nor closes one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_drop: float = Field(default=0.05, gt=0.0, lt=1.0)
    min_n: int = Field(default=200, ge=1, description="fewer predictions: not_enough_data")
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)

    def threshold(self, calibration: Calibration) -> float:
        return max(0.0, calibration.reference_accuracy - self.max_drop)

    def verdict(self, estimate: AccuracyEstimate, threshold: float) -> AccuracyVerdict:
        if estimate.accuracy is None or estimate.n < self.min_n:
            return "not_enough_data"
        assert estimate.high is not None
        if estimate.high < threshold:
            return "below"
        return "within" if estimate.accuracy >= threshold else "uncertain"
