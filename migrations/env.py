"""Alembic environment: runs on the engine triage hands over (see triage.db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from triage.db import models  # noqa: F401  (registers the tables)
from triage.db.base import Base
from triage.db.migrate import include_object

config = context.config
engine = config.attributes["engine"]
assert isinstance(engine, Engine), "run migrations through triage.db.migrate"

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
