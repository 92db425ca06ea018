"""Feature drift on the baseline's bins, with decisions that account for sample size.

The distribution test on the bins (:mod:`.bins`), the tests of what the bins
leave out (:mod:`.beyond_bins`), the p-values they read (:mod:`.distributions`),
every test at once (:mod:`.detect`), the policy and verdicts (:mod:`.model`) and
windows merged until there are enough values (:mod:`.windows`).
"""
