"""Core statements compiled once per dialect and run on the DBAPI cursor directly.

SQLAlchemy's execution path (execution context, events, result objects) costs about 0.1 ms a
statement here; the ingest path (``triage/ingest/index.py``) runs three statements per new
instance before it may answer the sender. A ``Prepared`` statement is compiled once per dialect
and its parameters go through the column types' own bind processors, so the database sees
exactly what SQLAlchemy would send. An INSERT or UPDATE sets the columns its parameters name
(compiled once per set of names). Defaults are not filled in: every parameter the statement
names must be given, a name it does not take is an error, and there are no expanding (IN list)
parameters. DBAPI errors come out as SQLAlchemy's (IntegrityError, OperationalError, ...), as
from Core, without the parameters in their message (they may hold patient data).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence, Set
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
    """``statement``, compiled for each dialect and each set of parameter names it is run with."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, frozenset[str]], _Compiled] = {}
        self._lock = threading.Lock()

    def _for(self, dialect: Dialect, given: Set[str]) -> _Compiled:
        key = (dialect.name, frozenset(given))
        compiled = self._compiled.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(key) or self._compile(dialect, key[1])
                self._compiled[key] = compiled
        return compiled

    def _compile(self, dialect: Dialect, given: frozenset[str]) -> _Compiled:
        compiled: Any = self.statement.compile(dialect=dialect, column_keys=sorted(given))
        names = tuple(compiled.positiontup) if dialect.positional else tuple(compiled.binds)
        unknown = given - set(names)
        if unknown:
            raise KeyError(f"not parameters of the statement: {', '.join(sorted(unknown))}")
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
        compiled = self._for(dialect, values.keys())
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
