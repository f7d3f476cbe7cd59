"""telemetry ingested from MQTT: messages once by (device, epoch, seq), streams, rollups

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 13:00:00

``telemetry_messages`` (each telemetry and events message, keyed by the device's own epoch and seq, so a
redelivered one is stored once), ``telemetry_streams`` (per device epoch: the highest contiguous seq,
the highest seq and how many were received, for gaps), and per-window rollups: per device, model and
version (``telemetry_rollups``, latency histogram counts in columns ``lat00``..``lat15``), their class
counts (``telemetry_class_rollups``) and the device block (``telemetry_device_rollups``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import edgefleet.server.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_UTC = edgefleet.server.models.UTCDateTime


def _device_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "telemetry_messages",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.String(length=16), nullable=False),
        sa.Column("at", _UTC(timezone=True), nullable=False),
        sa.Column("received_at", _UTC(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        _device_fk(),
        sa.PrimaryKeyConstraint("device_id", "epoch", "seq"),
    )
    with op.batch_alter_table("telemetry_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_messages_received_at"), ["received_at"], unique=False)

    op.create_table(
        "telemetry_streams",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.String(length=16), nullable=False),
        sa.Column("contiguous", sa.BigInteger(), nullable=False),
        sa.Column("max_seq", sa.BigInteger(), nullable=False),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.Column("first_received_at", _UTC(timezone=True), nullable=False),
        sa.Column("last_received_at", _UTC(timezone=True), nullable=False),
        sa.Column("last_at", _UTC(timezone=True), nullable=True),
        _device_fk(),
        sa.PrimaryKeyConstraint("device_id", "epoch"),
    )
    with op.batch_alter_table("telemetry_streams", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_streams_last_received_at"), ["last_received_at"], unique=False)

    op.create_table(
        "telemetry_rollups",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum", sa.Double(), nullable=False),
        *(sa.Column(f"lat{i:02d}", sa.BigInteger(), nullable=False) for i in range(16)),
        sa.Column("drift_reports", sa.BigInteger(), nullable=False),
        sa.Column("drift_samples", sa.BigInteger(), nullable=False),
        sa.Column("psi_max", sa.Double(), nullable=True),
        sa.Column("psi_mean_wsum", sa.Double(), nullable=False),
        sa.Column("mean_shift_max", sa.Double(), nullable=True),
        sa.Column("std_ratio_max", sa.Double(), nullable=True),
        sa.Column("accuracy_wsum", sa.Double(), nullable=False),
        sa.Column("accuracy_window", sa.BigInteger(), nullable=False),
        _device_fk(),
        sa.PrimaryKeyConstraint("device_id", "model", "version", "bucket"),
    )
    with op.batch_alter_table("telemetry_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_rollups_bucket", ["bucket"], unique=False)
        batch_op.create_index("ix_telemetry_rollups_model_bucket", ["model", "version", "bucket"], unique=False)

    op.create_table(
        "telemetry_class_rollups",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        _device_fk(),
        sa.PrimaryKeyConstraint("device_id", "model", "version", "bucket", "label"),
    )
    with op.batch_alter_table("telemetry_class_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_class_rollups_bucket", ["bucket"], unique=False)
        batch_op.create_index("ix_telemetry_class_rollups_model_bucket", ["model", "version", "bucket"], unique=False)

    op.create_table(
        "telemetry_device_rollups",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
        sa.Column("cpu_percent_sum", sa.Double(), nullable=False),
        sa.Column("cpu_percent_max", sa.Double(), nullable=True),
        sa.Column("memory_rss_max", sa.BigInteger(), nullable=True),
        sa.Column("memory_percent_max", sa.Double(), nullable=True),
        sa.Column("temperature_max", sa.Double(), nullable=True),
        sa.Column("disk_free_min", sa.BigInteger(), nullable=True),
        sa.Column("queue_depth_max", sa.BigInteger(), nullable=True),
        sa.Column("dropped_max", sa.BigInteger(), nullable=True),
        sa.Column("uptime_max", sa.Double(), nullable=True),
        _device_fk(),
        sa.PrimaryKeyConstraint("device_id", "bucket"),
    )
    with op.batch_alter_table("telemetry_device_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_device_rollups_bucket", ["bucket"], unique=False)


def downgrade() -> None:
    for table in ("telemetry_device_rollups", "telemetry_class_rollups", "telemetry_rollups", "telemetry_streams",
                  "telemetry_messages"):
        op.drop_table(table)  # their indexes go with them
