"""Waves over plain data: buckets, stratified cutoffs, stability; pacing; windows."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import numpy as np
import pytest

from fleet_server.rollouts.maintenance import in_window, next_open
from fleet_server.rollouts.pacing import allowed_installs, installs_allowed_by
from fleet_server.rollouts.waves import (
    EVERY_BUCKET,
    DeviceFacts,
    Population,
    WavePlan,
    bucket,
    buckets,
    control,
    fix_cutoffs,
    matches,
    preview,
    reached,
    wave_counts,
    waves,
)
from protocol.api.rollouts import MAX_RATE_PER_MINUTE, parse_selector, parse_window

# 1 %, 10 %, 50 %, 100 % with the default 5 % holdback: the last wave stops at 95 %.
SHARES = (Fraction(1, 100), Fraction(1, 10), Fraction(1, 2), Fraction(19, 20), Fraction(1))
HARDWARE = ("rpi4", "rpi5", "jetson", "imx8", "esp32")
REGIONS = ("eu-west", "us-east", "ap-south", "sa-east")
# The chi-square 0.999 quantile with 99 degrees of freedom.
CHI2_99_AT_0_999 = 148.23


def fleet(n: int, seed: int = 0, prefix: str = "dev") -> list[DeviceFacts]:
    rng = random.Random(seed)
    return [
        DeviceFacts(f"{prefix}-{i:06d}", rng.choice(HARDWARE), rng.choice(REGIONS))
        for i in range(n)
    ]


def wave_by_id(plan: WavePlan, devices: Sequence[DeviceFacts]) -> dict[str, int]:
    population = Population.of("r1", devices)
    return dict(zip(population.ids, waves(plan, population).tolist(), strict=True))


def started(devices: Sequence[DeviceFacts], stage: int, plan: WavePlan | None = None) -> WavePlan:
    population = Population.of("r1", devices)
    plan = plan or WavePlan()
    for k in range(plan.stage + 1, stage + 1):
        plan = fix_cutoffs(plan, population, SHARES, k)
    return plan


# -- buckets -------------------------------------------------------------------


def test_a_bucket_is_fixed_for_the_pair_in_the_unit_interval_and_new_per_rollout() -> None:
    b = bucket("r1", "dev-1")
    assert b == bucket("r1", "dev-1")
    assert 0 <= b < 1
    assert bucket("r2", "dev-1") != b
    # The separator keeps ("r1", "0dev") and ("r10", "dev") apart.
    assert bucket("r1", "0dev") != bucket("r10", "dev")


def test_the_array_form_gives_the_same_buckets() -> None:
    ids = [f"dev-{i}" for i in range(1000)]
    assert buckets("r1", ids).tolist() == [bucket("r1", d) for d in ids]


def test_buckets_are_uniform_over_100k_sequential_ids() -> None:
    values = buckets("rollout-7", [f"dev-{i:06d}" for i in range(100_000)])
    assert values.min() >= 0 and values.max() <= EVERY_BUCKET
    observed = np.bincount((values * 100).astype(int), minlength=100)
    expected = len(values) / 100
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_99_AT_0_999


def test_buckets_of_two_rollouts_are_unrelated() -> None:
    ids = [f"dev-{i:06d}" for i in range(100_000)]
    correlation = np.corrcoef(buckets("r1", ids), buckets("r2", ids))[0, 1]
    assert abs(correlation) < 0.02  # four standard errors at n = 100,000


# -- the selector --------------------------------------------------------------


def test_a_selector_ors_within_a_key_and_ands_across_keys() -> None:
    selector = parse_selector("hardware=rpi4,hardware=rpi5,tag=line-3,region=eu-west")
    yes = DeviceFacts("a", "rpi5", "eu-west", frozenset({"line-3", "cam"}))
    assert matches(selector, yes)
    assert not matches(selector, DeviceFacts("b", "jetson", "eu-west", frozenset({"line-3"})))
    assert not matches(selector, DeviceFacts("c", "rpi4", "us-east", frozenset({"line-3"})))
    assert not matches(selector, DeviceFacts("d", "rpi4", "eu-west", frozenset({"line-4"})))
    assert not matches(selector, DeviceFacts("e", "rpi4", None, frozenset({"line-3"})))


def test_a_key_not_given_does_not_restrict() -> None:
    selector = parse_selector("tag=line-3,tag=line-4")
    assert matches(selector, DeviceFacts("a", "esp32", None, frozenset({"line-4"})))
    assert not matches(selector, DeviceFacts("b", "esp32", None, frozenset()))


# -- stratification --------------------------------------------------------------


def test_each_stratum_is_in_each_wave_in_proportion_within_one_device() -> None:
    devices = fleet(20_000)
    # Small strata too: 7 devices, 3, and one alone.
    devices += [DeviceFacts(f"small-{i}", "rpi4", "af-north") for i in range(7)]
    devices += [DeviceFacts(f"tiny-{i}", "esp32", "af-north") for i in range(3)]
    devices += [DeviceFacts("alone", "jetson", "af-north")]
    plan = started(devices, len(SHARES))
    sizes: dict[tuple[str, str | None], int] = {}
    for d in devices:
        sizes[(d.hardware_id, d.region)] = sizes.get((d.hardware_id, d.region), 0) + 1
    counts = wave_counts(plan, Population.of("r1", devices))
    assert len(counts) == 23
    for stratum, cumulative in counts.items():
        n = sizes[stratum]
        for share, count in zip(SHARES, cumulative, strict=True):
            assert abs(count - share * n) < 1, (stratum, share, count, n)
            assert count == math.ceil(share * n)


def test_a_small_stratum_has_one_device_in_the_first_wave() -> None:
    devices = [DeviceFacts(f"s-{i}", "rpi4", "eu-west") for i in range(7)]
    assert preview("r1", devices, SHARES) == [1, 1, 4, 7, 7]
    assert preview("r1", devices[:1], SHARES) == [1, 1, 1, 1, 1]


def test_the_holdback_is_the_last_share_of_each_stratum_until_released() -> None:
    devices = fleet(10_000)
    population = Population.of("r1", devices)
    plan = started(devices, 4)
    held = control(plan, population)
    counts = wave_counts(started(devices, 5), population)
    assert len(held) == sum(c[-1] - c[-2] for c in counts.values())
    for cumulative in counts.values():
        n = cumulative[-1]
        assert n - cumulative[-2] == math.floor(n / 20)
    # Held back: the highest buckets of each stratum.
    held_ids = set(held)
    for members in population.members:
        ranked = sorted(members.tolist(), key=lambda i: population.bucket[i])
        kept = {population.ids[i] for i in ranked[math.ceil(0.95 * len(ranked)) :]}
        assert kept == held_ids & {population.ids[i] for i in members}
    assert control(started(devices, 5, plan), population) == []


def test_control_and_reached_split_the_selection() -> None:
    devices = fleet(5000)
    population = Population.of("r1", devices)
    plan = started(devices, 2)
    near, far = reached(plan, population), control(plan, population)
    assert set(near).isdisjoint(far)
    assert sorted(near + far) == sorted(d.id for d in devices)
    assert len(near) == sum(c[-1] for c in wave_counts(plan, population).values())
    assert control(WavePlan(), population) == population.ids


# -- stability -------------------------------------------------------------------


def test_the_same_devices_in_any_order_get_the_same_waves() -> None:
    devices = fleet(3000)
    shuffled = list(devices)
    random.Random(5).shuffle(shuffled)
    assert wave_by_id(started(devices, 5), devices) == wave_by_id(started(shuffled, 5), shuffled)


def test_fixing_a_stage_again_changes_nothing() -> None:
    devices = fleet(3000)
    population = Population.of("r1", devices)
    plan = started(devices, 3)
    assert fix_cutoffs(plan, population, SHARES) == plan
    again = fix_cutoffs(plan, Population.of("r1", devices[:100]), SHARES, 2)
    assert again.stage == plan.stage
    for stratum, fixed in plan.strata.items():
        assert again.strata[stratum].cutoffs == fixed.cutoffs
        assert again.strata[stratum].canaries[: len(fixed.canaries)] == fixed.canaries
    with pytest.raises(ValueError, match="stage 6 is not between 0 and 5"):
        fix_cutoffs(plan, population, SHARES, 6)


@pytest.mark.parametrize("seed", range(5))
def test_devices_joining_and_leaving_never_move_a_reached_device(seed: int) -> None:
    rng = random.Random(seed)
    present = fleet(2000, seed=seed)
    plan = WavePlan()
    first_wave: dict[str, int] = {}
    joined = 0
    for stage in range(1, len(SHARES) + 1):
        for _tick in range(3):
            population = Population.of("r1", present)
            plan = fix_cutoffs(plan, population, SHARES, stage)
            for device_id, wave in wave_by_id(plan, present).items():
                if device_id in first_wave:
                    assert wave == first_wave[device_id], (device_id, stage)
                elif wave:
                    first_wave[device_id] = wave
            # Some leave (a reached one among them), others join, some come back.
            gone = rng.sample(present, 100)
            present = [d for d in present if d not in gone]
            present += fleet(150, seed=rng.randrange(10**9), prefix=f"new{joined}")
            present += gone[:30]
            joined += 1
    assert len(first_wave) > 2000


def test_a_device_that_joins_later_is_reached_at_the_current_share() -> None:
    devices = fleet(20_000)
    plan = started(devices, 2)  # 10 %
    newcomers = fleet(20_000, seed=1, prefix="late")
    plan = fix_cutoffs(plan, Population.of("r1", devices + newcomers), SHARES)
    late = wave_by_id(plan, newcomers)
    share = sum(1 for w in late.values() if w) / len(late)
    assert 0.09 < share < 0.11


def test_a_stratum_grown_from_one_device_is_reached_at_its_share_not_its_canarys_bucket() -> None:
    lone = [DeviceFacts("first", "jetson", "af-north")]
    plan = started(lone, 1)
    assert wave_by_id(plan, lone) == {"first": 1}
    grown = [DeviceFacts(f"j-{i}", "jetson", "af-north") for i in range(10_000)]
    plan = fix_cutoffs(plan, Population.of("r1", lone + grown), SHARES)
    assigned = wave_by_id(plan, lone + grown)
    assert assigned["first"] == 1
    assert sum(1 for w in assigned.values() if w) < 200  # about 1 %, never its canary's bucket


def test_a_stratum_whose_canaries_left_gets_another_and_the_old_one_keeps_its_wave() -> None:
    devices = [DeviceFacts(f"s-{i}", "rpi4", "eu-west") for i in range(7)]
    plan = started(devices, 1)
    [canary] = [d for d in devices if wave_by_id(plan, devices)[d.id] == 1]
    rest = [d for d in devices if d is not canary]
    plan = fix_cutoffs(plan, Population.of("r1", rest), SHARES)
    assert sum(1 for w in wave_by_id(plan, rest).values() if w == 1) == 1
    assert wave_by_id(plan, devices)[canary.id] == 1


def test_a_stratum_still_reached_after_its_canary_left_gets_no_other() -> None:
    devices = [DeviceFacts(f"s-{i}", "rpi4", "eu-west") for i in range(100)]
    plan = started(devices, 2)
    [canary] = plan.strata[("rpi4", "eu-west")].canaries
    rest = [d for d in devices if d.id != canary]
    again = fix_cutoffs(plan, Population.of("r1", rest), SHARES)
    assert again == plan


def test_a_stratum_first_seen_mid_rollout_joins_at_the_current_stage() -> None:
    plan = started(fleet(2000), 3)
    newcomers = [DeviceFacts(f"n-{i}", "rpi4", "af-north") for i in range(40)]
    plan = fix_cutoffs(plan, Population.of("r1", newcomers), SHARES)
    counts = wave_counts(plan, Population.of("r1", newcomers))[("rpi4", "af-north")]
    assert counts == [1, 4, 20]


# -- pacing --------------------------------------------------------------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_a_constant_rate_allows_each_minutes_quota_at_its_start() -> None:
    assert [installs_allowed_by(m, 10) for m in (0, 0.5, 1, 2.9)] == [10, 10, 20, 30]
    assert [installs_allowed_by(m, 0.5) for m in (0, 1, 2, 3)] == [1, 1, 2, 2]
    assert installs_allowed_by(-0.1, 10) == 0


def test_the_rate_ramps_by_the_factor_each_minute_up_to_the_ceiling() -> None:
    assert [installs_allowed_by(m, 10, 2) for m in range(4)] == [10, 30, 70, 150]
    # 10 × 2^7 = 1280 passes the ceiling: minutes 0..6 sum to 1270, then 1000 a minute.
    assert installs_allowed_by(7, 10, 2) == 1270 + MAX_RATE_PER_MINUTE
    assert installs_allowed_by(8, 10, 2) == 1270 + 2 * MAX_RATE_PER_MINUTE
    month = installs_allowed_by(30 * 24 * 60, 1, 5)  # no overflow
    assert month > 43_000_000


@pytest.mark.parametrize(("rate", "factor"), [(10, None), (0.2, None), (3, 1.1), (50, 5)])
def test_pacing_is_monotone_in_time_and_in_installs_done(rate: float, factor: float | None) -> None:
    before = -1
    for second in range(0, 4 * 3600, 7):
        now = T0 + timedelta(seconds=second)
        allowed = allowed_installs(now, T0, rate, factor, 0)
        assert allowed >= before
        before = allowed
        assert allowed_installs(now, T0, rate, factor, 5) == max(0, allowed - 5)
    assert allowed_installs(T0 - timedelta(minutes=1), T0, rate, factor, 0) == 0


def test_a_rate_that_would_never_ramp_is_refused() -> None:
    with pytest.raises(ValueError, match="a factor at least 1"):
        installs_allowed_by(5, 10, 0.5)
    with pytest.raises(ValueError, match="a rate must be above 0"):
        installs_allowed_by(5, 0, None)


def test_no_install_is_allowed_beyond_those_done() -> None:
    assert allowed_installs(T0 + timedelta(seconds=30), T0, 10, 2, 10) == 0
    assert allowed_installs(T0 + timedelta(seconds=60), T0, 10, 2, 10) == 20


# -- maintenance windows ---------------------------------------------------------

BERLIN = "Europe/Berlin"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_window_opens_at_its_start_and_closes_at_its_end() -> None:
    window = parse_window("Mon-Fri 02:00-05:00 Europe/Berlin")
    # Tuesday 2026-12-08; Berlin is UTC+1 in winter.
    assert not in_window(window, utc(2026, 12, 8, 0, 59))
    assert in_window(window, utc(2026, 12, 8, 1, 0))
    assert in_window(window, utc(2026, 12, 8, 3, 59))
    assert not in_window(window, utc(2026, 12, 8, 4, 0))
    assert not in_window(window, utc(2026, 12, 12, 2, 0))  # Saturday


def test_a_window_across_midnight_counts_as_the_day_it_opened() -> None:
    window = parse_window("Fri 22:00-06:00 UTC")
    assert in_window(window, utc(2026, 12, 11, 22, 0))  # Friday night
    assert in_window(window, utc(2026, 12, 12, 5, 59))  # Saturday morning
    assert not in_window(window, utc(2026, 12, 12, 6, 0))
    assert not in_window(window, utc(2026, 12, 12, 23, 0))  # Saturday night
    assert not in_window(window, utc(2026, 12, 11, 3, 0))  # Friday morning: Thursday's is closed
    assert next_open(window, utc(2026, 12, 12, 7, 0)) == utc(2026, 12, 18, 22, 0)


def test_a_window_ending_at_its_start_lasts_a_day() -> None:
    whole_monday = parse_window("Mon 00:00-24:00 UTC")
    assert in_window(whole_monday, utc(2026, 12, 7, 0, 0))
    assert in_window(whole_monday, utc(2026, 12, 7, 23, 59))
    assert not in_window(whole_monday, utc(2026, 12, 8, 0, 0))
    assert not in_window(whole_monday, utc(2026, 12, 6, 23, 59))


def test_the_device_reads_the_window_in_its_own_zone() -> None:
    window = parse_window("daily 02:00-03:00 Europe/Berlin")
    at = utc(2026, 12, 8, 7, 30)  # 08:30 in Berlin, 02:30 in New York
    assert not in_window(window, at)
    assert in_window(window, at, "America/New_York")
    assert not in_window(window, at, "Nowhere/Atlantis")  # an unknown zone: the window's
    assert next_open(window, at, "Asia/Tokyo") == utc(2026, 12, 8, 17, 0)


def test_devices_in_tokyo_and_new_york_see_one_window_open_at_different_instants() -> None:
    window = parse_window("Mon-Fri 02:00-04:00 Europe/Berlin")
    # Tuesday 2026-12-08 17:30 UTC: 02:30 Wednesday in Tokyo, 12:30 Tuesday in New York.
    at = utc(2026, 12, 8, 17, 30)
    assert in_window(window, at, "Asia/Tokyo")
    assert not in_window(window, at, "America/New_York")
    assert not in_window(window, at)  # 18:30 in Berlin: the window's own zone is closed
    # Fourteen hours on it is 02:30 in New York and 16:30 in Tokyo.
    later = at + timedelta(hours=14)
    assert in_window(window, later, "America/New_York")
    assert not in_window(window, later, "Asia/Tokyo")
    assert next_open(window, later, "Asia/Tokyo") == utc(2026, 12, 9, 17, 0)
    assert next_open(window, at, "America/New_York") == utc(2026, 12, 9, 7, 0)


def test_on_the_night_the_clocks_skip_an_hour_the_window_opens_when_they_land() -> None:
    # Berlin: 2026-03-29 02:00 CET becomes 03:00 CEST (01:00 UTC).
    window = parse_window("Sun 02:00-05:00 Europe/Berlin")
    assert next_open(window, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 0)
    assert in_window(window, utc(2026, 3, 29, 2, 59))
    assert not in_window(window, utc(2026, 3, 29, 3, 0))  # 05:00 CEST: two hours, not three
    inside_the_gap = parse_window("Sun 02:30-05:00 Europe/Berlin")
    assert next_open(inside_the_gap, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 0)


def test_on_the_night_the_clocks_repeat_an_hour_the_window_opens_in_both() -> None:
    # Berlin: 2026-10-25 03:00 CEST (01:00 UTC) becomes 02:00 CET.
    window = parse_window("Sun 02:00-05:00 Europe/Berlin")
    assert next_open(window, utc(2026, 10, 24, 12, 0)) == utc(2026, 10, 25, 0, 0)
    assert in_window(window, utc(2026, 10, 25, 3, 59))
    assert not in_window(window, utc(2026, 10, 25, 4, 0))  # four hours
    short = parse_window("Sun 02:00-02:30 Europe/Berlin")
    assert next_open(short, utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 1, 0)


@pytest.mark.parametrize(
    ("text", "tz", "start"),
    [
        ("Sun 02:00-05:00 Europe/Berlin", None, utc(2026, 3, 27)),
        ("Sun 02:30-03:30 Europe/Berlin", None, utc(2026, 10, 23)),
        ("daily 23:30-01:15 America/New_York", None, utc(2026, 3, 6)),
        ("Mon,Thu 00:00-24:00 UTC", "Australia/Lord_Howe", utc(2026, 4, 2)),
        ("Sat 01:00-03:00 UTC", "America/Sao_Paulo", utc(2026, 12, 1)),
    ],
)
def test_next_open_is_the_first_open_minute(text: str, tz: str | None, start: datetime) -> None:
    window = parse_window(text)
    for hours in range(0, 8 * 24, 5):
        now = start + timedelta(hours=hours, minutes=17)
        opens = next_open(window, now, tz)
        assert in_window(window, opens, tz)
        minute = now
        while minute < opens:
            assert not in_window(window, minute, tz), (now, minute, opens)
            minute += timedelta(minutes=1)


def test_a_naive_time_is_refused() -> None:
    window = parse_window("daily 02:00-03:00 UTC")
    with pytest.raises(ValueError, match="has no time zone"):
        in_window(window, datetime(2026, 12, 8, 2, 30))
