"""The watchdog over a new model's first requests."""

from __future__ import annotations

from agent.ota.watchdog import Watchdog


def test_a_few_nan_answers_among_many_good_ones_trip_it() -> None:
    w = Watchdog(window=200, max_failures=3)
    verdicts = [w.observe(ok=i % 10 != 0, reason="nan") for i in range(1, 40)]
    tripped = [v for v in verdicts if v]
    assert tripped and tripped[0] == "3 of the new model's first 30 requests failed (3 nan)"


def test_a_high_failure_rate_trips_it_early() -> None:
    w = Watchdog(window=200, max_failures=100, max_failure_rate=0.2, min_requests=10)
    verdicts = [w.observe(ok=i % 2 == 0, reason="error") for i in range(10)]
    assert verdicts[-1] is not None and all(v is None for v in verdicts[:-1])


def test_a_healthy_model_is_never_tripped_and_the_window_closes() -> None:
    w = Watchdog(window=50)
    assert all(w.observe(ok=True) is None for _ in range(60))
    assert w.done and w.seen == 50
    assert w.observe(ok=False) is None, "failures after the window are not the watchdog's"
