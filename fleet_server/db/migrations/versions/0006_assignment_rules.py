"""assignment rules: tag assignments that apply to devices gaining the tag; cancelling

Assignments made before this revision are neither from a rule nor cancelled.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assignment_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("target_path", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["target_path"], ["releases.target_path"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_assignment_rules_tag"), "assignment_rules", ["tag"], unique=False)
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("cancelled_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("cancelled_by")
        batch_op.drop_column("cancelled_at")
        batch_op.drop_column("rule_id")
    op.drop_index(op.f("ix_assignment_rules_tag"), table_name="assignment_rules")
    op.drop_table("assignment_rules")
