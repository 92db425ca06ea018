"""Tables of the fleet server (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def as_utc(at: datetime) -> datetime:
    """``at`` in UTC; a naive datetime is taken to be in UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp column that stores UTC and reads back timezone-aware UTC on every database.

    SQLite keeps no time zone and hands back naive datetimes: they are UTC, as written.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON}


class Device(Base):
    """A registered device: who it is, what it should run, what it reports."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(64), index=True)
    region: Mapped[str | None] = mapped_column(String(64), index=True)
    # IANA name; rollouts read their maintenance windows on this clock (None: the window's).
    timezone: Mapped[str | None] = mapped_column(String(64), default=None)
    tags: Mapped[list[str]] = mapped_column(default=list)
    credential_hash: Mapped[str | None] = mapped_column(String(128))
    enrolled_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    active_bundle: Mapped[str | None] = mapped_column(String(256))
    installed_counter: Mapped[int] = mapped_column(BigInteger, default=0)
    phase: Mapped[str | None] = mapped_column(String(32))
    reported: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    reported_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    assigned_target: Mapped[str | None] = mapped_column(String(512))
    director_version: Mapped[int] = mapped_column(Integer, default=0)
    # The bundle (ALGORITHM:HEX) a standing fleet-rollback assignment replaces; every
    # re-signing of that assignment carries it, so the device keeps accepting it.
    assigned_rollback_of: Mapped[str | None] = mapped_column(String(160))
    # A release the device runs as a shadow beside its assignment (a rollout's shadow stage:
    # run on a share of requests, its answers never served), and the rollout that put it
    # there; signed into its director metadata as a second target marked ``shadow``.
    shadow_target: Mapped[str | None] = mapped_column(String(512))
    shadow_rollout: Mapped[str | None] = mapped_column(String(64))
    # Lifecycle: a decommissioned device keeps its row (its history names it), no credential.
    decommissioned_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    decommission_reason: Mapped[str | None] = mapped_column(String(500))
    # Hybrid inference: the device's priority in the split of the cloud's capacity, and
    # whether its data must never leave it (planned local only).
    hybrid_weight: Mapped[float] = mapped_column(Float, default=1.0)
    offload_opt_out: Mapped[bool] = mapped_column(Boolean, default=False)


class Release(Base):
    """A bundle released into the image repository."""

    __tablename__ = "releases"

    target_path: Mapped[str] = mapped_column(String(512), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    release_counter: Mapped[int] = mapped_column(BigInteger)
    hardware_ids: Mapped[list[str]] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    released_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Lifecycle: a yanked release is offered to no device that does not run it already.
    yanked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    yank_reason: Mapped[str | None] = mapped_column(String(500))


class Assignment(Base):
    """Every assignment ever made (the device row holds the current one)."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    target_path: Mapped[str] = mapped_column(ForeignKey("releases.target_path"))
    director_version: Mapped[int] = mapped_column(Integer)
    assigned_at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    # The tag rule this assignment came from (``None``: made for this device by name).
    rule_id: Mapped[int | None] = mapped_column(Integer, default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    cancelled_by: Mapped[str | None] = mapped_column(String(128), default=None)


class AssignmentRule(Base):
    """A tag assignment: every device that has (or later gains) ``tag`` gets the release.

    Cancelling it stops it applying to devices that gain the tag, and cancels
    the assignments it made that are still current.
    """

    __tablename__ = "assignment_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tag: Mapped[str] = mapped_column(String(128), index=True)
    target_path: Mapped[str] = mapped_column(ForeignKey("releases.target_path"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    cancelled_by: Mapped[str | None] = mapped_column(String(128), default=None)


class ApiToken(Base):
    """An operator's bearer token (only its hash is stored)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ProvisioningToken(Base):
    """A token a device presents once to enrol itself."""

    __tablename__ = "provisioning_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    hardware_id: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[str]] = mapped_column(default=list)
    uses_left: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AuditEntry(Base):
    """One entry of the append-only, hash-chained audit log."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(512))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class DeviceEventRow(Base):
    """An event a device reported; ``message_id`` makes ingest idempotent."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ingested_by: Mapped[str | None] = mapped_column(Text)


class WindowRow(Base):
    """A window summary a device uploaded; ``window_id`` makes ingest idempotent.

    ``payload`` is the window as the device encoded it (:func:`protocol.window.decode_window`
    reads it back for merging); the columns beside it are what queries select windows by.
    """

    __tablename__ = "windows"

    window_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    baseline_id: Mapped[str] = mapped_column(String(128))
    cohort_id: Mapped[str | None] = mapped_column(String(128))
    plan_id: Mapped[str | None] = mapped_column(String(128))
    start: Mapped[datetime] = mapped_column(UtcDateTime())
    end: Mapped[datetime] = mapped_column(UtcDateTime())
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    ingested_by: Mapped[str | None] = mapped_column(Text)


class WindowLabels(Base):
    """Labels that arrived after a window: its confusion counts, ``counts[actual][predicted]``.

    One row per window; posting labels for a window again replaces them (a
    correction), and the audit log keeps who posted what.
    """

    __tablename__ = "window_labels"

    window_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("windows.window_id", ondelete="CASCADE"), primary_key=True
    )
    classes: Mapped[list[str]] = mapped_column()
    counts: Mapped[list[list[int]]] = mapped_column(JSON)
    rows: Mapped[int] = mapped_column(BigInteger)
    correct: Mapped[int] = mapped_column(BigInteger)
    posted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    posted_by: Mapped[str] = mapped_column(String(128))


class AlertRow(Base):
    """An alert of one scope and cause: drift of a model version (every drifting feature), or
    its estimated accuracy.

    A drift alert's ``evidence["features"]`` lists each feature that drifts, by
    which tests (``distribution``, ``missing-values``, ``out-of-range``,
    ``new-range``) and with their statistics; it is open while any of them
    drifts. ``feature``, ``feature_name`` and ``reason`` are set only on alerts
    stored before alerts were grouped (one per feature and test), which are
    shown as they are. ``open_key`` is set while the alert is open and cleared
    when it closes; its unique index is what keeps two replicas from opening
    the same alert twice. ``acknowledged_*`` say who acknowledged it, when, why.
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(16))
    scope_value: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    feature: Mapped[int | None] = mapped_column(Integer)
    feature_name: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    open_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    acknowledged_by: Mapped[str | None] = mapped_column(String(128))
    acknowledge_comment: Mapped[str | None] = mapped_column(Text)


class SilenceRow(Base):
    """A silence: alerts it matches are not notified from ``starts_at`` until ``ends_at``.

    Each matcher (``kind``, ``scope``, ``scope_value``, ``model_name``,
    ``model_version``) is either ``None`` (any) or must equal the alert's.
    Expiring a silence early sets ``ends_at`` to that moment, as Alertmanager does.
    """

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str | None] = mapped_column(String(32))
    scope: Mapped[str | None] = mapped_column(String(16))
    scope_value: Mapped[str | None] = mapped_column(String(128))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    alert_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    starts_at: Mapped[datetime] = mapped_column(UtcDateTime())
    ends_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    expired_by: Mapped[str | None] = mapped_column(String(128))


class DeviceHourStats(Base):
    """One device's windows of one model version that ended in one UTC hour, summed.

    Kept up to date as windows arrive (:mod:`fleet_server.rollouts.aggregates` folds each
    window stored for the first time into its hour's row, in the transaction that stores
    it), so a rollout tick sums a few rows per device instead of decoding every window.
    ``fallbacks`` counts the requests the active model did not answer. ``latency`` and
    ``scores`` are sparse ``(index, count)`` arrays in fixed layouts (a base-2 exponential
    histogram at one scale over a fixed range; ``score_classes`` x the score bins), so
    rows add by concatenation. ``labelled_*`` sum the labels posted for the hour's windows.

    ``received_hour`` is the UTC hour (the server's clock) the row's windows and labels were
    stored in: what arrives for an hour after that hour ends (a device uploading its
    backlog, labels) goes to a row of its own, so a row of a received hour that has ended
    never changes again and a tick may keep its sums (:mod:`fleet_server.rollouts.kept`).
    """

    __tablename__ = "device_hour_stats"
    __table_args__ = (
        # A tick's read of what arrived since: the rows received in an hour, of a range of hours.
        Index(
            "ix_device_hour_stats_received",
            "model_name",
            "model_version",
            "received_hour",
            "hour",
        ),
    )

    model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_hour: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    windows: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    fallbacks: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    unsummarised_requests: Mapped[int] = mapped_column(BigInteger)
    latency_zero: Mapped[int] = mapped_column(BigInteger)
    latency_sum: Mapped[float] = mapped_column(Float)
    latency_min: Mapped[float | None] = mapped_column(Float)
    latency_max: Mapped[float | None] = mapped_column(Float)
    latency: Mapped[bytes] = mapped_column(LargeBinary)
    score_classes: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    labelled_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    # The windows' shadow sections, in the row of the shadow's version: the requests the
    # shadow ran on, of them those it agreed with the answer served and those it failed, and
    # its own latency in the fixed layout (``None``: no shadow latency).
    shadow_requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    shadow_agreements: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    shadow_errors: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    shadow_latency: Mapped[bytes | None] = mapped_column(LargeBinary)


class RolloutRow(Base):
    """A rollout: its spec as the operator gave it, and the controller's persisted state.

    ``revision`` goes up by one on every save of the state; a save names the revision it
    read, so of two replicas that read the same revision only one can advance the rollout.
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    release_name: Mapped[str] = mapped_column(String(64), index=True)
    release_version: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[dict[str, Any]] = mapped_column()
    phase: Mapped[str] = mapped_column(String(32), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class RolloutDevice(Base):
    """A device a rollout reached: at which stage, when, and what it ran before (for rollback)."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)
    assigned_at: Mapped[datetime] = mapped_column(UtcDateTime())
    previous_target: Mapped[str | None] = mapped_column(String(512))
    previous_bundle: Mapped[str | None] = mapped_column(String(256))


class RolloutEvaluation(Base):
    """One controller tick of a rollout: the gates' records, the rule that fired, the action.

    At most one per rollout and tick time, so a replayed tick records nothing new.
    """

    __tablename__ = "rollout_evaluations"
    __table_args__ = (UniqueConstraint("rollout_id", "at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    stage: Mapped[int] = mapped_column(Integer)
    gates: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    rule: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))


class HybridPlanRow(Base):
    """A device's current hybrid-inference plan (:class:`protocol.hybrid.HybridPlan`).

    ``plan`` is the plan as signed into the device's director metadata; ``mode``,
    ``quota_rate``, ``quota_burst`` and ``expires_at`` repeat it for the cloud endpoint's
    quota book. ``inputs`` records what the planner planned it from (request rate, weight,
    share, expected offload, why): what ``fleetctl plan show`` explains.
    """

    __tablename__ = "hybrid_plans"

    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    plan_id: Mapped[str] = mapped_column(String(128), unique=True)
    mode: Mapped[str] = mapped_column(String(16))
    quota_rate: Mapped[float] = mapped_column(Float)
    quota_burst: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    plan: Mapped[dict[str, Any]] = mapped_column()
    inputs: Mapped[dict[str, Any]] = mapped_column()


class CloudSettings(Base):
    """The cloud endpoint's capacity C (requests a second) and the share of it held back.

    One row (``id`` 1) once an operator has set it; the planner splits
    ``capacity * (1 - headroom)`` across devices.
    """

    __tablename__ = "cloud_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    capacity: Mapped[float] = mapped_column(Float)
    headroom: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str | None] = mapped_column(String(128))


class DeviceHybridStats(Base):
    """One device's windows of one UTC hour (of their end), summed per hybrid plan.

    ``plan_id`` is the plan the windows' hybrid sections name, or ``""`` for windows
    without one (a device with no plan yet). Every window counts ``windows``,
    ``requests``, ``seconds`` (its duration: the request rate is ``requests /
    seconds``) and its top-score histogram summed over classes (``scores``,
    :data:`protocol.summary.SCORE_BIN_COUNT` counts; ``score_classes`` how many classes
    the model has). The rest sums :class:`protocol.hybrid.HybridSummary`: the counts,
    ``cloud_errors`` by kind, latencies as sparse ``[cell, count]`` pairs in the rollout
    aggregates' fixed layout, ``confidence`` (:data:`protocol.hybrid.CONFIDENCE_BINS`
    counts). ``last_end`` is the end of the newest window folded in. Kept by ingest in
    the transaction that stores each window (:mod:`fleet_server.hybrid.aggregates`).
    """

    __tablename__ = "device_hybrid_stats"

    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    plan_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True, index=True)
    windows: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)
    last_end: Mapped[datetime] = mapped_column(UtcDateTime())
    score_classes: Mapped[int] = mapped_column(Integer)
    scores: Mapped[list[int]] = mapped_column(JSON)
    local: Mapped[int] = mapped_column(BigInteger)
    escalated: Mapped[int] = mapped_column(BigInteger)
    kept_local_quota: Mapped[int] = mapped_column(BigInteger)
    cloud_answered: Mapped[int] = mapped_column(BigInteger)
    audits: Mapped[int] = mapped_column(BigInteger)
    cloud_errors: Mapped[dict[str, Any]] = mapped_column()
    escalated_compared: Mapped[int] = mapped_column(BigInteger)
    escalated_agreements: Mapped[int] = mapped_column(BigInteger)
    audit_compared: Mapped[int] = mapped_column(BigInteger)
    audit_agreements: Mapped[int] = mapped_column(BigInteger)
    audit_confidence_sum: Mapped[float] = mapped_column(Float)
    local_latency: Mapped[list[list[int]]] = mapped_column(JSON)
    cloud_latency: Mapped[list[list[int]]] = mapped_column(JSON)
    confidence: Mapped[list[int]] = mapped_column(JSON)
