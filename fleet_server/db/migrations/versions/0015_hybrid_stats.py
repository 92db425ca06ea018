"""hybrid inference: each device's windows summed per plan and hour (rate, confidence, offload)

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_COUNTS = (
    "windows",
    "requests",
    "local",
    "escalated",
    "kept_local_quota",
    "cloud_answered",
    "audits",
    "escalated_compared",
    "escalated_agreements",
    "audit_compared",
    "audit_agreements",
)


def upgrade() -> None:
    op.create_table(
        "device_hybrid_stats",
        sa.Column(
            "device_id",
            sa.String(length=128),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("plan_id", sa.String(length=128), primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTS),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("last_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("score_classes", sa.Integer(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("cloud_errors", sa.JSON(), nullable=False),
        sa.Column("audit_confidence_sum", sa.Float(), nullable=False),
        sa.Column("local_latency", sa.JSON(), nullable=False),
        sa.Column("cloud_latency", sa.JSON(), nullable=False),
        sa.Column("confidence", sa.JSON(), nullable=False),
    )
    op.create_index("ix_device_hybrid_stats_hour", "device_hybrid_stats", ["hour"])


def downgrade() -> None:
    op.drop_index("ix_device_hybrid_stats_hour", table_name="device_hybrid_stats")
    op.drop_table("device_hybrid_stats")
