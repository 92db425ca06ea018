"""device and release lifecycle: decommissioned devices, yanked releases

A decommissioned device keeps its row (its events, windows, assignments and
audit entries name it) with ``decommissioned_at`` set and no credential; a
yanked release keeps its row with ``yanked_at`` and the reason given.

Revision ID: 0007
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("decommission_reason", sa.String(length=500)))
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("yanked_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("yank_reason", sa.String(length=500)))


def downgrade() -> None:
    # The older schema knows neither state: a decommissioned device shows as registered
    # again (still without a credential, so it cannot authenticate) and a yanked release
    # becomes assignable again.
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_column("yank_reason")
        batch_op.drop_column("yanked_at")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("decommission_reason")
        batch_op.drop_column("decommissioned_at")
