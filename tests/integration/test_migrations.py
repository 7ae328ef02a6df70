"""The models and the migrations describe the same schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

from triage.db import migrate
from triage.db.base import Base


def _diff(engine: Engine, metadata: sa.MetaData) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": migrate.include_object}
        )
        return list(compare_metadata(context, metadata))


def test_models_and_migrations_agree(engine: Engine) -> None:
    assert migrate.is_up_to_date(engine)
    assert _diff(engine, Base.metadata) == []


def test_the_comparison_sees_a_difference(engine: Engine) -> None:
    """A control: a column the migrations lack must show up, or the test above proves nothing."""
    metadata = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    metadata.tables["studies"].append_column(sa.Column("extra", sa.Integer()))
    diff = _diff(engine, metadata)
    assert [(d[0], d[3].name) for d in diff] == [("add_column", "extra")]


def test_downgrade_to_empty_and_back(engine: Engine) -> None:
    config = migrate.alembic_config(engine)
    command.downgrade(config, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(engine)
    assert _diff(engine, Base.metadata) == []


def test_the_worklist_reads_open_entries_in_index_order(engine: Engine) -> None:
    """Autogenerate cannot compare expression indexes, so this one is checked by name, and its
    use by the planner on PostgreSQL (bench/worklist measured 200 ms without it)."""
    names = {index["name"] for index in sa.inspect(engine).get_indexes("worklist_entries")}
    assert "ix_worklist_open_order" in names
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as connection:
        connection.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = (
            connection.execute(
                sa.text(
                    "EXPLAIN SELECT id FROM worklist_entries "
                    "WHERE reading_state IN ('unread', 'claimed') "
                    "ORDER BY tier_rank, score DESC LIMIT 50"
                )
            )
            .scalars()
            .all()
        )
    assert any("ix_worklist_open_order" in line for line in plan), plan
