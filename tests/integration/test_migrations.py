"""The models and the migrations describe the same schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

from triage.db import migrate
from triage.db.base import Base, utcnow


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


def test_instance_digests_keep_their_algorithm_across_0005(engine: Engine) -> None:
    """0005 renamed instances.sha256 to digest: SHA-256 rows get their algorithm's name, and a
    downgrade gives it back; a digest of another algorithm is never renamed SHA-256."""
    sha256 = "ab" * 32
    xxh3 = "xxh3-128:" + "cd" * 16
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO studies (id, study_uid, status, analysis_round,"
                " updated_at, first_received_at, last_received_at)"
                " VALUES (1, '1.2.3', 'receiving', 0, :now, :now, :now)"
            ),
            {"now": utcnow()},
        )
        connection.execute(
            sa.text(
                "INSERT INTO series (id, study_id, series_uid, created_at)"
                " VALUES (1, 1, '1.2.3.4', :now)"
            ),
            {"now": utcnow()},
        )
        for number, digest in ((1, "sha256:" + sha256), (2, xxh3)):
            connection.execute(
                sa.text(
                    "INSERT INTO instances (series_id, sop_instance_uid, version, sop_class_uid,"
                    " transfer_syntax_uid, file_id, size_bytes, digest, state, received_at)"
                    " VALUES (1, :uid, 1, '1.2', '1.2.840.10008.1.2.1', :file_id, 10, :digest,"
                    " 'stored', :now)"
                ),
                {"uid": f"1.2.3.4.{number}", "file_id": f"{number:032x}", "digest": digest,
                 "now": utcnow()},
            )  # fmt: skip

    def values(column: str) -> list[str]:
        instances = sa.table("instances", sa.column(column), sa.column("sop_instance_uid"))
        query = sa.select(instances.c[column]).order_by(instances.c.sop_instance_uid)
        with engine.connect() as connection:
            return list(connection.execute(query).scalars())

    command.downgrade(migrate.alembic_config(engine), "0004")
    assert values("sha256") == [sha256, xxh3]
    migrate.upgrade(engine)
    assert values("digest") == ["sha256:" + sha256, xxh3]
