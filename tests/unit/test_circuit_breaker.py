"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from agent.serving.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, reset_after_s: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold, reset_after_s, clock), clock


def test_a_closed_breaker_lets_every_call_through() -> None:
    breaker, _ = make()
    for _ in range(10):
        assert breaker.allow()
        breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_it_opens_after_threshold_consecutive_failures_and_refuses_calls() -> None:
    breaker, _ = make(threshold=3)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_failures == 3
    assert not breaker.allow()


def test_a_success_resets_the_failure_count() -> None:
    breaker, _ = make(threshold=3)
    for outcome in ["fail", "fail", "ok", "fail", "fail"]:
        assert breaker.allow()
        breaker.record_failure() if outcome == "fail" else breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_after_the_wait_exactly_one_probe_goes_through() -> None:
    breaker, clock = make(reset_after_s=10.0)
    open_breaker(breaker)
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # others wait for the probe's outcome
    assert not breaker.allow()


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker, clock = make()
    open_breaker(breaker)
    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert all(breaker.allow() for _ in range(5))


def test_a_failed_probe_opens_the_breaker_for_another_full_wait() -> None:
    breaker, clock = make(threshold=5, reset_after_s=10.0)
    open_breaker(breaker)
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()  # one failure is enough in half-open
    assert breaker.state is BreakerState.OPEN
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_probe_that_never_reports_is_replaced_after_the_wait() -> None:
    breaker, clock = make(reset_after_s=10.0)
    open_breaker(breaker)
    clock.now += 10
    assert breaker.allow()  # this probe's caller is cancelled and never reports
    clock.now += 5
    assert not breaker.allow()
    clock.now += 5
    assert breaker.allow()


def test_a_late_failure_does_not_extend_the_wait_of_an_open_breaker() -> None:
    breaker, clock = make(threshold=2, reset_after_s=10.0)
    assert breaker.allow() and breaker.allow()  # two calls in flight at once
    breaker.record_failure()
    clock.now += 1
    assert breaker.allow()
    breaker.record_failure()  # opens at t+1
    clock.now += 5
    breaker.record_failure()  # the first call's twin, reporting late
    clock.now += 5
    assert breaker.allow()  # t+11: ten seconds after opening


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, -1.0)])
def test_nonsense_settings_are_refused(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, reset, FakeClock())
