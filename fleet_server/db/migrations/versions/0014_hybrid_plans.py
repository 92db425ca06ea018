"""hybrid inference: each device's weight and opt-out, its current plan, the cloud's capacity

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("hybrid_weight", sa.Float(), nullable=False, server_default="1.0")
        )
        batch.add_column(
            sa.Column("offload_opt_out", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "hybrid_plans",
        sa.Column(
            "device_id",
            sa.String(length=128),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("plan_id", sa.String(length=128), nullable=False, unique=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("quota_rate", sa.Float(), nullable=False),
        sa.Column("quota_burst", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
    )
    op.create_table(
        "cloud_settings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("capacity", sa.Float(), nullable=False),
        sa.Column("headroom", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("cloud_settings")
    op.drop_table("hybrid_plans")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("offload_opt_out")
        batch.drop_column("hybrid_weight")
