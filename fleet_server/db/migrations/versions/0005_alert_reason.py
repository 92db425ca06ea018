"""alert reason: which test of a feature found drift (distribution, missing-values, ...)

Drift alerts opened before this revision were all found by the test on the
bins: they get the reason ``distribution``.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(length=32), nullable=True))
    op.execute("UPDATE alerts SET reason = 'distribution' WHERE kind = 'drift'")


def downgrade() -> None:
    # Alerts of the tests the older schema does not know cannot be kept apart from its own.
    op.execute("DELETE FROM alerts WHERE kind = 'drift' AND reason <> 'distribution'")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("reason")
