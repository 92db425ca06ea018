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

The interval combines three sources: which predictions happen to be right in
this sample (``Σ n p (1 - p)``), the calibration's own estimation error (each
cell's share is a binomial estimate from its labelled rows:
``Σ (n / N)² p (1 - p) / (reference rows + prior)``), and an allowance for how
far the calibration fails to carry over. A model that is even mildly
misspecified (say a logistic model missing an interaction) has cells whose
share of correct predictions depends on where in the input space the rows
come from, so under covariate shift CBPE is biased by a few points; without
the allowance the interval covered the labelled accuracy in only about 12 of
20 shifted sets. The allowance is measured when the bundle is built
(:func:`misspecification_allowance`): the labelled rows are split in halves,
the calibration is fitted on one half, and on the other half its bias is
measured under exponential tilts that move one feature's mean by about one
standard deviation, each feature and direction in turn; the allowance is the
root mean square of those biases beyond their sampling noise. It enters the
interval as a standard deviation. So the interval is for covariate shifts of
about that size (:data:`ASSUMPTION`); it covers the labelled accuracy in at
least 18 of 20 such shifts in tests/unit/test_cbpe.py. A calibration from an
older bundle has no measured allowance and gets :data:`DEFAULT_ALLOWANCE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# numpy is imported by the functions that compute: the manifest reads this module's
# models, and `edge-agent verify` reads the manifest without loading numpy.
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

from protocol.summary import SCORE_BIN_COUNT, ScoreHistogram, score_histogram

# Pseudo-rows at the bin's midpoint score: a sparse cell leans on the model's
# own confidence instead of on one or two reference rows.
DEFAULT_PRIOR_ROWS: Final = 2.0
# For calibrations measured before the allowance was: two points as a standard
# deviation, about what a mildly misspecified model shows under a one-sigma shift.
DEFAULT_ALLOWANCE: Final = 0.02
# How far the held-out tilts move a feature's mean, in its standard deviations.
ALLOWANCE_TILT: Final = 1.0
ALLOWANCE_REPEATS: Final = 5
ASSUMPTION: Final = (
    "the calibration carries over: covariate shift of up to about one standard deviation "
    "in any one feature (allowance measured on the calibration's held-out rows), no concept "
    "drift (a changed relation between inputs and labels is not seen)"
)


class Calibration(BaseModel):
    """How often the model was right, per predicted class and top-score bin, on labelled data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: list[str] = Field(min_length=2)
    total: list[list[int]] = Field(description="reference rows per [predicted class][score bin]")
    correct: list[list[int]] = Field(description="of those, rows whose label was the prediction")
    prior_rows: float = Field(default=DEFAULT_PRIOR_ROWS, ge=0.0)
    allowance: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="standard deviation of CBPE's bias under covariate shift, measured on "
        "held-out splits of the labelled rows (None: measured before this field existed)",
    )

    @property
    def allowance_or_default(self) -> float:
        """The measured allowance, or :data:`DEFAULT_ALLOWANCE` for an older calibration."""
        return DEFAULT_ALLOWANCE if self.allowance is None else self.allowance

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
        import numpy as np

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
    allowance: float = Field(
        default=0.0, description="the misspecification allowance in the interval (a std. dev.)"
    )
    allowance_measured: bool = Field(
        default=True, description="False: the calibration predates it, the default was used"
    )
    assumption: str = ASSUMPTION


def calibrate(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    classes: Sequence[str],
    prior_rows: float = DEFAULT_PRIOR_ROWS,
    features: npt.ArrayLike | None = None,
) -> Calibration:
    """Measure the calibration on labelled reference data.

    ``scores`` are ``[rows, classes]`` probabilities (rows with NaN or Inf are
    skipped, as devices skip them), ``labels`` the true class indices.
    ``features``, the rows' ``[rows, features]`` summarised features, lets it
    measure the misspecification allowance (:func:`misspecification_allowance`);
    without them the calibration has none and estimates use the default.
    """
    import numpy as np

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
    allowance = None
    if features is not None:
        values = np.asarray(features, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] != probs.shape[0]:
            raise ValueError(
                f"features must be [{probs.shape[0]}, features], got shape {values.shape}"
            )
        allowance = misspecification_allowance(
            probs[finite], truth[finite], values[finite], len(classes), prior_rows
        )
    probs, truth = probs[finite], truth[finite]
    right = probs.argmax(axis=1) == truth
    return Calibration(
        classes=list(classes),
        total=score_histogram(probs, classes).counts,
        correct=score_histogram(probs[right], classes).counts,
        prior_rows=prior_rows,
        allowance=allowance,
    )


def _cells(probs: npt.NDArray[np.float64], bins: int) -> npt.NDArray[np.int64]:
    """Each row's calibration cell, flattened: ``predicted class * bins + score bin``."""
    import numpy as np

    k = np.clip((probs.max(axis=1) * bins).astype(np.int64), 0, bins - 1)
    cells: npt.NDArray[np.int64] = probs.argmax(axis=1) * bins + k
    return cells


def misspecification_allowance(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    features: npt.ArrayLike,
    classes: int,
    prior_rows: float = DEFAULT_PRIOR_ROWS,
    tilt: float = ALLOWANCE_TILT,
    repeats: int = ALLOWANCE_REPEATS,
) -> float:
    """How far CBPE is off under covariate shift, from labelled rows alone (see module docs).

    Halves of the rows (``repeats`` random splits, both ways round, a fixed
    seed so a bundle builds the same twice): the calibration of one half
    estimates the accuracy of the other under exponential tilts
    ``exp(± tilt · z_j)`` of each standardised feature ``z_j`` (clipped to ±3),
    and each weighted bias is compared with the weighted labelled accuracy.
    The result is, for the feature where it is largest, the root mean square
    of the biases beyond their sampling noise: a standard deviation for the
    bias under a shift of ``tilt`` standard deviations in any one feature.
    Constant features carry no tilt and are skipped.
    """
    import numpy as np

    probs = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(labels)
    values = np.asarray(features, dtype=np.float64)
    rows = probs.shape[0]
    if rows < 4:
        return 0.0
    bins = SCORE_BIN_COUNT
    cells = _cells(probs, bins)
    right = (probs.argmax(axis=1) == truth).astype(np.float64)
    spread = values.std(axis=0)
    usable = np.isfinite(values).all(axis=0) & (spread > 0)
    if not usable.any():
        return 0.0
    centred = (values[:, usable] - np.median(values[:, usable], axis=0)) / spread[usable]
    z = np.clip(centred, -3.0, 3.0)
    midpoint = (np.arange(bins, dtype=np.float64) + 0.5) / bins
    prior = np.tile(prior_rows * midpoint, classes)
    rng = np.random.default_rng(0)
    excess = []
    for _ in range(repeats):
        order = rng.permutation(rows)
        halves = (order[: rows // 2], order[rows // 2 :])
        for fit, held in (halves, halves[::-1]):
            total = np.bincount(cells[fit], minlength=classes * bins)
            correct = np.bincount(cells[fit], weights=right[fit], minlength=classes * bins)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = (correct + prior) / (total + prior_rows)
            p = np.nan_to_num(share, nan=0.5)[cells[held]]
            gap = (p - right[held])[:, None]
            for sign in (-1.0, 1.0):
                w = np.exp(sign * tilt * z[held])
                w /= w.sum(axis=0)
                bias = (w * gap).sum(axis=0)
                noise = (w * w * gap * gap).sum(axis=0)
                excess.append(np.maximum(bias * bias - noise, 0.0))
    # Per feature, then the worst: the assumption is a shift in any one feature, and an
    # average over many features would dilute a bias that only one of them carries.
    per_feature = np.mean(np.stack(excess), axis=0)
    return float(min(math.sqrt(float(per_feature.max())), 1.0))


def estimate_accuracy(
    calibration: Calibration, observed: ScoreHistogram, confidence: float = 0.95
) -> AccuracyEstimate:
    """Expected accuracy of the predictions counted in ``observed``, with an interval.

    The interval holds under :data:`ASSUMPTION`: sampling, the calibration's
    own error and its misspecification allowance (see the module docs).
    """
    import numpy as np

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
    allowance = calibration.allowance_or_default
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(sampling + reference + allowance**2)
    return AccuracyEstimate(
        accuracy=accuracy,
        low=max(0.0, accuracy - half),
        high=min(1.0, accuracy + half),
        confidence=confidence,
        n=int(n),
        unseen_share=float(counts[total == 0].sum() / n),
        allowance=allowance,
        allowance_measured=calibration.allowance is not None,
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
