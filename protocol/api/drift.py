"""Drift and accuracy reports, the alerts they open and the silences that quiet them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from protocol.api.base import DeviceId, HardwareId, Region, RequestBody, ResponseBody, Tag
from protocol.versioning import NAME_PATTERN

DriftVerdictName = Literal["not_enough_data", "no_drift", "drift"]
DriftReasonName = Literal["distribution", "missing-values", "out-of-range", "new-range"]
ScopeKind = Literal["device", "tag", "hardware_id", "region", "fleet"]
ModelName = Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)]
ModelVersion = Annotated[str, Field(pattern=r"^[0-9A-Za-z.+-]{1,64}$", max_length=64)]


class DriftQuery(RequestBody):
    """Whose windows to test: a device, a cohort or the fleet; optionally a model version, a range.

    ``since`` and ``until`` default to the hour before now; windows that ended
    in ``(since, until]`` are merged, one result per model version.
    """

    device: DeviceId | None = None
    tag: Tag | None = None
    hardware_id: HardwareId | None = None
    region: Region | None = None
    fleet: bool = Field(default=False, description="every device's windows")
    model: ModelName | None = Field(default=None, description="only this model")
    version: ModelVersion | None = Field(default=None, description="only this model version")
    since: datetime | None = Field(default=None, description="default: an hour before until")
    until: datetime | None = Field(default=None, description="default: now")

    @model_validator(mode="after")
    def _one_scope(self) -> DriftQuery:
        given = [s for s in (self.device, self.tag, self.hardware_id, self.region) if s is not None]
        if len(given) + self.fleet != 1:
            raise ValueError("give exactly one of device, tag, hardware_id, region, fleet=true")
        return self


class FeatureDriftView(ResponseBody):
    """One feature's drift statistics against the baseline, and the verdict.

    ``verdict`` is ``drift`` when any of the feature's tests found drift
    (``reasons`` names them), ``no_drift`` when all found none. ``verdicts``
    gives each test's own: ``distribution`` (the G-test on the bins, whose
    numbers follow), ``missing-values`` (the share of NaN above the baseline's),
    ``out-of-range`` (the share outside the valid range above the baseline's),
    ``new-range`` (values beyond the baseline's min or max). ``threshold`` and
    ``psi_threshold`` are null when the test has no degrees of freedom (every
    value in one bin).
    """

    feature: int
    name: str | None = None
    verdict: DriftVerdictName
    reasons: list[DriftReasonName] = Field(default_factory=list)
    verdicts: dict[DriftReasonName, DriftVerdictName] = Field(default_factory=dict)
    nan: int = Field(default=0, description="NaN or infinite values observed")
    baseline_nan: int = 0
    missing_p_value: float = 1.0
    out_of_range: int = Field(default=0, description="values outside the valid range observed")
    baseline_out_of_range: int = 0
    out_of_range_p_value: float = 1.0
    min: float | None = None
    max: float | None = None
    baseline_min: float | None = None
    baseline_max: float | None = None
    below_baseline: int | None = Field(
        default=None, description="values below the baseline's min; None: not counted"
    )
    above_baseline: int | None = Field(
        default=None, description="values above the baseline's max; None: not counted"
    )
    new_range_p_value: float = 1.0
    n: int
    baseline_n: int
    psi: float
    js: float = Field(description="Jensen-Shannon divergence of the bin shares, in bits")
    statistic: float = Field(description="G-test statistic")
    df: int
    threshold: float | None = Field(description="chi-square critical value at the alarm rate")
    p_value: float
    psi_threshold: float | None = Field(description="the PSI at which this sample would alarm")


class ModelDriftView(ResponseBody):
    """The merged windows of one model version in the scope, tested feature by feature.

    ``problem`` says why there are no features (e.g. the release is unknown).
    """

    model: str
    version: str
    baseline_id: str
    windows: int
    window_ids: list[str] = Field(description="the merged windows (at most the first 1000)")
    start: datetime
    end: datetime
    requests: int
    summarised_requests: int | None = Field(
        default=None,
        description="requests whose rows are in the features and score histograms (devices "
        "may summarise a random sample of requests to bound the cost); null if unread",
    )
    min_n: int
    false_alarm_rate: float = Field(
        description="the rate each feature is tested at: the scope and model version's rate "
        "split evenly over its features, then over the feature's tests (distribution 70 %, "
        "the others 10 % each)"
    )
    features: list[FeatureDriftView]
    accuracy: AccuracyView | None = Field(
        default=None, description="null when the release has no calibration or no score output"
    )
    problem: str | None = None


class LabelledAccuracy(ResponseBody):
    """Accuracy measured on the windows whose labels arrived, beside CBPE's estimate for them."""

    windows: int = Field(description="labelled windows among the merged ones")
    rows: int = Field(description="labelled predictions")
    accuracy: float | None = Field(description="share of labelled predictions that were right")
    estimated: float | None = Field(description="CBPE's estimate over the same windows")


class AccuracyView(ResponseBody):
    """Accuracy estimated without labels (CBPE), and measured where labels arrived.

    ``reference`` is the model's accuracy on the calibration data in its bundle;
    ``threshold`` is the accuracy below which (upper end of the interval) an
    accuracy alert opens. ``assumption`` says what the interval holds under:
    CBPE assumes the calibration carries over; it follows covariate shift of
    about the size its ``allowance`` was measured for and is blind to concept
    drift (see ``protocol.cbpe``).
    """

    estimated: float | None
    low: float | None
    high: float | None
    confidence: float
    n: int = Field(description="predictions the estimate covers")
    unseen_share: float = Field(description="share of predictions in uncalibrated score cells")
    allowance: float = Field(
        default=0.0,
        description="misspecification allowance in the interval (a standard deviation), "
        "measured on held-out splits of the calibration rows",
    )
    allowance_measured: bool = Field(
        default=True, description="false: the bundle predates it and a default was used"
    )
    assumption: str = Field(default="", description="what the interval holds under")
    reference: float
    threshold: float
    labelled: LabelledAccuracy | None = None


class DriftReport(ResponseBody):
    scope: ScopeKind
    scope_value: str
    since: datetime
    until: datetime
    models: list[ModelDriftView]


AlertKind = Literal["drift", "accuracy"]
AlertState = Literal["open", "closed", "acknowledged", "silenced"]
# A scope kind, or KIND:VALUE (device:pump-17, tag:line-a); "fleet" has no value.
ScopeFilter = Annotated[
    str,
    Field(
        pattern=r"^(fleet|(device|tag|hardware_id|region)(:[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,127})?)$",
        max_length=150,
    ),
]
MAX_SILENCE_S = 366 * 86400


class AlertQuery(RequestBody):
    """Which alerts: every filter given must hold (newest first).

    ``state``: ``open`` (every open alert, acknowledged and silenced ones too),
    ``closed``, ``acknowledged`` (open and acknowledged) or ``silenced`` (open
    and matched by an active silence).
    """

    state: AlertState | None = None
    kind: AlertKind | None = None
    scope: ScopeFilter | None = Field(
        default=None, description="a scope kind (tag) or one scope (tag:line-a, device:pump-17)"
    )
    device: DeviceId | None = Field(default=None, description="alerts of this device's scope")
    model: ModelName | None = None
    version: ModelVersion | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class AlertFeature(ResponseBody):
    """A feature of a drift alert: the tests that found it drifting, each with its statistics.

    Each test's figures are those of the latest evaluation with enough data.
    """

    feature: int
    name: str | None = None
    reasons: list[DriftReasonName]
    tests: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AlertAcknowledgement(ResponseBody):
    at: datetime
    by: str
    comment: str | None = None


class AlertView(ResponseBody):
    """An alert of one scope and cause: a model version's drift (``features`` lists each
    drifting feature), or its estimated accuracy (no features).

    ``evidence`` is the latest test's numbers, thresholds and windows. ``feature``,
    ``feature_name`` and ``reason`` are set only on alerts stored before alerts
    were grouped (one per feature and test); ``features`` holds theirs too.
    """

    id: int
    kind: AlertKind
    scope: ScopeKind
    scope_value: str
    model: str
    version: str
    features: list[AlertFeature] = Field(default_factory=list)
    feature: int | None = None
    feature_name: str | None = None
    reason: DriftReasonName | None = Field(
        default=None, description="only on alerts stored per feature and test (before grouping)"
    )
    state: Literal["open", "closed"]
    opened_at: datetime
    last_seen_at: datetime
    closed_at: datetime | None = None
    acknowledged: AlertAcknowledgement | None = None
    silenced_by: list[int] = Field(
        default_factory=list, description="the active silences that match it (open alerts)"
    )
    evidence: dict[str, Any]


class AlertList(ResponseBody):
    alerts: list[AlertView]


class AcknowledgeAlert(RequestBody):
    """Someone is on it: the alert is not notified again, and is still closed when it clears."""

    comment: str | None = Field(default=None, max_length=1000)


class SilenceRequest(RequestBody):
    """Silence alerts for ``duration_s``: those matching every matcher given, or one alert's
    scope and cause (``alert_id``: its kind, scope and model version, so the same cause
    opening again is silenced too)."""

    alert_id: int | None = Field(default=None, ge=1)
    kind: AlertKind | None = None
    scope: ScopeKind | None = None
    scope_value: str | None = Field(default=None, min_length=1, max_length=128)
    model: ModelName | None = None
    version: ModelVersion | None = None
    duration_s: float = Field(gt=0, le=MAX_SILENCE_S, description="how long it lasts, from now")
    reason: str = Field(min_length=1, max_length=1000, description="why (shown and audited)")

    @model_validator(mode="after")
    def _what(self) -> SilenceRequest:
        matchers = (self.kind, self.scope, self.scope_value, self.model, self.version)
        if self.alert_id is not None and any(m is not None for m in matchers):
            raise ValueError("give alert_id alone, or matchers (scope, ...) without it")
        if self.alert_id is None and self.scope is None:
            raise ValueError("give alert_id or scope (a silence needs at least a scope)")
        if self.scope == "fleet" and self.scope_value is not None:
            raise ValueError("the fleet scope has no value")
        return self


class SilenceView(ResponseBody):
    """A silence; ``None`` matchers match anything. ``active`` until ``ends_at``."""

    id: int
    kind: AlertKind | None = None
    scope: ScopeKind | None = None
    scope_value: str | None = None
    model: str | None = None
    version: str | None = None
    alert_id: int | None = Field(default=None, description="the alert it was made from")
    reason: str
    created_by: str
    created_at: datetime
    starts_at: datetime
    ends_at: datetime
    expired_by: str | None = Field(default=None, description="who expired it early")
    active: bool
    matching: int = Field(description="open alerts it matches now")


class SilenceList(ResponseBody):
    silences: list[SilenceView]


class SilenceQuery(RequestBody):
    state: Literal["active", "expired", "all"] = "active"
    limit: int = Field(default=100, ge=1, le=1000)
