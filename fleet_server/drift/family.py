"""One scope and model version's false-alarm rate, split over the tests of its features.

A drift alert groups every test of every feature of one scope and model
version (:mod:`fleet_server.drift.lifecycle`), so the rate an operator sees
false alarms at is the whole family's, not one test's. At 1 % per feature,
sixteen features would open an alert about one pass in seven where nothing
drifted. The policy's ``false_alarm_rate`` is therefore the family's, split
(weighted Bonferroni: the levels sum to it, so the family alarms at most at
that rate however many features the model reads):

- evenly over the features (:func:`feature_policy`), and within a feature
  over its tests by :data:`protocol.drift.model.ALPHA_SHARES`: the
  distribution test keeps its share and is decided, as ever, by its statistic
  against the chi-square critical value at that level;
- a tail test that cannot find drift spends nothing (Tarone's rule for
  discrete tests): the missing-values test when neither sample holds a NaN,
  the out-of-range test when neither holds a value outside the valid range
  (each is conditional on that total, and a total of 0 gives a p-value of 1).
  Their shares go to the feature's tail tests that can (:func:`alarm_levels`),
  so a few new values beyond the baseline's range still show where nothing
  else is amiss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from protocol.drift.model import ALPHA_SHARES, DriftPolicy, DriftReason, DriftVerdict, FeatureDrift

_TAILS: Final[tuple[DriftReason, ...]] = ("missing-values", "out-of-range", "new-range")
_FIELDS: Final[dict[DriftReason, tuple[str, str]]] = {  # its verdict's field, its p-value's
    "missing-values": ("missing", "missing_p_value"),
    "out-of-range": ("out_of_range_verdict", "out_of_range_p_value"),
    "new-range": ("new_range", "new_range_p_value"),
}


def feature_policy(policy: DriftPolicy, features: int) -> DriftPolicy:
    """The policy each of ``features`` features is tested at: ``policy``'s false-alarm rate,
    the family's, split evenly over them."""
    if features <= 1:
        return policy
    return policy.model_copy(update={"false_alarm_rate": policy.false_alarm_rate / features})


def _can_find_drift(feature: FeatureDrift, reason: DriftReason) -> bool:
    if reason == "missing-values":
        return feature.nan + feature.baseline_nan > 0
    if reason == "out-of-range":
        return feature.out_of_range + feature.baseline_out_of_range > 0
    return True


def alarm_levels(feature: FeatureDrift, tested: DriftPolicy) -> dict[DriftReason, float]:
    """The level each test of ``feature`` is decided at, under the feature's policy
    ``tested`` (:func:`feature_policy`); they sum to its false-alarm rate."""
    rate = tested.false_alarm_rate
    levels: dict[DriftReason, float] = {"distribution": rate * ALPHA_SHARES["distribution"]}
    able = [r for r in _TAILS if _can_find_drift(feature, r)]
    spare = sum(ALPHA_SHARES[r] for r in _TAILS if r not in able)
    for reason in _TAILS:
        share = ALPHA_SHARES[reason] + spare / len(able) if reason in able else 0.0
        levels[reason] = rate * share
    return levels


def decide_tails(features: Sequence[FeatureDrift], tested: DriftPolicy) -> list[FeatureDrift]:
    """``features`` (tested at ``tested``) with their tail tests decided at
    :func:`alarm_levels`; a test without enough data stays so, and the distribution test as
    it was."""
    decided = []
    for f in features:
        levels = alarm_levels(f, tested)
        update: dict[str, DriftVerdict] = {}
        for reason in _TAILS:
            verdict_field, p_field = _FIELDS[reason]
            if getattr(f, verdict_field) == "not_enough_data":
                continue
            drift = getattr(f, p_field) <= levels[reason]
            update[verdict_field] = "drift" if drift else "no_drift"
        verdicts = [f.distribution, *(update.get(_FIELDS[r][0], f.verdicts[r]) for r in _TAILS)]
        if "drift" in verdicts:
            update["verdict"] = "drift"
        elif all(v == "no_drift" for v in verdicts):
            update["verdict"] = "no_drift"
        else:
            update["verdict"] = "not_enough_data"
        decided.append(f.model_copy(update=update))
    return decided
