"""device_hour_stats.received_hour: what arrives after its hour ended goes to a row of its own

A row of a received hour that has ended never changes again, so a rollout tick keeps
the sums of those rows and reads only the hour still open. Existing rows count as
received in their own hour.

Revision ID: 0013
Revises: 0012
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_SUMS = (
    "windows",
    "requests",
    "fallbacks",
    "errors",
    "unsummarised_requests",
    "latency_zero",
    "latency_sum",
    "labelled_rows",
    "labelled_correct",
    "shadow_requests",
    "shadow_agreements",
    "shadow_errors",
)
_VALUES = (
    *_SUMS,
    "latency_min",
    "latency_max",
    "latency",
    "score_classes",
    "scores",
    "shadow_latency",
)
_KEY = ("model_name", "model_version", "hour", "device_id")


def _table(name: str, received: bool) -> None:
    key = [*_KEY, "received_hour"] if received else list(_KEY)
    op.create_table(
        name,
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        *([sa.Column("received_hour", sa.DateTime(timezone=True), nullable=False)] * received),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("fallbacks", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("unsummarised_requests", sa.BigInteger(), nullable=False),
        sa.Column("latency_zero", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum", sa.Float(), nullable=False),
        sa.Column("latency_min", sa.Float(), nullable=True),
        sa.Column("latency_max", sa.Float(), nullable=True),
        sa.Column("latency", sa.LargeBinary(), nullable=False),
        sa.Column("score_classes", sa.Text(), nullable=True),
        sa.Column("scores", sa.LargeBinary(), nullable=False),
        sa.Column("labelled_rows", sa.BigInteger(), nullable=False),
        sa.Column("labelled_correct", sa.BigInteger(), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            for name in ("shadow_requests", "shadow_agreements", "shadow_errors")
        ),
        sa.Column("shadow_latency", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint(*key, name=f"pk_{name}"),
    )


def upgrade() -> None:
    _table("device_hour_stats_0013", received=True)
    columns = ", ".join([*_KEY, *_VALUES])
    op.execute(
        f"INSERT INTO device_hour_stats_0013 ({columns}, received_hour) "
        f"SELECT {columns}, hour FROM device_hour_stats"
    )
    op.drop_table("device_hour_stats")
    op.rename_table("device_hour_stats_0013", "device_hour_stats")
    op.create_index(
        "ix_device_hour_stats_received",
        "device_hour_stats",
        ["model_name", "model_version", "received_hour", "hour"],
    )


def downgrade() -> None:
    # Rows of one hour received at different hours are summed back into one: histogram
    # pairs concatenate (two rows' pairs are their sum's), counts add.
    bind = op.get_bind()
    rows = bind.execute(sa.text(f"SELECT {', '.join([*_KEY, *_VALUES])} FROM device_hour_stats"))
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows.mappings():
        key = tuple(row[k] for k in _KEY)
        into = merged.get(key)
        if into is None:
            merged[key] = dict(row)
            continue
        for name in _SUMS:
            into[name] += row[name]
        for name, pick in (("latency_min", min), ("latency_max", max)):
            both = [v for v in (into[name], row[name]) if v is not None]
            into[name] = pick(both) if both else None
        into["latency"] = bytes(into["latency"]) + bytes(row["latency"])
        shadow = [
            bytes(v) for v in (into["shadow_latency"], row["shadow_latency"]) if v is not None
        ]
        into["shadow_latency"] = b"".join(shadow) if shadow else None
        if into["score_classes"] is None:
            into["score_classes"], into["scores"] = row["score_classes"], row["scores"]
        elif row["score_classes"] == into["score_classes"]:
            into["scores"] = bytes(into["scores"]) + bytes(row["scores"])
    op.drop_index("ix_device_hour_stats_received", table_name="device_hour_stats")
    op.drop_table("device_hour_stats")
    _table("device_hour_stats", received=False)
    if merged:
        table = sa.table("device_hour_stats", *(sa.column(c) for c in (*_KEY, *_VALUES)))
        op.bulk_insert(table, list(merged.values()))
