"""The rollout spec: the forms an operator types, parsed, and every bad field refused by name."""

from __future__ import annotations

import json
from datetime import time, timedelta
from fractions import Fraction
from typing import Any

import pytest
from pydantic import ValidationError

from protocol.api.rollouts import (
    RolloutSpec,
    Selector,
    format_duration,
    parse_duration,
    parse_rate,
    parse_selector,
    parse_window,
)

GOOD: dict[str, Any] = {
    "release": "detector@1.4.0",
    "select": "hardware=rpi4,hardware=rpi5,region=eu-west",
    "waves": "1%,10%,50%,100%",
    "bake": "30m",
}


def spec(**changes: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({**GOOD, **changes})


# -- what a good spec holds ----------------------------------------------------


def test_a_spec_holds_the_typed_forms_parsed() -> None:
    s = spec(
        max_bake="6h",
        rate="10/min",
        rate_factor=2,
        window="Mon-Fri 02:00-05:00 Europe/Berlin",
        on_failure="rollback",
        shadow="1h",
        gates={"latency": {"margin": 0.1, "severity": "warn"}},
    )
    assert (s.spec_version, s.name, s.version) == (1, "detector", "1.4.0")
    assert s.select == Selector(hardware=("rpi4", "rpi5"), region=("eu-west",))
    assert s.waves == [1, 10, 50, 100]
    assert (s.bake, s.max_bake, s.shadow) == (
        timedelta(minutes=30),
        timedelta(hours=6),
        timedelta(hours=1),
    )
    assert (s.rate, s.rate_factor) == (10.0, 2.0)
    assert s.window is not None
    assert s.window.weekdays == frozenset(range(5))
    assert (s.window.start, s.window.end, s.window.zone) == (time(2), time(5), "Europe/Berlin")
    assert s.gates is not None and s.gates["latency"].severity == "warn"


def test_defaults_pause_on_failure_hold_back_five_percent_and_bake_at_most_four_times() -> None:
    s = spec()
    assert (s.on_failure, s.holdback, s.rate, s.window, s.shadow, s.gates) == (
        "pause",
        5.0,
        None,
        None,
        None,
        None,
    )
    assert s.bake_limit == timedelta(hours=2)
    assert spec(max_bake="45m").bake_limit == timedelta(minutes=45)


def test_a_spec_written_out_reads_back_the_same_in_the_forms_typed() -> None:
    s = spec(rate="1/s", window="Fri-Mon 22:00-06:00 UTC", shadow="90s", holdback="2.5%")
    written = json.loads(s.model_dump_json())
    assert written["select"] == "hardware=rpi4,hardware=rpi5,region=eu-west"
    assert (written["bake"], written["rate"], written["shadow"]) == ("30m", "60/min", "90s")
    assert written["window"] == "Fri-Mon 22:00-06:00 UTC"
    assert RolloutSpec.model_validate(written) == s
    assert RolloutSpec.model_validate(s.model_dump()) == s


def test_the_schema_documents_the_typed_forms_as_strings() -> None:
    schema = RolloutSpec.model_json_schema()
    props = schema["properties"]
    assert props["select"]["type"] == "string"
    assert props["bake"]["type"] == "string"
    assert props["window"]["anyOf"][0]["type"] == "string"


def test_shares_are_exact_and_stop_below_the_holdback_until_it_is_released() -> None:
    assert spec().shares == (
        Fraction(1, 100),
        Fraction(1, 10),
        Fraction(1, 2),
        Fraction(19, 20),
        Fraction(1),
    )
    assert spec(holdback=0).shares == (
        Fraction(1, 100),
        Fraction(1, 10),
        Fraction(1, 2),
        Fraction(1),
    )
    assert spec(waves=[0.07, 100]).shares[0] == Fraction(7, 10_000)


# -- the selector --------------------------------------------------------------


def test_a_repeated_key_is_an_alternative_and_keys_join() -> None:
    selector = parse_selector(" hardware=rpi4, tag=line-3 ,hardware=rpi5,tag=line-3")
    assert selector == Selector(hardware=("rpi4", "rpi5"), tag=("line-3",))
    assert str(selector) == "hardware=rpi4,hardware=rpi5,tag=line-3"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "the selector is empty"),
        ("hardware=rpi4,", "empty term"),
        ("rpi4", "is not key=value"),
        ("model=kws", "'model' is not a selector key"),
        ("tag=", "tag= has no value"),
        ("hardware=rpi 4", "is not a hardware id"),
        ("tag=a/b", "is not a tag"),
        ("region=eu,west=1", "'west' is not a selector key"),
    ],
)
def test_a_bad_selector_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_selector(text)


def test_a_structured_selector_needs_a_term_too() -> None:
    with pytest.raises(ValidationError, match="at least one of"):
        spec(select={})


# -- durations, rates, windows -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds", "written"),
    [("90s", 90, "90s"), ("30m", 1800, "30m"), ("6h", 21600, "6h"), ("2d", 172800, "2d"),
     ("1.5h", 5400, "90m"), (45, 45, "45s")],
)  # fmt: skip
def test_durations_read_as_typed_and_write_in_the_largest_exact_unit(
    text: str | int, seconds: int, written: str
) -> None:
    value = parse_duration(text)
    assert value == timedelta(seconds=seconds)
    assert format_duration(value) == written


@pytest.mark.parametrize(
    ("text", "per_minute"), [("10/min", 10), ("1/s", 60), ("30/h", 0.5), ("5 / MIN", 5), (12, 12)]
)
def test_rates_read_as_installs_per_minute(text: str | int, per_minute: float) -> None:
    assert parse_rate(text) == per_minute


@pytest.mark.parametrize(
    ("text", "days", "written"),
    [
        ("Mon-Fri 02:00-05:00 Europe/Berlin", {0, 1, 2, 3, 4}, "Mon-Fri 02:00-05:00 Europe/Berlin"),
        ("daily 23:00-24:00 UTC", set(range(7)), "daily 23:00-00:00 UTC"),
        ("Fri-Mon 22:00-06:00 UTC", {4, 5, 6, 0}, None),
        ("Sun,Mon,Wed 01:00-02:00 UTC", {6, 0, 2}, "Wed,Sun-Mon 01:00-02:00 UTC"),
        ("sat,SUN 10:00-12:00 Asia/Tokyo", {5, 6}, "Sat-Sun 10:00-12:00 Asia/Tokyo"),
        ("Mon,Wed-Thu 00:00-01:30 America/New_York", {0, 2, 3}, None),
    ],
)
def test_windows_read_days_ranges_and_wrapping(text: str, days: set[int], written: str) -> None:
    window = parse_window(text)
    assert window.weekdays == frozenset(days)
    assert str(window) == (written or text)
    assert parse_window(str(window)) == window


# -- every bad field is refused by name ----------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("spec_version", 2, "Input should be 1"),
        ("release", "detector", "is not NAME@VERSION"),
        ("release", "Detector@1.0.0", "is not NAME@VERSION"),
        ("release", "detector@1.4", "not a semantic version"),
        ("select", "hw=rpi4", "'hw' is not a selector key"),
        ("select", "hardware=rpi4,region=", "region= has no value"),
        ("select", ",".join(f"tag=t{i}" for i in range(65)), "at most 64 items"),
        ("waves", [1, 10, 5, 100], "waves must rise strictly: 5% comes after 10%"),
        ("waves", [1, 10, 10, 100], "waves must rise strictly"),
        ("waves", [1, 50], "the last wave must be 100%"),
        ("waves", [0, 100], "a wave of 0% is not above 0%"),
        ("waves", [1, 150], "a wave of 150%"),
        ("waves", "1%,x%,100%", "'x%' is not a percentage"),
        ("waves", [], "at least 1 item"),
        ("waves", list(range(1, 101)), "at most 20 items"),
        ("bake", "30", "is not a duration such as"),
        ("bake", "0m", "must be longer than 0"),
        ("bake", "31d", "at most 30d"),
        ("max_bake", "10m", "max_bake 10m is shorter than bake 30m"),
        ("rate", "10/fortnight", "is not a rate such as 10/min"),
        ("rate", "10/m", "is not a rate such as 10/min"),
        ("rate", "0/min", "must be more than 0"),
        ("rate", "5000/min", "at most 1000/min"),
        ("rate_factor", 1.0, "greater than or equal to 1.1"),
        ("rate_factor", 6, "less than or equal to 5"),
        ("window", "Mon-Fri 02:00-05:00", "is not DAYS START-END ZONE"),
        ("window", "Mon-Fri 02:00-05:00 Mars/Olympus", "is not an IANA time zone"),
        ("window", "Mon-Fri 02:00-05:00 ../etc", "is not an IANA time zone"),
        ("window", "Funday 02:00-05:00 UTC", "is not a day"),
        ("window", "Mon 25:00-05:00 UTC", "is not a time of day"),
        ("window", "Mon 02:00 UTC", "is not START-END"),
        ("on_failure", "retry", "'pause' or 'rollback'"),
        ("holdback", 60, "less than or equal to 50"),
        ("holdback", -1, "greater than or equal to 0"),
        ("holdback", "lots", "is not a percentage"),
        ("shadow", "soon", "is not a duration"),
        ("gates", {"Latency P95": {}}, "should match pattern"),
        ("gates", {"latency": {"severity": "maybe"}}, "'stop' or 'warn'"),
        ("gates", {"latency": {"min_devices": 0}}, "greater than or equal to 1"),
        ("gates", {"latency": {"margin": "nan"}}, "finite number"),
        ("gates", {"latency": {"limit": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_refused_naming_it(field: str, value: Any, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(**{field: value})
    [error] = caught.value.errors()
    assert error["loc"][0] == field
    assert says in error["msg"]


def test_a_rate_factor_without_a_rate_is_refused_naming_the_factor() -> None:
    with pytest.raises(ValidationError) as caught:
        spec(rate_factor=2)
    [error] = caught.value.errors()
    assert error["loc"] == ("rate_factor",)
    assert "give a rate too" in error["msg"]


def test_a_holdback_that_would_swallow_a_wave_is_refused_naming_the_holdback() -> None:
    with pytest.raises(ValidationError) as caught:
        spec(waves=[1, 97, 100])
    [error] = caught.value.errors()
    assert error["loc"] == ("holdback",)
    assert "the wave of 97% before the last" in error["msg"]
    assert spec(waves=[1, 97, 100], holdback=2).shares[1] == Fraction(97, 100)


def test_an_unknown_field_is_refused_not_ignored() -> None:
    with pytest.raises(ValidationError) as caught:
        spec(wave=[1, 100])
    assert caught.value.errors()[0]["loc"] == ("wave",)


def test_each_bad_field_of_one_spec_is_named() -> None:
    with pytest.raises(ValidationError) as caught:
        RolloutSpec.model_validate(
            {"release": "x", "select": "y", "waves": [5], "bake": "z", "on_failure": "no"}
        )
    named = {error["loc"][0] for error in caught.value.errors()}
    assert named == {"release", "select", "waves", "bake", "on_failure"}
