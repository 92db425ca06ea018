"""The REST API's request and response bodies (``/api/v1``), version 1.

The server validates every request body against these models and answers
with them; its OpenAPI document is generated from them, so the document and
the server cannot disagree. Request bodies refuse unknown fields, so a typo
in a script is an error rather than a silently ignored option.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, model_validator

from protocol.topics import DEVICE_ID_PATTERN
from protocol.versioning import HARDWARE_ID_PATTERN, NAME_PATTERN

API_PREFIX = "/api/v1"

TOKEN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
# dev-N: one device's assignment; tag-N: a tag rule (N fits the 32-bit id columns).
ASSIGNMENT_ID_PATTERN = r"^(dev|tag)-[1-9][0-9]{0,8}$"

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern, max_length=128)]
HardwareId = Annotated[str, Field(pattern=HARDWARE_ID_PATTERN.pattern, max_length=64)]
Tag = Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern, max_length=128)]
Region = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$", max_length=64)]
Tags = Annotated[list[Tag], Field(max_length=64)]
AuditAction = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", max_length=64)]
# A file of an image repository as pushed: under metadata/ (flat) or targets/.
RepositoryFile = Annotated[
    str,
    Field(
        pattern=r"^(metadata/[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
        r"|targets(/[A-Za-z0-9][A-Za-z0-9._-]{0,254}){1,4})$",
        max_length=1024,
    ),
]

MAX_PUSH_FILES = 1000


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorBody(_Response):
    """Every error: one sentence saying what was wrong."""

    error: str


class Health(_Response):
    status: Literal["ok"] = "ok"


# -- devices -------------------------------------------------------------------


class DeviceRefusal(_Response):
    """An update the device refused, from its events (``check-refused``, ``refused``, …)."""

    at: datetime = Field(description="when the device refused (its clock)")
    received_at: datetime
    event: str
    reason: str | None = None
    bundle: str | None = Field(default=None, description="NAME VERSION, where the event names it")
    message: str | None = None


class DeviceView(_Response):
    """A device as the registry knows it: attributes, what it runs, what it should run."""

    id: str
    hardware_id: str
    region: str | None = None
    tags: list[str] = Field(default_factory=list)
    enrolled_at: datetime
    online: bool
    last_seen_at: datetime | None = None
    agent_version: str | None = None
    active_bundle: str | None = None
    installed_counter: int = 0
    phase: str | None = None
    assigned_target: str | None = None
    director_version: int = 0
    reported: dict[str, Any] | None = None
    reported_omitted: str | None = Field(
        default=None, description="why the stored report is not shown; null if shown"
    )
    reported_at: datetime | None = None
    decommissioned_at: datetime | None = Field(
        default=None, description="when the device was decommissioned; null while it is active"
    )
    decommission_reason: str | None = None
    refusals: list[DeviceRefusal] = Field(
        default_factory=list,
        description="the device's latest refused updates, newest first (one device's view only)",
    )
    assignment_warning: str | None = Field(
        default=None,
        description="set when the device refused the bundle assigned to it now, saying so",
    )


class DeviceList(_Response):
    devices: list[DeviceView]


class DeviceQuery(_Request):
    """Filters of the device list (query string; unknown parameters are refused too)."""

    tag: Tag | None = None
    hardware_id: HardwareId | None = None
    online: bool | None = None
    include_decommissioned: bool = Field(
        default=False, description="list decommissioned devices too (hidden by default)"
    )


class RegisterDevice(_Request):
    """An admin pre-registers a device (its password is shown once, in the answer)."""

    device_id: DeviceId
    hardware_id: HardwareId
    region: Region | None = None
    tags: Tags = Field(default_factory=list)
    reuse_decommissioned: bool = Field(
        default=False,
        description="register a new device under the id of a decommissioned one (refused "
        "otherwise); its history stays, the new device starts with nothing assigned",
    )


class EnrolDevice(_Request):
    """A device enrols itself with a provisioning token."""

    token: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]{1,128}$")]
    device_id: DeviceId
    hardware_id: HardwareId
    region: Region | None = None
    tags: Tags = Field(default_factory=list)


class DeviceCredentials(_Response):
    """A device's credentials: HTTP Basic and MQTT user ``device_id``, this password."""

    device_id: str
    password: str
    device: DeviceView
    mqtt_namespace: str | None = Field(
        default=None,
        description="the topic namespace the device's agent.toml names in [mqtt] namespace "
        "(none: the server has no broker)",
    )


class TagChange(_Request):
    add: Tags = Field(default_factory=list)
    remove: Tags = Field(default_factory=list)


class DeviceEventView(_Response):
    message_id: str
    kind: str
    event: str
    at: datetime
    received_at: datetime
    details: dict[str, Any] = Field(default_factory=dict)
    details_omitted: str | None = Field(
        default=None,
        description="why the stored details are not shown (then details is empty); null if shown",
    )


class DeviceEventList(_Response):
    events: list[DeviceEventView]


class EventQuery(_Request):
    limit: int = Field(default=100, ge=1, le=1000)


class ProvisioningTokenRequest(_Request):
    """A token devices present to enrol themselves, ``uses`` times until it expires."""

    hardware_id: HardwareId | None = None
    tags: Tags = Field(default_factory=list)
    uses: int = Field(default=1, ge=1, le=100_000)
    ttl_s: float = Field(default=7 * 86400, gt=0, le=366 * 86400)


class ProvisioningTokenCreated(_Response):
    id: str
    token: str
    hardware_id: str | None
    tags: list[str]
    uses: int
    expires_at: datetime


# -- releases ------------------------------------------------------------------


class ReleaseView(_Response):
    """A bundle released into the image repository."""

    target_path: str
    name: str
    version: str
    release_counter: int
    hardware_ids: list[str]
    sha256: str
    length: int
    released_at: datetime
    yanked_at: datetime | None = Field(
        default=None, description="when the release was yanked; null if it was not"
    )
    yank_reason: str | None = None


class ReleaseList(_Response):
    releases: list[ReleaseView]


class ReleaseQuery(_Request):
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)] | None = None


class ReleasePush(_Request):
    """Files of a signed image repository, base64, by path (``metadata/…``, ``targets/…``).

    The server verifies the resulting repository as a device would before it
    publishes any of them.
    """

    files: Annotated[
        dict[RepositoryFile, Base64Bytes], Field(min_length=1, max_length=MAX_PUSH_FILES)
    ]


class ReleasePushResult(_Response):
    published: list[ReleaseView]
    files: int


# -- assignments ---------------------------------------------------------------


class AssignmentRequest(_Request):
    """Assign a released bundle to devices by id, by tag, or both."""

    release: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,511}$", max_length=512)
    ] = Field(description="NAME@VERSION or the bundle's target path")
    devices: Annotated[list[DeviceId], Field(max_length=10_000)] = Field(default_factory=list)
    tag: Tag | None = None

    @model_validator(mode="after")
    def _some_devices(self) -> AssignmentRequest:
        if not self.devices and self.tag is None:
            raise ValueError("name devices, a tag, or both")
        return self


class AssignmentView(_Response):
    device_id: str
    target_path: str
    director_version: int


class AssignmentResult(_Response):
    release: ReleaseView
    assignments: list[AssignmentView]
    rule: str | None = Field(
        default=None,
        description="the tag rule made (tag-N): devices gaining the tag later get the release too",
    )


class AssignmentQuery(_Request):
    device: DeviceId | None = None
    tag: Tag | None = None
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)] | None = Field(
        default=None, description="the released bundle's name"
    )
    cancelled: bool = Field(default=False, description="list cancelled ones too")


class AssignmentItem(_Response):
    """A device's current assignment (``dev-N``) or a tag rule (``tag-N``)."""

    id: str
    kind: Literal["device", "tag"]
    device_id: str | None = None
    tag: str | None = None
    rule: str | None = Field(default=None, description="the tag rule a device's assignment is from")
    target_path: str
    name: str
    version: str
    release_counter: int
    assigned_at: datetime
    actor: str
    devices: int | None = Field(
        default=None, description="a rule: how many devices hold its assignment now"
    )
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None


class AssignmentList(_Response):
    assignments: list[AssignmentItem]


class AssignmentCancelled(_Response):
    id: str
    target_path: str
    devices: list[str] = Field(description="the devices that now keep what they run")


# -- device and release lifecycle ---------------------------------------------------

LifecycleReason = Annotated[
    str, Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class DecommissionRequest(_Request):
    """Decommission a device: its credentials stop working, its history stays."""

    reason: LifecycleReason | None = None


class YankRequest(_Request):
    """Yank a release: no device that does not run it already is offered it any more."""

    release: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,511}$", max_length=512)
    ] = Field(description="NAME@VERSION or the bundle's target path")
    reason: LifecycleReason


class YankResult(_Response):
    release: ReleaseView
    withdrawn: list[str] = Field(
        description="devices assigned the release but not running it: their director "
        "metadata now names nothing, so they keep what they run"
    )
    kept: list[str] = Field(
        description="devices running the release: they keep it until assigned another "
        "(a yank is not a rollback)"
    )
    rules_cancelled: list[str] = Field(
        default_factory=list,
        description="tag rules (tag-N) that assigned the release, cancelled with the yank",
    )


# -- tokens --------------------------------------------------------------------


class TokenRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
    role: Role


class TokenView(_Response):
    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None


class TokenCreated(_Response):
    """A new bearer token; ``token`` is shown only now."""

    token: str
    info: TokenView


class TokenList(_Response):
    tokens: list[TokenView]


# -- audit ---------------------------------------------------------------------


class AuditEntryView(_Response):
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    details_omitted: str | None = Field(
        default=None,
        description="why the stored details are not shown (then details is empty); null if shown",
    )
    prev_hash: str
    hash: str


class AuditQuery(_Request):
    """A page of the audit log, oldest first, after entry ``after``."""

    after: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)
    action: AuditAction | None = None


class AuditPage(_Response):
    entries: list[AuditEntryView]
    next_after: int | None = Field(description="pass as ?after= for the next page; null at end")


class AuditVerification(_Response):
    """Whether the hash chain holds; if not, the first entry that breaks it and why."""

    ok: bool
    entries: int
    broken_at: int | None = None
    problem: str | None = None


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuditHead(BaseModel):
    """The audit log's newest entry at ``signed_at``: its number, hash, and the entry count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0, description="the newest entry's sequence number; 0 for an empty log")
    hash: Sha256Hex
    entries: int = Field(ge=0)
    signed_at: datetime
    key_id: Sha256Hex = Field(description="SHA-256 of the raw Ed25519 public key that signed")


class SignedAuditHead(BaseModel):
    """A head signed with the server's audit key; saved by operators as an anchor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: AuditHead
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


# -- drift and alerts ----------------------------------------------------------

DriftVerdictName = Literal["not_enough_data", "no_drift", "drift"]
DriftReasonName = Literal["distribution", "missing-values", "out-of-range", "new-range"]
ScopeKind = Literal["device", "tag", "hardware_id", "region", "fleet"]
ModelName = Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)]
ModelVersion = Annotated[str, Field(pattern=r"^[0-9A-Za-z.+-]{1,64}$", max_length=64)]


class DriftQuery(_Request):
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


class FeatureDriftView(_Response):
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


class ModelDriftView(_Response):
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
        description="per feature, split over its tests (distribution 70 %, the others 10 % each)"
    )
    features: list[FeatureDriftView]
    accuracy: AccuracyView | None = Field(
        default=None, description="null when the release has no calibration or no score output"
    )
    problem: str | None = None


class LabelledAccuracy(_Response):
    """Accuracy measured on the windows whose labels arrived, beside CBPE's estimate for them."""

    windows: int = Field(description="labelled windows among the merged ones")
    rows: int = Field(description="labelled predictions")
    accuracy: float | None = Field(description="share of labelled predictions that were right")
    estimated: float | None = Field(description="CBPE's estimate over the same windows")


class AccuracyView(_Response):
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


class DriftReport(_Response):
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


class AlertQuery(_Request):
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


class AlertFeature(_Response):
    """A feature of a drift alert: the tests that found it drifting, each with its statistics.

    Each test's figures are those of the latest evaluation with enough data.
    """

    feature: int
    name: str | None = None
    reasons: list[DriftReasonName]
    tests: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AlertAcknowledgement(_Response):
    at: datetime
    by: str
    comment: str | None = None


class AlertView(_Response):
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


class AlertList(_Response):
    alerts: list[AlertView]


class AcknowledgeAlert(_Request):
    """Someone is on it: the alert is not notified again, and is still closed when it clears."""

    comment: str | None = Field(default=None, max_length=1000)


class SilenceRequest(_Request):
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


class SilenceView(_Response):
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


class SilenceList(_Response):
    silences: list[SilenceView]


class SilenceQuery(_Request):
    state: Literal["active", "expired", "all"] = "active"
    limit: int = Field(default=100, ge=1, le=1000)


# -- labels ----------------------------------------------------------------------

WindowId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", max_length=128)]
ClassName = Annotated[str, Field(min_length=1, max_length=128)]
MAX_LABELLED_WINDOWS = 1000
_MAX_LABEL_COUNT = 2**53


class LabelCount(_Request):
    """Predictions of class ``predicted`` whose true class turned out to be ``actual``."""

    actual: ClassName
    predicted: ClassName
    count: int = Field(default=1, ge=0, le=_MAX_LABEL_COUNT)


class WindowLabelsBody(_Request):
    """The labels of one window's predictions: confusion counts, or a list of (actual, predicted).

    ``counts[actual][predicted]`` in the order of ``classes``, which must be
    the window's model classes, in its order (a guard against a shuffled
    matrix); or ``labels``, counts per (actual, predicted) class name.
    """

    window_id: WindowId
    classes: list[ClassName] | None = Field(default=None, max_length=1024)
    counts: list[list[Annotated[int, Field(ge=0, le=_MAX_LABEL_COUNT)]]] | None = Field(
        default=None, max_length=1024
    )
    labels: list[LabelCount] | None = Field(default=None, max_length=100_000)

    @model_validator(mode="after")
    def _one_form(self) -> WindowLabelsBody:
        if (self.counts is None) == (self.labels is None):
            raise ValueError("give either counts (with classes) or labels")
        if self.counts is not None:
            if self.classes is None:
                raise ValueError("counts need classes, in the matrix's order")
            width = len(self.classes)
            if len(self.counts) != width or any(len(row) != width for row in self.counts):
                raise ValueError(f"counts must be a {width} x {width} matrix, one row per class")
        return self


class LabelsRequest(_Request):
    """Labels that arrived after the fact, for windows the server holds."""

    windows: list[WindowLabelsBody] = Field(min_length=1, max_length=MAX_LABELLED_WINDOWS)


class LabelsResult(_Response):
    stored: int = Field(description="windows that had no labels before")
    replaced: int = Field(description="windows whose earlier labels these replace")
    rows: int = Field(description="labelled predictions in this request")
    correct: int = Field(description="of those, predictions that were right")


# -- windows ---------------------------------------------------------------------


class WindowQuery(_Request):
    """A device's windows that ended in ``(since, until]``, newest first, a page at a time."""

    since: datetime | None = None
    until: datetime | None = None
    model: ModelName | None = None
    version: ModelVersion | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    before: str | None = Field(
        default=None,
        max_length=200,
        description="the next_before of the previous page: windows after it",
    )


class WindowView(_Response):
    window_id: str
    start: datetime
    end: datetime
    model: str
    version: str
    requests: int
    errors: int
    labelled: bool = Field(description="labels were posted for it")


class WindowList(_Response):
    device_id: str
    windows: list[WindowView]
    next_before: str | None = Field(
        default=None, description="more windows: pass this as before for the next page"
    )
