"""Rollouts: a release that goes out to a selection of devices in waves, gated on the field.

A rollout spec is what ``fleetctl rollout create`` and ``POST /api/v1/rollouts``
send. Its fields take the forms an operator types — a selector rule
(``hardware=rpi4,region=eu-west``), percentages (``1%,10%,50%,100%``),
durations (``30m``, ``6h``), a rate (``10/min``), a maintenance window
(``Mon-Fri 02:00-05:00 Europe/Berlin``) — and hold them parsed: a
:class:`Selector`, percentages, :class:`~datetime.timedelta`, installs per
minute, a :class:`MaintenanceWindow`. Written out (JSON, ``model_dump``) each
takes its typed form again, so a stored spec reads back as it was given.

Every field is checked on its own and against the fields before it
(``max_bake`` against ``bake``, ``holdback`` against ``waves``), so a bad spec
is refused naming the field that is wrong.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from datetime import datetime, time, timedelta
from fractions import Fraction
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from protocol.api.base import RequestBody, ResponseBody
from protocol.topics import DEVICE_ID_PATTERN
from protocol.versioning import HARDWARE_ID_PATTERN, NAME_PATTERN, parse_semver

ROLLOUT_SPEC_VERSION: Literal[1] = 1
MAX_WAVES = 20
MAX_SELECTOR_VALUES = 64
MAX_DURATION = timedelta(days=30)
# AWS IoT Jobs' limits: a base rate of at most 1000 things a minute, which is
# also where the exponential ramp stops; an increment factor of 1.1 to 5.
MAX_RATE_PER_MINUTE = 1000.0
MIN_RATE_FACTOR = 1.1
MAX_RATE_FACTOR = 5.0
MAX_HOLDBACK = 50.0
DEFAULT_HOLDBACK = 5.0
# Without --max-bake, an inconclusive wave waits this many bake times before it pauses.
DEFAULT_MAX_BAKE_FACTOR = 4

SelectorKey = Literal["hardware", "tag", "region"]
_SELECTOR_KEYS: tuple[SelectorKey, ...] = ("hardware", "tag", "region")
_REGION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$")
_VALUE_PATTERNS = {
    "hardware": (HARDWARE_ID_PATTERN, "a hardware id such as rpi4"),
    "tag": (DEVICE_ID_PATTERN, "a tag such as line-3 (letters, digits, '.', '_', '-')"),
    "region": (_REGION_PATTERN, "a region such as eu-west"),
}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhd])$")
_RATE_UNITS = {"s": 1 / 60, "sec": 1 / 60, "min": 1.0, "h": 60.0, "hour": 60.0}
_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*/\s*([a-z]+)$")
Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
DAY_NAMES: tuple[Weekday, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_CLOCK = re.compile(r"^([01][0-9]|2[0-4]):([0-5][0-9])$")


class Selector(RequestBody):
    """Which devices a rollout is for: a rule over hardware id, tag and region.

    Several values of one key are alternatives (a device matches one of them);
    the keys together must all match. A key not given does not restrict.
    """

    hardware: tuple[str, ...] = Field(default=(), max_length=MAX_SELECTOR_VALUES)
    tag: tuple[str, ...] = Field(default=(), max_length=MAX_SELECTOR_VALUES)
    region: tuple[str, ...] = Field(default=(), max_length=MAX_SELECTOR_VALUES)

    @model_validator(mode="after")
    def _some_term(self) -> Selector:
        if not (self.hardware or self.tag or self.region):
            raise ValueError(
                "a selector names at least one of hardware=, tag=, region= "
                "(a rollout never selects the whole fleet by omission)"
            )
        for key in _SELECTOR_KEYS:
            pattern, example = _VALUE_PATTERNS[key]
            for value in getattr(self, key):
                if not pattern.match(value):
                    raise ValueError(f"{key}={value!r} is not {example}")
        return self

    def __str__(self) -> str:
        return ",".join(f"{key}={value}" for key in _SELECTOR_KEYS for value in getattr(self, key))


def parse_selector(text: str) -> Selector:
    """``hardware=…,tag=…,region=…`` as a :class:`Selector`; ``ValueError`` saying what is wrong."""
    if not text.strip():
        raise ValueError("the selector is empty; name at least one of hardware=, tag=, region=")
    terms: dict[str, list[str]] = {key: [] for key in _SELECTOR_KEYS}
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise ValueError(f"{text!r} has an empty term; write key=value terms joined by commas")
        key, sep, value = (part.strip() for part in term.partition("="))
        if not sep:
            raise ValueError(f"{term!r} is not key=value, such as hardware=rpi4")
        if key not in terms:
            raise ValueError(f"{key!r} is not a selector key; use hardware, tag or region")
        if not value:
            raise ValueError(f"{key}= has no value")
        if value not in terms[key]:
            terms[key].append(value)
    try:
        return Selector(**{key: tuple(values) for key, values in terms.items()})
    except ValidationError as exc:
        raise ValueError(_reason(exc)) from None


def _selector(value: Any) -> Any:
    return parse_selector(value) if isinstance(value, str) else value


SelectorRule = Annotated[
    Selector,
    BeforeValidator(_selector),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "key=value terms joined by commas; keys hardware, tag, region; "
            "a repeated key is an alternative, different keys must all match",
            "examples": ["hardware=rpi4,hardware=rpi5,region=eu-west"],
        }
    ),
]


def parse_duration(value: Any) -> timedelta:
    """``90s``, ``30m``, ``6h``, ``2d`` or a number of seconds, as a positive ``timedelta``."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration such as 90s, 30m, 6h or 2d")
    if not 0 < seconds <= MAX_DURATION.total_seconds():
        raise ValueError(f"{value!r} must be longer than 0 and at most {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest of ``2d``, ``6h``, ``30m``, ``90s`` that says ``value`` exactly."""
    seconds = value.total_seconds()
    for unit in ("d", "h", "m"):
        count = seconds / _DURATION_UNITS[unit]
        if count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "description": "a number and a unit: s, m, h or d", "examples": ["30m"]}
    ),
]


def parse_rate(value: Any) -> float:
    """``10/min``, ``1/s``, ``30/h`` (or a number: per minute) as installs per minute."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        per_minute = float(value)
    elif (
        isinstance(value, str)
        and (match := _RATE.match(value.strip().lower()))
        and match.group(2) in _RATE_UNITS
    ):
        per_minute = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a rate such as 10/min, 1/s or 30/h")
    if not 0 < per_minute <= MAX_RATE_PER_MINUTE:
        raise ValueError(
            f"{value!r} must be more than 0 and at most {MAX_RATE_PER_MINUTE:g}/min "
            "(installs started a minute)"
        )
    return per_minute


def format_rate(per_minute: float) -> str:
    return f"{per_minute:g}/min"


Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "installs started per s, min or h",
            "examples": ["10/min"],
        }
    ),
]


def _percent(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage such as 10%") from None
    return value


def _percents(value: Any) -> Any:
    items = value.split(",") if isinstance(value, str) else value
    return [_percent(item) for item in items] if isinstance(items, list | tuple) else items


def share(percent: float) -> Fraction:
    """``percent`` as an exact fraction of 1 (``12.5`` → 1/8), free of binary rounding."""
    return Fraction(repr(float(percent))) / 100


class MaintenanceWindow(RequestBody):
    """When installs may start: on ``days``, from ``start`` to ``end`` local time in ``zone``.

    ``days`` are the days a window opens; a window whose ``end`` is not after
    its ``start`` runs past midnight into the next day (``Fri 22:00-06:00``
    holds Saturday 03:00; ``Mon 00:00-24:00`` is all Monday). Times are
    wall-clock times: a device with a time zone of its own (set at its
    registration or enrolment) reads them in it, one without in ``zone``.
    """

    days: tuple[Weekday, ...] = Field(min_length=1, max_length=7)
    start: time
    end: time
    zone: str

    @field_validator("zone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        if not known_zone(zone):
            raise ValueError(
                f"{zone!r} is not an IANA time zone such as Europe/Berlin, America/New_York or UTC"
            )
        return zone

    @property
    def weekdays(self) -> frozenset[int]:
        """The days it opens, Monday 0 to Sunday 6 (as ``datetime.weekday``)."""
        return frozenset(DAY_NAMES.index(day) for day in self.days)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.zone)

    def __str__(self) -> str:
        return f"{_format_days(self.weekdays)} {self.start:%H:%M}-{self.end:%H:%M} {self.zone}"


def known_zone(zone: str) -> bool:
    """Whether ``zone`` names a time zone of the IANA database."""
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def parse_window(text: str) -> MaintenanceWindow:
    """``Mon-Fri 02:00-05:00 Europe/Berlin`` as a :class:`MaintenanceWindow`.

    Days: ``daily``, day names (``Mon``…``Sun``) and ranges (``Mon-Fri``,
    ``Fri-Mon`` wrapping the week) joined by commas. ``24:00`` ends at midnight.
    """
    parts = text.split()
    if len(parts) != 3:
        raise ValueError(
            f"{text!r} is not DAYS START-END ZONE, such as 'Mon-Fri 02:00-05:00 Europe/Berlin'"
        )
    days, span, zone = parts
    start, sep, end = span.partition("-")
    if not sep:
        raise ValueError(f"{span!r} is not START-END in 24-hour time, such as 02:00-05:00")
    try:
        return MaintenanceWindow(
            days=tuple(DAY_NAMES[d] for d in sorted(_parse_days(days))),
            start=_clock(start),
            end=_clock(end),
            zone=zone,
        )
    except ValidationError as exc:
        raise ValueError(_reason(exc)) from None


def _reason(exc: ValidationError) -> str:
    # A part parsed from text is refused with its own reason, under the field that holds the text.
    return str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")


def _clock(text: str) -> time:
    match = _CLOCK.match(text)
    if match is None or (match.group(1) == "24" and match.group(2) != "00"):
        raise ValueError(f"{text!r} is not a time of day such as 02:00 (00:00 to 24:00)")
    hour, minute = int(match.group(1)), int(match.group(2))
    return time(0, 0) if hour == 24 else time(hour, minute)


def _day(text: str) -> int:
    names = [name.lower() for name in DAY_NAMES]
    if text.lower()[:3] not in names or len(text) < 3:
        raise ValueError(f"{text!r} is not a day; use Mon, Tue, Wed, Thu, Fri, Sat or Sun")
    return names.index(text.lower()[:3])


def _parse_days(text: str) -> set[int]:
    if text.lower() == "daily":
        return set(range(7))
    days: set[int] = set()
    for item in text.split(","):
        first, sep, last = item.partition("-")
        if not sep:
            days.add(_day(first))
            continue
        a, b = _day(first), _day(last)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return days


def _format_days(days: Iterable[int]) -> str:
    held = sorted(set(days))
    if len(held) == 7:
        return "daily"
    runs: list[list[int]] = []
    for day in held:
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    if len(runs) > 1 and runs[0][0] == 0 and runs[-1][-1] == 6:  # a run across Sunday night
        runs = [*runs[1:-1], runs[-1] + runs[0]]
    return ",".join(
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs
    )


def _window(value: Any) -> Any:
    return parse_window(value) if isinstance(value, str) else value


WindowRule = Annotated[
    MaintenanceWindow,
    BeforeValidator(_window),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "DAYS START-END ZONE; a window whose end is before its start runs "
            "past midnight",
            "examples": ["Mon-Fri 02:00-05:00 Europe/Berlin"],
        }
    ),
]

GateName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$", max_length=64)]


class GateOverride(RequestBody):
    """What a rollout changes in one gate's defaults; a field not given keeps the default."""

    margin: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="the harm allowed, in the gate's unit"
    )
    severity: Literal["stop", "warn"] | None = None
    min_devices: int | None = Field(default=None, ge=1, le=10_000_000)
    min_requests: int | None = Field(default=None, ge=0, le=2**53)
    allowed_rate: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="install failures only: the rate the current version has, which harm exceeds",
    )
    min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="shadow_agreement only: the least share of shadow answers agreeing with the "
        "ones served; setting it makes the gate a stop unless severity says otherwise",
    )
    allowed_extra: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="fallback rate only: the extra share of requests allowed beside the ratio's "
        "margin (0.001: 0.1 points); harm must exceed both, which decides where the current "
        "version almost never falls back",
    )


class RolloutSpec(RequestBody):
    """A staged rollout of one release, version 1 of the spec.

    Waves are cumulative shares of the devices the selector matches, rising
    to 100 %; each wave bakes at least ``bake`` and at most ``max_bake``
    (default four times ``bake``) before it is promoted or paused. The last
    wave keeps ``holdback`` of the devices on their current version through
    one more bake, so its decision has a control group too.
    """

    spec_version: Literal[1] = ROLLOUT_SPEC_VERSION
    release: str = Field(description="NAME@VERSION of a released bundle", max_length=140)
    select: SelectorRule
    waves: Annotated[
        list[float], BeforeValidator(_percents), Field(min_length=1, max_length=MAX_WAVES)
    ] = Field(description="cumulative percentages of the selected devices, rising to 100")
    bake: Duration
    max_bake: Duration | None = Field(
        default=None, description="after this long an inconclusive wave pauses; default 4 × bake"
    )
    rate: Rate | None = Field(default=None, description="installs started per minute at first")
    rate_factor: float | None = Field(
        default=None,
        ge=MIN_RATE_FACTOR,
        le=MAX_RATE_FACTOR,
        description="the rate is multiplied by this each minute (AWS IoT Jobs' increment factor)",
    )
    window: WindowRule | None = None
    on_failure: Literal["pause", "rollback"] = "pause"
    holdback: Annotated[float, BeforeValidator(_percent)] = Field(
        default=DEFAULT_HOLDBACK,
        validate_default=True,
        ge=0,
        le=MAX_HOLDBACK,
        allow_inf_nan=False,
        description="percent of the selected devices kept on their version one bake longer",
    )
    shadow: Duration | None = Field(
        default=None, description="run the release beside the active model this long first"
    )
    gates: dict[GateName, GateOverride] | None = None

    @field_validator("release")
    @classmethod
    def _release(cls, value: str) -> str:
        name, sep, version = value.partition("@")
        if not sep or not NAME_PATTERN.match(name):
            raise ValueError(f"{value!r} is not NAME@VERSION, such as detector@1.4.0")
        try:
            parse_semver(version)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[float]) -> list[float]:
        for wave in waves:
            if not 0 < wave <= 100:  # NaN fails too
                raise ValueError(f"a wave of {wave:g}% is not above 0% and at most 100%")
        for before, after in itertools.pairwise(waves):
            if after <= before:
                raise ValueError(
                    f"waves must rise strictly: {after:g}% comes after {before:g}% "
                    "(each wave is the cumulative share reached)"
                )
        if waves[-1] != 100:
            raise ValueError(f"the last wave must be 100%, not {waves[-1]:g}%")
        return waves

    @field_validator("max_bake")
    @classmethod
    def _max_bake(cls, value: timedelta | None, info: ValidationInfo) -> timedelta | None:
        bake = info.data.get("bake")
        if value is not None and bake is not None and value < bake:
            raise ValueError(
                f"max_bake {format_duration(value)} is shorter than bake {format_duration(bake)}; "
                "a wave bakes at least bake and at most max_bake"
            )
        return value

    @field_validator("rate_factor")
    @classmethod
    def _rate_factor(cls, value: float | None, info: ValidationInfo) -> float | None:
        # A refused rate is missing from info.data; its own error says enough.
        if value is not None and "rate" in info.data and info.data["rate"] is None:
            raise ValueError("rate_factor multiplies a rate; give a rate too, such as 10/min")
        return value

    @field_validator("holdback")
    @classmethod
    def _holdback(cls, value: float, info: ValidationInfo) -> float:
        waves = info.data.get("waves")
        if waves and value > 0:
            reached = 100 - value
            before_last = [w for w in waves[:-1] if w >= reached]
            if before_last:
                raise ValueError(
                    f"a holdback of {value:g}% keeps the waves at or below {reached:g}%, "
                    f"so the wave of {before_last[0]:g}% before the last would be its last; "
                    "lower the holdback or that wave"
                )
        return value

    @property
    def name(self) -> str:
        """The released bundle's name."""
        return self.release.partition("@")[0]

    @property
    def version(self) -> str:
        """The released bundle's version."""
        return self.release.partition("@")[2]

    @property
    def bake_limit(self) -> timedelta:
        """The longest a wave bakes before an inconclusive one pauses."""
        return self.max_bake if self.max_bake is not None else self.bake * DEFAULT_MAX_BAKE_FACTOR

    @property
    def shares(self) -> tuple[Fraction, ...]:
        """The cumulative share reached at each stage, exactly: the waves, then the holdback's.

        The waves stop at ``1 - holdback``; with a holdback, a last stage
        releases it (share 1). Percentages are read as written (``10`` is 1/10).
        """
        cap = 1 - share(self.holdback)
        reached = tuple(min(share(w), cap) for w in self.waves)
        return (*reached, Fraction(1)) if self.holdback > 0 else reached


# -- the REST API's messages ------------------------------------------------------------

ROLLOUT_ID_PATTERN = r"^ro-[0-9a-f]{12}$"
Phase = Literal[
    "pending", "shadow", "baking", "paused", "stopped", "rolling_back", "completed", "aborted"
]


class RolloutAction(RequestBody):
    """An operator's action on a rollout (pause, resume, promote, abort) and why."""

    reason: str | None = Field(default=None, max_length=500)


class StageView(ResponseBody):
    """One stage: the cumulative share it reaches and the devices it reaches now."""

    stage: int
    share: float = Field(description="percent of the selected devices reached by this stage")
    devices: int = Field(description="devices this stage reaches (cumulative); 0 before it starts")
    started: bool


class GateView(ResponseBody):
    """One gate's verdict at the latest tick."""

    gate: str
    severity: Literal["stop", "warn"]
    decision: Literal["fail", "pass", "inconclusive"]
    n_devices: int
    n_control: int
    n_requests: int
    estimate: float | None
    low: float | None
    high: float | None
    margin: float
    harm_at: float
    missing: str | None = None


class GateSettingView(ResponseBody):
    """A gate as a rollout sets it (the defaults with its overrides), before any evidence."""

    gate: str
    severity: Literal["stop", "warn"]
    direction: Literal["higher_is_worse", "lower_is_worse"]
    harm_at: float = Field(description="harm is shown beyond this bound, on the estimate's scale")
    margin: float = Field(description="non-inferiority is shown within this bound")
    min_devices: int
    min_requests: int


class ShadowStageView(ResponseBody):
    """The shadow stage: how long it runs at least, the devices holding the shadow now, and
    the gates that judge it."""

    duration: str
    holding: int = Field(description="devices running the release as a shadow now")
    gates: list[GateSettingView]


class DecisionView(ResponseBody):
    """One step of the controller: the event, the rule that fired and what it did."""

    seq: int
    at: datetime
    event: str
    by: str | None
    from_phase: Phase
    phase: Phase
    stage: int
    rule: str
    action: str
    reason: str | None = None
    warnings: list[str] = Field(default_factory=list)
    matched: int | None = None
    reached: int | None = None


class RolloutView(ResponseBody):
    """A rollout: its spec, where it is, its waves, its gates' latest verdicts, its decisions."""

    id: str
    spec: RolloutSpec
    phase: Phase
    stage: int
    shares: list[float] = Field(description="percent reached by each stage")
    reason: str | None = None
    missing: dict[str, str] = Field(default_factory=dict)
    matched: int = Field(description="devices the selector matches now")
    reached: int = Field(description="devices the rollout has reached")
    assigned: int = Field(description="devices assigned the release by the rollout")
    stages: list[StageView]
    shadow: ShadowStageView | None = Field(
        default=None, description="the shadow stage before wave 1 serves; null without one"
    )
    evaluations: list[GateView] = Field(description="each gate at the latest tick")
    evaluated_at: datetime | None = None
    decisions: list[DecisionView] = Field(description="the latest decisions, oldest first")
    created_by: str
    created_at: datetime
    updated_at: datetime


class RolloutSummary(ResponseBody):
    """A rollout in a list."""

    id: str
    release: str
    select: str
    phase: Phase
    stage: int
    stages: int
    reason: str | None = None
    created_by: str
    created_at: datetime
    updated_at: datetime


class RolloutList(ResponseBody):
    rollouts: list[RolloutSummary]
