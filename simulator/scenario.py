"""A simulation's scenario: the fleet, its traffic, what the operator does, faults, expectations.

A scenario is a TOML file (``fleet-sim run SCENARIO.toml``) read into
:class:`Scenario`; every field has a default, so ``fleet-sim run --devices
1000`` is the scenario of nothing but a fleet of that size. Times are
durations as the rollout spec writes them (``"90s"``, ``"10m"``, ``"1h"``),
measured from the start of the run's traffic (``at``), on the wall clock in a
real-time run and on the simulated clock in a virtual one (``mode =
"virtual"``).

Devices come in cohorts (``[[cohorts]]``): each has a size, a hardware
profile (``[[hardware]]``: inference latency, memory, its link), tags
(``region=eu``), a request rate and drift of its inputs from a time on. Each
``[[steps]]`` entry is what an operator does at a time (release, rollout,
capacity); each ``[[faults]]`` entry a fault over a time span on a target
(every device, a cohort, a share of one, or named devices); ``[expect]`` what
the run must end with besides the checks every run makes.

A scenario can be shortened for CI: ``short`` holds overrides applied over
the file (``fleet-sim run --short``), so one file holds both forms.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from protocol.api.rollouts import Duration, format_duration, parse_duration


def _moment(value: Any) -> timedelta:
    """A duration that may be zero (``"0s"``, ``0``): a moment of the run, from its start."""
    zero = value == 0 or (isinstance(value, str) and value.strip() in {"0", "0s", "0m", "0h"})
    if isinstance(value, bool) or not zero:
        return parse_duration(value)
    return timedelta(0)


Moment = Annotated[
    timedelta,
    BeforeValidator(_moment),
    PlainSerializer(lambda v: format_duration(v) if v else "0s", return_type=str),
]
"""When something happens, from the start of the run's traffic; ``"0s"`` is the start."""

MODELS = ("v1", "v2", "v3-bad")
"""The sample models a scenario can release (``firmware_images/models``)."""

FaultKind = Literal[
    # network, through the fault proxy in front of the broker and the server
    "link-down",  # new connections refused and open ones cut
    "latency",  # latency_ms, jitter_ms added to every chunk each way
    "loss",  # loss: the share of chunks held back as a lost packet would be (a retransmit later)
    "bandwidth",  # kbps each way per connection
    "reconnect-storm",  # every open connection of the target cut at once (at the start only)
    # the device
    "clock-offset",  # offset_s added to the device's clock
    "power-cut",  # at an install step (step), or at a random moment of the span (step absent)
    "disk-full",  # writes to the device's data folder fail with ENOSPC
    "desired-lost",  # desired-state pushes dropped (share of them)
    "desired-duplicate",  # desired-state pushes delivered twice
    # the services
    "broker-restart",  # the run's own broker stopped and started again (down for the span)
    "server-kill",  # a server replica SIGKILLed, started again at the end of the span
    "cloud-429",  # the cloud endpoint answers 429 (share of requests)
    "cloud-503",  # the cloud endpoint answers 503 (share of requests)
    "cloud-slow",  # the cloud endpoint answers latency_ms late
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
"""Every fault a scenario can schedule."""

INSTALL_STEPS = ("download", "verified", "staging", "staged", "trial")
"""Install steps a power cut can be aimed at (:data:`agent.ota.faults.STEPS`)."""

CheckName = Literal[
    "requests-answered",  # every request a device's caller made was answered
    "windows-once",  # every window a device produced is stored by the server exactly once
    "verified-model",  # no device was ever seen without a verified model to serve
    "quotas-held",  # no device got more cloud answers than its plan's token bucket allows
    "expectations",  # [expect]: rollout decisions, plans, alerts
]
CHECKS: tuple[str, ...] = get_args(CheckName)
"""The checks every run makes; ``skip_checks`` may name some a scenario cannot meet."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkProfile(_Strict):
    """A device's network link, applied by the fault proxy for the whole run."""

    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    bandwidth_kbps: float | None = Field(default=None, gt=0)


class HardwareProfile(_Strict):
    """What a hardware id is capable of."""

    id: str = Field(min_length=1, max_length=64)
    inference_ms: float = Field(default=0.0, ge=0, description="added to each local inference")
    memory_mb: int | None = Field(default=None, gt=0)
    link: LinkProfile = LinkProfile()


class Drift(_Strict):
    """A cohort's inputs move from ``at`` on (``firmware_images.datagen.FieldConditions``)."""

    at: Moment = timedelta(0)
    covariate_shift: dict[str, float] = Field(default_factory=dict)
    idle_share: float = Field(default=0.0, ge=0, le=1)
    noise_scale: float = Field(default=1.0, gt=0)


class Cohort(_Strict):
    """Devices alike: their number, hardware, tags, traffic and drift."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
    devices: int = Field(ge=1, le=1_000_000)
    hardware: str = "rpi4-arm64"
    tags: list[str] = Field(default_factory=list)
    rate: float | None = Field(default=None, gt=0, description="requests a second per device")
    drift: Drift | None = None
    weight: float | None = Field(default=None, gt=0, description="hybrid weight")


class Labels(_Strict):
    """Ground truth for a share of the requests, arriving ``delay`` after the answer."""

    share: float = Field(default=0.0, ge=0, le=1)
    delay: Duration = timedelta(minutes=1)


class Traffic(_Strict):
    rate: float = Field(default=1.0, gt=0, description="requests a second per device")
    window: Duration = timedelta(seconds=10)
    labels: Labels = Labels()
    # The distinct rows drawn per cohort and condition, sent in turn. The server's drift test
    # takes every request as a fresh draw: n requests over fewer distinct rows than about n
    # look drifted from the baseline (512 rows give a chi-square over its critical value
    # from a few hundred requests on), so a run that looks for drift alerts where there is
    # none needs more rows than the requests a scope sends.
    rows: int = Field(default=512, ge=16, le=1_000_000)


class ServerSetup(_Strict):
    """The fleet server: started for the run (no ``url``) or one already running."""

    url: str | None = None
    token: str | None = None  # an admin token of the given server
    broker: str | None = None  # absent: the run's own broker (Mosquitto, else embedded)
    database: str | None = None  # absent: SQLite in the run's folder
    replicas: int = Field(default=1, ge=1, le=4)
    tick: Duration = timedelta(seconds=1)  # how often rollouts are ticked
    cloud: bool = False  # start the cloud endpoint and release the cloud model


class AgentSetup(_Strict):
    """How each simulated device's agent is configured (``agent.config``'s own settings)."""

    # The update check and the plan read: a device asks the director this often, and at
    # once when the server's MQTT push announces a new desired state, so a long poll
    # delays no install; each check costs TUF refreshes on the device and the server.
    poll: Duration = timedelta(seconds=30)
    # The MQTT heartbeat (the agent's default is a minute; the server marks a device
    # offline after 90 s without one).
    heartbeat: Duration = timedelta(seconds=5)
    # A new model's trial under the watchdog before its commit (the agent's default is
    # five minutes). A trial shorter than a window commits before the device has reported
    # on the new model: the server's sample-ratio test then sees installed devices silent.
    trial: Duration = timedelta(seconds=10)


class Step(_Strict):
    """What the operator does at ``at``."""

    at: Moment = timedelta(0)
    action: Literal["release", "rollout", "capacity", "assign"]
    model: Literal["v1", "v2", "v3-bad", "cloud"] | None = None  # release
    version: str | None = None  # release: the bundle's version
    rollout: dict[str, Any] | None = None  # rollout: a RolloutSpec's fields
    capacity: float | None = Field(default=None, ge=0)  # capacity: requests a second
    release: str | None = None  # assign: NAME@VERSION to every device


class FaultTarget(_Strict):
    """Whom a fault hits: every device (nothing set), a cohort, a share, named devices."""

    cohort: str | None = None
    share: float | None = Field(default=None, gt=0, le=1)
    devices: list[str] | None = None


class Fault(_Strict):
    kind: FaultKind
    at: Moment
    duration: Moment = timedelta(0)
    target: FaultTarget = FaultTarget()
    latency_ms: float | None = Field(default=None, ge=0)
    jitter_ms: float | None = Field(default=None, ge=0)
    loss: float | None = Field(default=None, gt=0, le=1)
    bandwidth_kbps: float | None = Field(default=None, gt=0)
    offset_s: float | None = None
    step: Literal["download", "verified", "staging", "staged", "trial"] | None = None
    share: float | None = Field(default=None, gt=0, le=1)  # of requests or pushes

    @model_validator(mode="after")
    def _parameters(self) -> Fault:
        needs = {
            "latency": ("latency_ms",),
            "loss": ("loss",),
            "bandwidth": ("bandwidth_kbps",),
            "clock-offset": ("offset_s",),
            "cloud-slow": ("latency_ms",),
        }.get(self.kind, ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} fault needs {', '.join(missing)}")
        return self


class Expect(_Strict):
    """What the run must end with (checked as ``expectations``)."""

    rollout: Literal["completed", "rolled-back", "paused", "aborted"] | None = None
    rollout_stopped_in_wave: int | None = Field(default=None, ge=1)
    drift_alerts: list[dict[str, str]] | None = None  # e.g. [{cohort = "eu", feature = "…"}]
    plans_adapt: bool | None = None  # after a capacity step, plans follow the new capacity
    min_online: float | None = Field(default=None, ge=0, le=1)  # share online at the end


class Scenario(_Strict):
    name: str = Field(default="fleet", min_length=1, max_length=64)
    description: str = ""
    seed: int = 0
    mode: Literal["real", "virtual"] = "real"
    duration: Duration = timedelta(minutes=1)
    processes: int = Field(default=1, ge=1, le=64, description="device processes (real mode)")
    initial: Literal["v1", "v2"] = "v1"  # what every device runs at the start
    traffic: Traffic = Traffic()
    hardware: list[HardwareProfile] = Field(
        default_factory=lambda: [HardwareProfile(id="rpi4-arm64")]
    )
    cohorts: list[Cohort] = Field(
        default_factory=lambda: [Cohort(name="fleet", devices=10)], min_length=1
    )
    server: ServerSetup = ServerSetup()
    agent: AgentSetup = AgentSetup()
    steps: list[Step] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)
    expect: Expect = Expect()
    skip_checks: list[CheckName] = Field(default_factory=list)
    short: dict[str, Any] | None = Field(
        default=None, description="overrides for the short form (--short), applied over the file"
    )

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        profiles = {h.id for h in self.hardware}
        names = [c.name for c in self.cohorts]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"cohort names repeat: {repeated}")
        for cohort in self.cohorts:
            if cohort.hardware not in profiles:
                raise ValueError(
                    f"cohort {cohort.name!r} names hardware {cohort.hardware!r}; "
                    f"profiles: {sorted(profiles)}"
                )
        for fault in self.faults:
            if fault.target.cohort is not None and fault.target.cohort not in names:
                raise ValueError(
                    f"a {fault.kind} fault targets cohort {fault.target.cohort!r}; cohorts: {names}"
                )
        return self

    @property
    def devices(self) -> int:
        return sum(c.devices for c in self.cohorts)

    def shortened(self) -> Scenario:
        """The short form: ``short``'s overrides merged over this scenario."""
        if not self.short:
            return self
        merged = _merge(self.model_dump(mode="json", exclude={"short"}), self.short)
        return Scenario.model_validate(merged)

    def with_devices(self, devices: int) -> Scenario:
        """The same scenario with ``devices`` split over its cohorts in proportion."""
        total = self.devices
        cohorts, left = [], devices
        for i, cohort in enumerate(self.cohorts):
            last = i == len(self.cohorts) - 1
            n = left if last else max(1, round(devices * cohort.devices / total))
            n = max(1, min(n, left - (len(self.cohorts) - 1 - i)))
            left -= n
            cohorts.append(cohort.model_copy(update={"devices": n}))
        return self.model_copy(update={"cohorts": cohorts})

    def device_ids(self) -> dict[str, list[str]]:
        """Every device's id by cohort (``{cohort}-{n:05d}``), in a fixed order."""
        return {c.name: [f"{c.name}-{i:05d}" for i in range(c.devices)] for c in self.cohorts}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class ScenarioError(ValueError):
    """A scenario file that cannot be run, and why (the file and the field)."""


def load_scenario(path: Path) -> Scenario:
    """Read ``path``; a file that is no TOML or no scenario is refused naming what is wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not TOML: {exc}") from exc
    try:
        return Scenario.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(file)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ScenarioError(f"{path}: not a scenario: {problems}") from exc
