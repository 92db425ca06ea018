"""labels: delayed labels per window; accuracy alerts, which have no feature

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_labels",
        sa.Column("window_id", sa.String(length=128), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("correct", sa.BigInteger(), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("posted_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["window_id"], ["windows.window_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("window_id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.alter_column("feature", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM alerts WHERE feature IS NULL")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.alter_column("feature", existing_type=sa.Integer(), nullable=False)
    op.drop_table("window_labels")
