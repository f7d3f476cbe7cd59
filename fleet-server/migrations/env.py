"""Alembic environment: the engine comes from ``config.attributes['engine']`` (see ``db.migrate``)."""

from __future__ import annotations

from alembic import context

from edgefleet.server.models import Base

target_metadata = Base.metadata


def run() -> None:
    engine = context.config.attributes["engine"]
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
