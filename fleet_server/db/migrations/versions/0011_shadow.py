"""shadow installs: a device's shadow release and its rollout; the shadow sections of windows
in the hourly aggregates

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_COUNTS = ("shadow_requests", "shadow_agreements", "shadow_errors")


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("shadow_target", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("shadow_rollout", sa.String(length=64), nullable=True))
    with op.batch_alter_table("device_hour_stats") as batch:
        for name in _COUNTS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("shadow_latency", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_hour_stats") as batch:
        batch.drop_column("shadow_latency")
        for name in reversed(_COUNTS):
            batch.drop_column(name)
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("shadow_rollout")
        batch.drop_column("shadow_target")
