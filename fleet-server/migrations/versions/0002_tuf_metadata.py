"""tuf metadata: every version of every role of the image (and later director) repositories

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import edgefleet.server.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tuf_metadata",
        sa.Column("repo", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("expires", edgefleet.server.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", edgefleet.server.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("repo", "role", "version"),
    )


def downgrade() -> None:
    op.drop_table("tuf_metadata")
