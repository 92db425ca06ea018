"""Windows made ready for the tests: counts their range proves, merged until there are enough."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar, cast

from protocol.drift.model import DEFAULT_MIN_N
from protocol.manifest import Baseline
from protocol.window import WindowAggregate, WindowSummary, merge_windows

_Observed = TypeVar("_Observed", bound=WindowSummary | WindowAggregate)


def count_beyond_baseline(baseline: Baseline, observed: _Observed) -> _Observed:
    """``observed`` with the counts beyond ``baseline``'s range that its own range proves.

    A feature that did not count the values below the baseline's min (above
    its max) but whose ``min`` (``max``) lies inside the baseline's has none
    there: its count is 0. Call it on each window before merging, so that a
    window that left the counts out (it had nothing beyond the range, or an
    older device wrote it) does not leave its aggregate without them. Other
    counts, and a window over another baseline, are returned as they are.
    """
    if observed.baseline_id != baseline.id or len(observed.features) != len(baseline.features):
        return observed
    features = list(observed.features)
    for j, (f, b) in enumerate(zip(features, baseline.features, strict=True)):
        below, above = f.below_baseline, f.above_baseline
        low, high = b.summary.min, b.summary.max
        if below is None and (f.min is None or low is None or f.min >= low):
            below = 0
        if above is None and (f.max is None or high is None or f.max <= high):
            above = 0
        if (below, above) != (f.below_baseline, f.above_baseline):
            features[j] = f.model_copy(update={"below_baseline": below, "above_baseline": above})
    if features == observed.features:
        return observed
    # model_copy keeps the type; mypy sees only the TypeVar's bound.
    return cast(_Observed, observed.model_copy(update={"features": features}))


def merge_until(
    windows: Iterable[WindowSummary | WindowAggregate],
    min_n: int = DEFAULT_MIN_N,
    pending: WindowAggregate | None = None,
    max_windows: int | None = None,
    baseline: Baseline | None = None,
) -> tuple[list[WindowAggregate], WindowAggregate | None]:
    """Merge consecutive windows into groups in which every feature has ``min_n`` values.

    Returns the completed groups and the group still short of ``min_n``; pass
    that back as ``pending`` with the next windows. A group also closes after
    ``max_windows`` windows, so a feature that is mostly NaN cannot hold the
    others back (its verdict is then ``not_enough_data``). With ``baseline``,
    each window first gets the counts beyond its range that its range proves
    (:func:`count_beyond_baseline`).
    """
    done: list[WindowAggregate] = []
    current = pending
    for w in windows:
        if baseline is not None:
            w = count_beyond_baseline(baseline, w)
        current = merge_windows([current, w]) if current is not None else merge_windows([w])
        full = all(f.n >= min_n for f in current.features)
        if full or (max_windows is not None and current.windows >= max_windows):
            done.append(current)
            current = None
    return done, current
