"""alerts for retraining: per-model thresholds, alerts, webhooks and the durable delivery outbox

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 15:00:00

``alert_rules`` (an operator's thresholds per model), ``alerts`` (at most one open per model, version
and kind: a partial unique index), ``alert_devices`` (the devices that broke an open alert's
threshold), ``webhooks`` (endpoints and their signing secrets) and ``alert_deliveries`` (the outbox the
delivery worker retries from, so a delivery survives a restart).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import edgefleet.server.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UTC = edgefleet.server.models.UTCDateTime
_OPEN = sa.text("state = 'open'")


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("drift_psi_max", sa.Double(), nullable=True),
        sa.Column("drift_mean_shift_max", sa.Double(), nullable=True),
        sa.Column("accuracy_min", sa.Double(), nullable=True),
        sa.Column("min_samples", sa.Integer(), nullable=True),
        sa.Column("cooldown_s", sa.Integer(), nullable=True),
        sa.Column("updated_at", _UTC(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("worst", sa.Double(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("occurrences", sa.BigInteger(), nullable=False),
        sa.Column("raised_at", _UTC(timezone=True), nullable=False),
        sa.Column("last_at", _UTC(timezone=True), nullable=False),
        sa.Column("acked_at", _UTC(timezone=True), nullable=True),
        sa.Column("acked_by", sa.String(length=160), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("uq_alerts_open", ["model", "version", "kind"], unique=True, sqlite_where=_OPEN,
                              postgresql_where=_OPEN)
        batch_op.create_index("ix_alerts_key_raised", ["model", "version", "kind", "raised_at"], unique=False)
        batch_op.create_index("ix_alerts_state_id", ["state", "id"], unique=False)

    op.create_table(
        "alert_devices",
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("first_at", _UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("alert_id", "device_id"),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("description", sa.String(length=256), nullable=False),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("disabled_at", _UTC(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("webhook_id", sa.String(length=16), nullable=True),
        sa.Column("topic", sa.String(length=256), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _UTC(timezone=True), nullable=False),
        sa.Column("last_attempt_at", _UTC(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.Column("done_at", _UTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhooks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alert_deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alert_deliveries_alert_id"), ["alert_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_alert_deliveries_webhook_id"), ["webhook_id"], unique=False)
        batch_op.create_index("ix_alert_deliveries_due", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    for table in ("alert_deliveries", "webhooks", "alert_devices", "alerts", "alert_rules"):
        op.drop_table(table)  # their indexes go with them
