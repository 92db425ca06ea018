"""The periods of an accuracy history: as many as asked for, the first window in the first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleet_server.drift.history import periods_for

UNTIL = datetime(2033, 3, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("span_s", [1, 23, 24, 3600, 86_400, 86_401, 7 * 86_400])
@pytest.mark.parametrize("buckets", [1, 24, 60])
def test_a_span_cut_into_buckets_is_that_many_periods(span_s: int, buckets: int) -> None:
    first_end = UNTIL - timedelta(seconds=span_s)
    periods = periods_for(UNTIL - timedelta(days=30), UNTIL, None, buckets, first_end)
    assert periods.index(first_end) <= buckets - 1
    assert periods.index(UNTIL) == 0
    start, end = periods.bounds(periods.index(first_end))
    assert start < first_end <= end


def test_a_given_step_is_kept() -> None:
    periods = periods_for(UNTIL - timedelta(hours=3), UNTIL, 3600, 24, None)
    assert periods.step == timedelta(hours=1)
    assert periods.index(UNTIL - timedelta(minutes=30)) == 0
    assert periods.index(UNTIL - timedelta(hours=1)) == 1
