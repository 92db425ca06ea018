"""rollouts: per-device hourly window aggregates, rollouts, the devices they reached, their
evaluations

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_hour_stats",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
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
        # A version's rows of a time range lie together: what a tick reads.
        sa.PrimaryKeyConstraint("model_name", "model_version", "hour", "device_id"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("release_name", sa.String(length=64), nullable=False),
        sa.Column("release_version", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_phase"), ["phase"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_rollouts_release_name"), ["release_name"], unique=False
        )
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("previous_target", sa.String(length=512), nullable=True),
        sa.Column("previous_bundle", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_table(
        "rollout_evaluations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "at"),
    )


def downgrade() -> None:
    op.drop_table("rollout_evaluations")
    op.drop_table("rollout_devices")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollouts_release_name"))
        batch_op.drop_index(batch_op.f("ix_rollouts_phase"))
    op.drop_table("rollouts")
    op.drop_table("device_hour_stats")
