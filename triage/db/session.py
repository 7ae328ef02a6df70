"""Engine and session scope. Engines are built from Settings at start, never at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]


def create_db_engine(url: str, *, rebuildable: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite gets WAL, full fsync on commit and enforced foreign keys,
    so a committed row survives a power cut as the spool file beside it does.

    ``rebuildable``: every row committed through this engine can be rebuilt from a spool file
    (start-up reconciliation indexes files that have no row), so on SQLite its commits are not
    flushed one by one (synchronous=NORMAL, still atomic and safe from a crash of the process).
    A power cut may take the last of them, never a file; the next start indexes those files
    again. Any later full commit (a job, an audit event) flushes them too. The ingest path
    uses it. PostgreSQL commits are flushed either way.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        synchronous = "NORMAL" if rebuildable else "FULL"
        event.listen(
            engine, "connect", lambda connection, _record: _sqlite_pragmas(connection, synchronous)
        )
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, synchronous: str) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: SessionFactory) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
