"""The cloud endpoint's admission rules: token buckets, quotas before capacity, on a fake clock."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from fleet_server.cloud.admission import (
    NEVER_RETRY_S,
    Quota,
    QuotaBook,
    Refusal,
    TokenBucket,
    queue_full_refusal,
)
from fleet_server.cloud.auth import FAILED_TTL_S, DeviceAuthenticator, basic_credentials
from fleet_server.cloud.batching import join_rows, split_rows
from protocol.signed_bundle import (
    SignedFields,
    SignedFieldsError,
    newest_by_name,
    signed_fields,
)


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(Quota(rate=2.0, burst=3), now=0.0)
    for _ in range(3):
        assert bucket.wait(0.0) == 0.0
        bucket.take()
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.5) == 0.0
    bucket.take()
    assert bucket.wait(0.5) == pytest.approx(0.5)


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(Quota(rate=10.0, burst=2), now=0.0)
    bucket.refill(1000.0)
    assert bucket.tokens == 2


def test_a_clock_that_goes_back_adds_no_tokens() -> None:
    bucket = TokenBucket(Quota(rate=1.0, burst=1), now=10.0)
    bucket.take()
    assert bucket.wait(5.0) == pytest.approx(1.0)
    assert bucket.wait(10.5) == pytest.approx(0.5)


def test_a_quota_of_zero_waits_forever() -> None:
    bucket = TokenBucket(Quota(rate=0.0, burst=0), now=0.0)
    assert math.isinf(bucket.wait(100.0))


def test_a_quota_refuses_negative_or_infinite_numbers() -> None:
    with pytest.raises(ValueError, match="rate"):
        Quota(rate=-1.0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        Quota(rate=1.0, burst=math.inf)


def _book(capacity: float = 100.0, **quotas: Quota) -> QuotaBook:
    return QuotaBook(default=Quota(0.2, 2), capacity=capacity, now=0.0, quotas=quotas)


def test_a_device_beyond_its_quota_is_refused_for_quota_and_others_are_not() -> None:
    book = _book(greedy=Quota(1.0, 2), calm=Quota(1.0, 2))
    assert book.admit("greedy", 0.0) is None
    assert book.admit("greedy", 0.0) is None
    refusal = book.admit("greedy", 0.0)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "quota"
    assert refusal.retry_after_s == pytest.approx(1.0)
    assert "greedy" in refusal.message and "1 requests a second" in refusal.message
    assert book.admit("calm", 0.0) is None


def test_a_device_without_a_plan_gets_the_default_quota() -> None:
    book = _book()
    assert book.quota_of("stranger") == Quota(0.2, 2)
    assert book.admit("stranger", 0.0) is None
    assert book.admit("stranger", 0.0) is None
    refusal = book.admit("stranger", 0.0)
    assert refusal is not None and refusal.reason == "quota"
    assert refusal.retry_after_s == pytest.approx(5.0)
    assert refusal.retry_after_header == "5"


def test_the_capacity_bounds_all_devices_together() -> None:
    quotas = {f"d{i}": Quota(100.0, 100) for i in range(5)}
    book = _book(capacity=30.0, **quotas)  # a burst of a tenth of a second's worth: 3
    admitted = [book.admit(f"d{i}", 0.0) for i in range(5)]
    assert admitted[:3] == [None, None, None]
    assert all(r is not None and r.reason == "capacity" for r in admitted[3:])
    assert book.admit("d4", 1 / 30) is None  # one more token a thirtieth of a second later


def test_the_capacity_admits_at_most_a_tenth_more_in_any_second() -> None:
    # Twenty devices, each with a full bucket of its own, all sending as fast as they may:
    # the endpoint's own bucket holds a tenth of a second's capacity, so no second sees more
    # than 1.1 C admitted, however the devices' bursts line up.
    capacity = 50.0
    book = _book(capacity=capacity, **{f"d{i}": Quota(100.0, 100) for i in range(20)})
    admitted_at = [
        t / 1000 for t in range(3000) for i in range(20) if book.admit(f"d{i}", t / 1000) is None
    ]
    per_second = max(
        sum(1 for a in admitted_at if start / 10 <= a < start / 10 + 1) for start in range(21)
    )
    assert capacity <= per_second <= capacity * 1.1


def test_a_refusal_for_capacity_costs_the_device_no_quota() -> None:
    book = _book(capacity=1.0, a=Quota(1.0, 1), b=Quota(1.0, 1))
    assert book.admit("a", 0.0) is None
    refused = book.admit("b", 0.0)
    assert refused is not None and refused.reason == "capacity"
    # b's own token is still there once capacity has one again.
    assert book.admit("b", 1.0) is None


def test_a_new_reading_keeps_what_devices_spent_and_follows_new_quotas() -> None:
    book = _book(a=Quota(1.0, 5))
    for _ in range(5):
        assert book.admit("a", 0.0) is None
    book.update({"a": Quota(10.0, 5)}, Quota(0.2, 2), 100.0, now=0.0)
    assert book.admit("a", 0.0) is not None  # spent tokens are not given back by a new plan
    assert book.admit("a", 0.1) is None  # but they refill at the new rate
    book.update({}, Quota(0.2, 2), 100.0, now=0.1)  # the plan expired: default quota
    assert book.quota_of("a") == Quota(0.2, 2)


def test_a_capacity_cut_takes_effect_at_once() -> None:
    book = _book(capacity=100.0, a=Quota(1000.0, 1000))
    book.update({"a": Quota(1000.0, 1000)}, Quota(0.2, 2), 20.0, now=0.0)
    assert book.admit("a", 0.0) is None
    assert book.admit("a", 0.0) is None
    refusal = book.admit("a", 0.0)
    assert refusal is not None and refusal.reason == "capacity"
    assert "20 requests a second" in refusal.message


def test_a_refund_gives_back_both_tokens() -> None:
    book = _book(capacity=1.0, a=Quota(1.0, 1))
    assert book.admit("a", 0.0) is None
    book.refund("a")
    assert book.admit("a", 0.0) is None


def test_a_zero_quota_says_to_retry_much_later() -> None:
    book = _book(off=Quota(0.0, 0))
    refusal = book.admit("off", 0.0)
    assert refusal is not None and refusal.retry_after_s == NEVER_RETRY_S


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert Refusal("quota", 0.01, "x").retry_after_header == "1"
    assert Refusal("quota", 2.2, "x").retry_after_header == "3"
    assert queue_full_refusal("m", 7).reason == "capacity"


def test_idle_buckets_are_forgotten_once_full() -> None:
    book = _book(a=Quota(1.0, 1))
    assert book.admit("a", 0.0) is None
    book.forget_idle(0.5)
    assert "a" in book._devices
    book.forget_idle(2.0)
    assert "a" not in book._devices


def test_basic_credentials_are_read_and_garbage_is_none() -> None:
    assert basic_credentials("Basic ZGV2LTE6czNjcjN0OmV4dHJh") == ("dev-1", "s3cr3t:extra")
    assert basic_credentials(None) is None
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials("Basic bm9jb2xvbg==") is None  # "nocolon"


def test_a_batch_is_split_back_into_each_requests_rows() -> None:
    a = {"x": np.array([[1.0], [2.0]])}
    b = {"x": np.array([[3.0]])}
    c = {"x": np.array([[4.0], [5.0], [6.0]])}
    joined = join_rows([a, b, c])
    outputs = {"y": joined["x"] * 10, "z": joined["x"][:, 0]}
    parts = split_rows(outputs, [2, 1, 3])
    assert [p["y"].ravel().tolist() for p in parts] == [[10, 20], [30], [40, 50, 60]]
    assert [p["z"].tolist() for p in parts] == [[1, 2], [3], [4, 5, 6]]


def _signed(name: str, counter: int, *hardware: str, version: str = "1.0.0") -> SignedFields:
    return SignedFields(name, version, counter, hardware)


def test_the_newest_release_for_the_hardware_is_chosen_per_name() -> None:
    bundles = [
        _signed("pump", 1, "cloud"),
        _signed("pump", 3, "rpi4"),
        _signed("pump", 2, "cloud", "rpi4"),
        _signed("fan", 5, "cloud"),
        _signed("fan", 6, "jetson"),
    ]
    chosen = newest_by_name(bundles, "cloud")
    assert chosen == {"pump": bundles[2], "fan": bundles[3]}
    assert newest_by_name(bundles, "esp32") == {}


def test_signed_fields_name_what_a_target_lacks() -> None:
    with pytest.raises(SignedFieldsError, match=r"target t\.bundle lacks"):
        signed_fields("t.bundle", {"name": "x", "version": "1", "release_counter": 1})
    with pytest.raises(SignedFieldsError, match="hardware_ids is str"):
        signed_fields(
            "t", {"name": "x", "version": "1", "release_counter": 1, "hardware_ids": "cloud"}
        )
    fields = signed_fields(
        "t", {"name": "x", "version": "1", "release_counter": "4", "hardware_ids": ["cloud"]}
    )
    assert fields == SignedFields("x", "1", 4, ("cloud",))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_checked_credential_is_trusted_for_its_ttl_and_a_failed_one_briefly() -> None:
    clock = _Clock()
    checks: list[tuple[str, str]] = []
    valid = {"dev-1": "right"}

    async def check(device_id: str, password: str) -> bool:
        checks.append((device_id, password))
        return valid.get(device_id) == password

    auth = DeviceAuthenticator(check, ttl_s=60.0, clock=clock)

    async def run() -> None:
        assert await auth.authenticate("dev-1", "right")
        assert await auth.authenticate("dev-1", "right")
        assert not await auth.authenticate("dev-1", "wrong")
        assert not await auth.authenticate("dev-1", "wrong")
        assert len(checks) == 2  # one look-up per credential while cached
        valid["dev-1"] = "rotated"
        clock.now = 59.0
        assert await auth.authenticate("dev-1", "right")  # still within its TTL
        clock.now = 61.0
        assert not await auth.authenticate("dev-1", "right")  # the rotation is seen
        assert len(checks) == 3
        assert await auth.authenticate("dev-1", "rotated")
        clock.now = 61.0 + FAILED_TTL_S - 0.1
        assert not await auth.authenticate("dev-1", "right")  # a failure is cached briefly
        assert len(checks) == 4
        clock.now = 61.0 + FAILED_TTL_S + 0.1
        assert not await auth.authenticate("dev-1", "right")
        assert len(checks) == 5

    asyncio.run(run())
