"""Core statements compiled once per dialect and run on the DBAPI cursor directly.

SQLAlchemy's execution path (execution context, events, result objects) costs about 0.1 ms a
statement here; the ingest path runs five statements per received instance, before it may
answer the sender. A ``Prepared`` statement is compiled once per dialect and its parameters go
through the column types' own bind processors, so the database sees exactly what SQLAlchemy
would send. Defaults are not filled in: every parameter the statement names must be given, and
there are no expanding (IN list) parameters. DBAPI errors come out as SQLAlchemy's
(IntegrityError, OperationalError, ...), as from Core, without the parameters in their message
(they may hold patient data).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind parameters, in the order of a positional paramstyle
    positional: bool
    processors: dict[str, Callable[[Any], Any]]

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        bound = {}
        for name in self.names:
            value = values[name]
            processor = self.processors.get(name)
            bound[name] = processor(value) if processor is not None else value
        return [bound[name] for name in self.names] if self.positional else bound


class Prepared:
    """``statement`` (with ``column_keys`` for an INSERT or UPDATE that sets those columns)."""

    def __init__(self, statement: ClauseElement, *, column_keys: Sequence[str] = ()) -> None:
        self.statement = statement
        self.column_keys = list(column_keys)
        self._compiled: dict[str, _Compiled] = {}
        self._lock = threading.Lock()

    def _for(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(dialect.name) or self._compile(dialect)
                self._compiled[dialect.name] = compiled
        return compiled

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled: Any = self.statement.compile(
            dialect=dialect, column_keys=self.column_keys or None
        )
        names = tuple(compiled.positiontup) if dialect.positional else tuple(compiled.binds)
        processors = {}
        for name in names:
            type_ = compiled.binds[name].type
            processor = type_.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        return _Compiled(str(compiled), names, bool(dialect.positional), processors)

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> Any:
        """Run on ``connection``'s DBAPI connection (in its transaction); the DBAPI cursor."""
        dialect = connection.dialect
        compiled = self._for(dialect)
        parameters = compiled.parameters(values)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.sql, parameters)
        except dialect.loaded_dbapi.Error as exc:
            cursor.close()
            raise DBAPIError.instance(
                compiled.sql, parameters, exc, dialect.loaded_dbapi.Error, hide_parameters=True
            ) from exc
        return cursor

    def rows(self, connection: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        cursor = self.execute(connection, values)
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def run(self, connection: Connection, values: Mapping[str, Any]) -> None:
        self.execute(connection, values).close()
