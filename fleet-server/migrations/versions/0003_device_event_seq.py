"""device events under one sequence per device, and the device's reported update state

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:30:00

``device_events.seq`` (the device's own event number; NULL from older agents) with a unique index on
(device_id, seq) where seq is not null, so a retried report stores each event once;
``devices.update_state``, the last update block a device reported (JSON).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_HAS_SEQ = sa.text("seq IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("update_state", sa.JSON(), nullable=True))
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.create_index("uq_device_events_device_seq", ["device_id", "seq"], unique=True,
                              sqlite_where=_HAS_SEQ, postgresql_where=_HAS_SEQ)


def downgrade() -> None:
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.drop_index("uq_device_events_device_seq")
        batch_op.drop_column("seq")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("update_state")
