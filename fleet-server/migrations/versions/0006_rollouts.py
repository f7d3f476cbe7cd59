"""staged rollouts: rollouts, their members, the controller lease, shadow assignments and rollups

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:30:00

``rollouts`` (a version rolled out in stages, with its gates and a fencing ``state_version``),
``rollout_members`` (the devices each selected at creation, their rank, arm, status and the assignment
an abort restores), ``controller_leases`` (which replica runs the rollout controller),
``assignments.shadow_version_id`` (a candidate a device runs beside its served version) and
``telemetry_shadow_rollups`` (shadow comparisons per device, served version, candidate and window).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import edgefleet.server.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_UTC = edgefleet.server.models.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shadow_version_id", sa.Integer(), nullable=True))
        batch_op.create_index("ix_assignments_shadow_version_id", ["shadow_version_id"], unique=False)
        batch_op.create_foreign_key("fk_assignments_shadow_version_id", "model_versions", ["shadow_version_id"],
                                    ["id"], ondelete="RESTRICT")
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("version_b_id", sa.Integer(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=8), nullable=False),
        sa.Column("stage_started_at", _UTC(timezone=True), nullable=False),
        sa.Column("phase_started_at", _UTC(timezone=True), nullable=False),
        sa.Column("state_version", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("last_gates", sa.JSON(), nullable=False),
        sa.Column("last_judged_at", _UTC(timezone=True), nullable=True),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("updated_at", _UTC(timezone=True), nullable=False),
        sa.Column("ended_at", _UTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["version_b_id"], ["model_versions.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollouts_version_id", "rollouts", ["version_id"], unique=False)
    op.create_index("ix_rollouts_model_state", "rollouts", ["model", "state"], unique=False)
    op.create_table(
        "rollout_members",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("arm", sa.String(length=1), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("previous_version_id", sa.Integer(), nullable=True),
        sa.Column("previous_source", sa.String(length=32), nullable=True),
        sa.Column("assigned_at", _UTC(timezone=True), nullable=True),
        sa.Column("updated_at", _UTC(timezone=True), nullable=True),
        sa.Column("detail", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["previous_version_id"], ["model_versions.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_index("ix_rollout_members_device_id", "rollout_members", ["device_id"], unique=False)
    op.create_table(
        "controller_leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", _UTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "telemetry_shadow_rollups",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("candidate", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("compared", sa.BigInteger(), nullable=False),
        sa.Column("agreed", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("abs_error_sum", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "model", "version", "candidate", "bucket"),
    )
    op.create_index("ix_telemetry_shadow_rollups_candidate_bucket", "telemetry_shadow_rollups",
                    ["model", "candidate", "bucket"], unique=False)
    op.create_index("ix_telemetry_shadow_rollups_bucket", "telemetry_shadow_rollups", ["bucket"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_telemetry_shadow_rollups_bucket", table_name="telemetry_shadow_rollups")
    op.drop_index("ix_telemetry_shadow_rollups_candidate_bucket", table_name="telemetry_shadow_rollups")
    op.drop_table("telemetry_shadow_rollups")
    op.drop_table("controller_leases")
    op.drop_index("ix_rollout_members_device_id", table_name="rollout_members")
    op.drop_table("rollout_members")
    op.drop_index("ix_rollouts_model_state", table_name="rollouts")
    op.drop_index("ix_rollouts_version_id", table_name="rollouts")
    op.drop_table("rollouts")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_constraint("fk_assignments_shadow_version_id", type_="foreignkey")
        batch_op.drop_index("ix_assignments_shadow_version_id")
        batch_op.drop_column("shadow_version_id")
