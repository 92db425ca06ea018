"""grouped alerts: one drift alert per scope and model version listing its features; silences
and acknowledgements

Open drift alerts stored one per (scope, model version, feature, test) are merged into one
alert per (scope, model version): the oldest keeps its id, its evidence lists every feature
and test of the merged ones (``merged_alerts`` names the ids folded into it), and the others
are removed. Closed alerts stay as they were stored and are shown that way.

Revision ID: 0008
Revises: 0005
"""

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The evidence fields that describe the merged windows rather than one test.
_WINDOW_FIELDS = (
    "baseline_id",
    "windows",
    "window_ids",
    "start",
    "end",
    "min_n",
    "false_alarm_rate",
)

_alerts = sa.table(
    "alerts",
    sa.column("id", sa.BigInteger()),
    sa.column("kind", sa.String()),
    sa.column("scope", sa.String()),
    sa.column("scope_value", sa.String()),
    sa.column("model_name", sa.String()),
    sa.column("model_version", sa.String()),
    sa.column("feature", sa.Integer()),
    sa.column("feature_name", sa.String()),
    sa.column("reason", sa.String()),
    sa.column("state", sa.String()),
    sa.column("open_key", sa.String()),
    sa.column("opened_at", sa.DateTime(timezone=True)),
    sa.column("last_seen_at", sa.DateTime(timezone=True)),
    sa.column("closed_at", sa.DateTime(timezone=True)),
    sa.column("evidence", sa.JSON()),
)


def _scope(row: Any) -> str:
    return f"{row.scope}:{row.scope_value}" if row.scope_value else row.scope


def _group_key(row: Any) -> str:
    return f"drift|{_scope(row)}|{row.model_name}@{row.model_version}"


def _merge(rows: list[Any]) -> dict[str, Any]:
    """The grouped evidence of one scope and model version's open per-feature alerts."""
    latest = max(rows, key=lambda r: (r.last_seen_at, r.id))
    features: dict[int, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r.feature, r.reason or "")):
        reason = row.reason or "distribution"
        test = {k: v for k, v in (row.evidence or {}).items() if k not in _WINDOW_FIELDS}
        test["reason"] = reason
        entry = features.setdefault(
            row.feature, {"feature": row.feature, "name": row.feature_name, "tests": {}}
        )
        entry["tests"][reason] = test
    merged = {k: (latest.evidence or {}).get(k) for k in _WINDOW_FIELDS}
    return merged | {
        "verdict": "drift",
        "features": [e | {"reasons": sorted(e["tests"])} for _, e in sorted(features.items())],
        "merged_alerts": sorted(r.id for r in rows),
    }


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acknowledged_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("acknowledge_comment", sa.Text(), nullable=True))
    op.create_table(
        "silences",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("scope", sa.String(length=16), nullable=True),
        sa.Column("scope_value", sa.String(length=128), nullable=True),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expired_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_silences_ends_at"), ["ends_at"], unique=False)

    bind = op.get_bind()
    legacy = bind.execute(
        sa.select(_alerts).where(
            _alerts.c.kind == "drift",
            _alerts.c.open_key.is_not(None),
            _alerts.c.feature.is_not(None),
        )
    ).all()
    groups: dict[str, list[Any]] = defaultdict(list)
    for row in legacy:
        groups[_group_key(row)].append(row)
    for key, rows in groups.items():
        keep = min(rows, key=lambda r: r.id)
        others = [r.id for r in rows if r.id != keep.id]
        if others:
            # First, so the kept row may take the group's key without a clash.
            bind.execute(sa.delete(_alerts).where(_alerts.c.id.in_(others)))
        bind.execute(
            sa.update(_alerts)
            .where(_alerts.c.id == keep.id)
            .values(
                feature=None,
                feature_name=None,
                reason=None,
                open_key=key,
                opened_at=min(r.opened_at for r in rows),
                last_seen_at=max(r.last_seen_at for r in rows),
                evidence=_merge(rows),
            )
        )


def downgrade() -> None:
    # Open grouped drift alerts go back to one per feature and test, so the older server
    # keeps evaluating and closing them; closed ones stay (it shows them without a feature).
    bind = op.get_bind()
    grouped = bind.execute(
        sa.select(_alerts).where(
            _alerts.c.kind == "drift",
            _alerts.c.open_key.is_not(None),
            _alerts.c.feature.is_(None),
        )
    ).all()
    for row in grouped:
        evidence = row.evidence or {}
        windows = {k: evidence.get(k) for k in _WINDOW_FIELDS}
        tests = [
            (f, reason, test)
            for f in evidence.get("features") or []
            for reason, test in sorted((f.get("tests") or {}).items())
        ]
        bind.execute(sa.delete(_alerts).where(_alerts.c.id == row.id))
        for i, (f, reason, test) in enumerate(tests):
            key = f"{row.open_key}|{f['feature']}"
            values = {
                "kind": "drift",
                "scope": row.scope,
                "scope_value": row.scope_value,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "feature": f["feature"],
                "feature_name": f.get("name"),
                "reason": reason,
                "state": "open",
                "open_key": key if reason == "distribution" else f"{key}|{reason}",
                "opened_at": row.opened_at,
                "last_seen_at": row.last_seen_at,
                "closed_at": None,
                "evidence": test | windows,
            }
            if i == 0:
                values["id"] = row.id
            bind.execute(sa.insert(_alerts).values(**values))
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_silences_ends_at"))
    op.drop_table("silences")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("acknowledge_comment")
        batch_op.drop_column("acknowledged_by")
        batch_op.drop_column("acknowledged_at")
