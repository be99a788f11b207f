"""The control plane's hottest statements, compiled once and run on the driver's own cursor.

A `Statement` is an ordinary SQLAlchemy Core statement (a select, or an insert/update with RETURNING) that
SQLAlchemy compiles once per dialect: its SQL text, the order of its parameters, and each column's bind and
result processors (a JSON column parsed on SQLite, a datetime made UTC-aware) come from SQLAlchemy's own type
system. Running it then skips what SQLAlchemy does on every execution — the Session's and Connection's
bookkeeping, the cache-key walk, the result proxy — which measured ~0.2 ms of CPU per statement on
PostgreSQL, as much as the driver's own work for a one-row read. Every web request and every lease renewal runs
two or three of these, so that is the difference between the API keeping up with a plain psycopg view or not
(benchmark 07).

Only statements whose SQL text is fixed qualify: no expanding `IN` lists, no column defaults computed in
Python (give every column a value), refused when compiled. Errors come out as SQLAlchemy's: a connection the
server dropped is handed to SQLAlchemy to invalidate the pool and raise its usual DBAPIError with
`connection_invalidated`, which callers already handle.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable


@dataclass(frozen=True)
class _Compiled:
    sql: str
    bind: Callable[[Mapping[str, Any]], Any]
    make_row: Callable[[tuple], Any] | None  # None: the statement returns no rows


class Statement:
    """A Core statement run straight on the driver (see the module's docstring). Thread-safe; build at import."""

    def __init__(self, name: str, statement: Executable | Callable[[str], Executable]) -> None:
        """`statement`, or a function of the dialect's name that builds it (for SQL that differs by backend)."""
        self.name = name
        self._build = statement if callable(statement) and not isinstance(statement, Executable) else None
        self._statements: dict[str, Executable] = {}
        self._statement = None if self._build else statement
        self._compiled: dict[str, _Compiled] = {}  # by dialect name; a race compiles twice, harmlessly

    def statement_for(self, dialect_name: str) -> Executable:
        """The Core statement this runs on the named dialect."""
        if self._build is None:
            return self._statement
        if dialect_name not in self._statements:
            self._statements[dialect_name] = self._build(dialect_name)
        return self._statements[dialect_name]

    def all(self, conn: Connection, **params: Any) -> list[Any]:
        """Every row, as named tuples with the columns' keys."""
        return self._run(conn, params)

    def first(self, conn: Connection, **params: Any) -> Any | None:
        rows = self._run(conn, params)
        return rows[0] if rows else None

    def rowcount(self, conn: Connection, **params: Any) -> int:
        """Run a statement without RETURNING; how many rows it changed."""
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        return self._execute(conn, compiled, params, lambda cursor: cursor.rowcount)

    def executemany(self, conn: Connection, rows: list[Mapping[str, Any]]) -> None:
        """Run a statement without RETURNING once per parameter set, as the driver batches it (psycopg
        pipelines the rows: one round trip)."""
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        bound = [compiled.bind(row) for row in rows]
        self._execute(conn, compiled, rows[0] if rows else {}, lambda cursor: None, many=bound)

    def _run(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        make_row = compiled.make_row
        if make_row is None:
            raise TypeError(f"statement {self.name} returns no rows; use rowcount()")
        rows = self._execute(conn, compiled, params, lambda cursor: cursor.fetchall())
        return [make_row(row) for row in rows]

    def _execute(self, conn: Connection, compiled: _Compiled, params: Mapping[str, Any], fetch: Callable, *,
                 many: list | None = None) -> Any:
        dialect = conn.dialect
        driver = conn.connection.driver_connection
        cursor = driver.cursor()
        try:
            if many is not None:
                cursor.executemany(compiled.sql, many)
            else:
                cursor.execute(compiled.sql, compiled.bind(params))
            return fetch(cursor)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, driver, cursor):
                # Dead connection: let SQLAlchemy fail on it too, which invalidates the pool and raises its
                # DBAPIError(connection_invalidated=True). Nothing ran, so running it there cannot run it twice.
                conn.execute(self.statement_for(dialect.name), dict(params))
            raise DBAPIError.instance(compiled.sql, dict(params), exc, dialect.loaded_dbapi.Error,
                                      dialect=dialect) from exc
        finally:
            cursor.close()

    def _compile(self, dialect: Dialect) -> _Compiled:
        statement = self.statement_for(dialect.name)
        compiled = statement.compile(dialect=dialect)
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise ValueError(f"statement {self.name}: its SQL depends on its parameters (IN lists, literals)")
        if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
            names = [c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch)]
            raise ValueError(f"statement {self.name}: give {names} explicitly (their defaults run in Python)")
        binds = []
        for name in (compiled.positiontup if dialect.positional else compiled.binds):
            param = compiled.binds[name]
            processor = param.type.dialect_impl(dialect).bind_processor(dialect)
            fixed = None if param.required else param.effective_value  # a literal in the statement
            binds.append((name, compiled.escaped_bind_names.get(name, name), param.key, param.required, fixed,
                          processor))

        def bind(params: Mapping[str, Any]) -> Any:
            values = []
            for _name, _escaped, key, required, fixed, processor in binds:
                value = params[key] if required else params.get(key, fixed)
                values.append(processor(value) if processor is not None else value)
            if dialect.positional:
                return values
            return {escaped: value for (_n, escaped, *_), value in zip(binds, values, strict=True)}

        compiled_sql = compiled.string
        columns = list(getattr(statement, "exported_columns", ()) or ())
        make_row = None
        if columns:
            row_type = namedtuple(f"{self.name}_row", [c.key for c in columns])  # type: ignore[misc]
            processors = [(i, p) for i, c in enumerate(columns)
                          if (p := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None]
            if not processors:
                make_row = row_type._make
            else:
                def make_row(raw: tuple, _make=row_type._make, _processors=processors) -> Any:
                    values = list(raw)
                    for i, processor in _processors:
                        values[i] = processor(values[i])
                    return _make(values)
        result = _Compiled(sql=compiled_sql, bind=bind, make_row=make_row)
        self._compiled[dialect.name] = result
        return result
