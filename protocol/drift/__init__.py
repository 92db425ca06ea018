"""Feature drift on the baseline's bins, with decisions that account for sample size.

The distribution test on the bins (:mod:`.bins`), the tests of what the bins
leave out (:mod:`.beyond_bins`), the p-values they read (:mod:`.distributions`),
every test at once (:mod:`.detect`), the policy and verdicts (:mod:`.model`) and
windows merged until there are enough values (:mod:`.windows`).
"""

from protocol.drift.bins import g_statistic, jensen_shannon, psi
from protocol.drift.detect import detect_drift, detect_drift_many, drift_arrays, feature_drift
from protocol.drift.distributions import chi2_quantile, chi2_sf, chi2_sf_many, hypergeom_sf
from protocol.drift.model import ALPHA_SHARES, DriftPolicy, DriftReason, FeatureDrift
from protocol.drift.windows import count_beyond_baseline, merge_until

__all__ = [
    "ALPHA_SHARES",
    "DriftPolicy",
    "DriftReason",
    "FeatureDrift",
    "chi2_quantile",
    "chi2_sf",
    "chi2_sf_many",
    "count_beyond_baseline",
    "detect_drift",
    "detect_drift_many",
    "drift_arrays",
    "feature_drift",
    "g_statistic",
    "hypergeom_sf",
    "jensen_shannon",
    "merge_until",
    "psi",
]
