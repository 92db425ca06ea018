"""What drift is decided by and what it decides: the policy and one feature's verdicts.

The false-alarm rate is per feature, split over its tests (Bonferroni, in the
shares of :data:`ALPHA_SHARES`): most to the distribution test, whose shifts
are subtle, a tenth to each of the others, which see a dead sensor or a new
category with p-values far below any level. Every test keeps the minimum
sample: rows (values and NaN) for ``missing-values``, values for the others.

The false-alarm rate holds on average over baselines. Every test of a feature
shares the one baseline sample, so a feature whose baseline happened to land
off the population's shares alarms somewhat more often than the rate, and
another less (on the sample data at 1 %: 0 % to about 3 % per feature, 1 %
overall); larger baselines narrow that spread.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

DriftVerdict = Literal["not_enough_data", "no_drift", "drift"]
DriftReason = Literal["distribution", "missing-values", "out-of-range", "new-range"]

DEFAULT_MIN_N: Final = 500
DEFAULT_FALSE_ALARM_RATE: Final = 0.01
# The share of a feature's false-alarm rate each of its tests spends (they sum to 1).
ALPHA_SHARES: Final[dict[DriftReason, float]] = {
    "distribution": 0.7,
    "missing-values": 0.1,
    "out-of-range": 0.1,
    "new-range": 0.1,
}


class DriftPolicy(BaseModel):
    """How drift is decided: the minimum sample, the false-alarm rate, PSI smoothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_n: int = Field(default=DEFAULT_MIN_N, ge=1, description="fewer values: not_enough_data")
    false_alarm_rate: float = Field(
        default=DEFAULT_FALSE_ALARM_RATE,
        gt=0.0,
        lt=0.5,
        description="probability of a drift verdict when nothing drifted, per feature "
        "(split over its tests by ALPHA_SHARES)",
    )
    smoothing: float = Field(default=0.5, gt=0.0, description="pseudo-count per bin for PSI")


class FeatureDrift(BaseModel):
    """The drift statistics and verdict of one feature."""

    model_config = ConfigDict(frozen=True)

    feature: int = Field(ge=0, description="index in manifest order")
    name: str | None = None
    verdict: DriftVerdict
    n: int = Field(description="observed finite values")
    baseline_n: int
    psi: float
    js: float = Field(description="Jensen-Shannon divergence of the bin shares, in bits")
    statistic: float = Field(description="G-test statistic, 2 N JS weighted by sample sizes")
    df: int
    threshold: float = Field(description="chi-square critical value at the false-alarm rate")
    p_value: float
    psi_threshold: float = Field(description="the PSI at which this window would alarm")
    distribution: DriftVerdict = Field(description="the verdict of the test on the bins")
    nan: int = Field(default=0, description="NaN or infinite values observed")
    baseline_nan: int = 0
    missing: DriftVerdict = Field(
        default="not_enough_data", description="is the share of NaN above the baseline's?"
    )
    missing_p_value: float = 1.0
    out_of_range: int = Field(default=0, description="values outside the valid range observed")
    baseline_out_of_range: int = 0
    out_of_range_verdict: DriftVerdict = Field(
        default="not_enough_data", description="is the share out of range above the baseline's?"
    )
    out_of_range_p_value: float = 1.0
    min: float | None = None
    max: float | None = None
    baseline_min: float | None = None
    baseline_max: float | None = None
    below_baseline: int | None = Field(
        default=None, description="values below the baseline's min observed; None: not counted"
    )
    above_baseline: int | None = Field(
        default=None, description="values above the baseline's max observed; None: not counted"
    )
    new_range: DriftVerdict = Field(
        default="not_enough_data", description="are there values beyond the baseline's min/max?"
    )
    new_range_p_value: float = 1.0

    @property
    def verdicts(self) -> dict[DriftReason, DriftVerdict]:
        """Each test's verdict; ``verdict`` is ``drift`` if any says so."""
        return {
            "distribution": self.distribution,
            "missing-values": self.missing,
            "out-of-range": self.out_of_range_verdict,
            "new-range": self.new_range,
        }

    @property
    def reasons(self) -> list[DriftReason]:
        """The tests that found drift."""
        return [r for r, v in self.verdicts.items() if v == "drift"]
