"""The hot path's statements, compiled once and sent straight to psycopg.

A worker's own single-statement writes (a checkpoint, a heartbeat, a run's
outcome, a claim) are Core statements built in ``_sql_worker``. Sent through
SQLAlchemy's execution layer, each paid about a quarter of a millisecond of
Python (compiled-cache lookup, execution context, result set-up, events, and
the AUTOCOMMIT isolation switch on checkout and return), several times what the
round trip costs the server. Here each such statement is compiled once per
dialect into the SQL string psycopg takes, and executed on a pooled
connection's psycopg connection directly, as a server-side prepared statement
(unless the connection opted out with ``prepare_threshold=None``, which
psycopg honours, e.g. behind a transaction-mode pooler), with its rows
returned as light named tuples.

Only statements that need little from SQLAlchemy at execution time qualify:
their bind processors (e.g. Boolean's) are applied here, but a statement with
result processors or expanding parameters is not taken (our hot statements
carry JSON as text, and everything else is a type psycopg adapts itself).
Any other statement, or any engine with a ``before_cursor_execute`` /
``after_cursor_execute`` listener (instrumentation such as OpenTelemetry's
SQLAlchemy integration expects to see every statement), keeps the ordinary
SQLAlchemy path: ``prepared`` returns None and the caller uses a Connection.

Errors come back wrapped the way SQLAlchemy wraps them (``DBAPIError.instance``,
``connection_invalidated`` set when the connection was lost and invalidated),
so callers and users catch the same exceptions on either path.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement, Executable, sqltypes
from sqlalchemy.util import greenlet_spawn


@dataclass(slots=True)
class Prepared:
    """One statement compiled for psycopg: its SQL, the values of its literal
    parameters, and (once seen) the named-tuple class of its rows."""

    sql: str
    defaults: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]  # bind processors (e.g. Boolean's), by name
    row: Any = field(default=None)  # type[NamedTuple], built from the first result

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        bound = {**self.defaults, **given} if self.defaults else dict(given)
        for name, process in self.processors.items():
            if name in bound:
                bound[name] = process(bound[name])
        return bound

    def rows(self, cursor: Any, fetched: list[tuple[Any, ...]]) -> list[Any]:
        """``fetched`` as named tuples (the names are read from the first cursor)."""
        if self.row is None:
            names = [column.name for column in cursor.description]
            self.row = namedtuple("Row", names)  # type: ignore[misc]
        make = self.row._make
        return [make(values) for values in fetched]


# A result row: SQLAlchemy's ``Row``, or a named tuple from this module; either
# is read by attribute (``row.owned``).
Record: TypeAlias = Any

_NOT_ELIGIBLE = Prepared("", {}, {})  # cached for statements that need SQLAlchemy's layer
_cache: dict[tuple[int, type[Dialect]], tuple[ClauseElement, Prepared]] = {}


def _processes_results(type_: Any, dialect: Dialect) -> bool:
    try:
        return type_._cached_result_processor(dialect, None) is not None
    except Exception:  # a processor chosen by the column's type code (Numeric): unknown here
        return True


_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


def _compile(statement: ClauseElement, dialect: Dialect) -> Prepared:
    compiled = statement.compile(dialect=dialect)
    if (
        getattr(compiled, "literal_execute_params", None)
        or getattr(compiled, "post_compile_params", None)
        or any(
            _processes_results(type_, dialect)
            for *_, type_ in getattr(compiled, "_result_columns", ())
        )
    ):
        return _NOT_ELIGIBLE
    binds: dict[str, Any] = getattr(compiled, "binds", {})
    defaults: dict[str, Any] = {}
    constants: dict[str, str] = {}
    for name, value in compiled.params.items():
        bind = binds.get(name)
        if bind is None or bind.required:
            continue
        constant = _literal(bind, value, dialect)
        if constant is None:
            defaults[name] = value
        else:
            constants[name] = constant

    # A list travels best in binary: psycopg's text format quotes and escapes
    # every item in Python.
    arrays = {name for name, bind in binds.items() if isinstance(bind.type, sqltypes.ARRAY)}

    def inline(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in constants:
            return constants[name]
        return f"%({name})b" if name in arrays else match.group(0)

    # One pass over the compiled text: a constant's own text (say "%%(x)s") is
    # never searched again, and an escaped "%%" is left as it is.
    sql = _PLACEHOLDER.sub(inline, compiled.string)
    processors = {
        name: process
        for name, process in getattr(compiled, "_bind_processors", {}).items()
        if f"%({name})s" in sql or f"%({name})b" in sql
    }
    return Prepared(sql, defaults, processors)


def _literal(bind: Any, value: Any, dialect: Dialect) -> str | None:
    """A constant (an anonymous parameter with its value: ``literal(1)``,
    ``column == "x"``) as SQL text, or None to keep it a parameter.

    Written into the statement, it is one parameter fewer for psycopg to adapt
    on every execution, and a generic plan of the prepared statement sees it (a
    partial index whose predicate names it stays usable)."""
    if not bind.unique or value is None or callable(value):
        return None
    render = bind.type.literal_processor(dialect)
    if render is None:
        return None
    # For a pyformat dialect (psycopg), SQLAlchemy's literal rendering already
    # doubles "%", as psycopg's placeholders need.
    return str(render(value))


def prepared(statement: Executable, bind: Any) -> Prepared | None:
    """``statement`` compiled for ``bind`` (an engine or a connection, sync or
    async), or None where it must go through SQLAlchemy: a statement that needs
    type processing, a driver other than psycopg, or a bind whose cursor events
    someone listens to."""
    # An AsyncEngine's or AsyncConnection's events live on its sync twin.
    bind = getattr(bind, "sync_engine", None) or getattr(bind, "sync_connection", None) or bind
    dialect = bind.dialect
    if dialect.driver != "psycopg" or not isinstance(statement, ClauseElement):
        return None
    dispatch = bind.dispatch
    if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
        return None
    key = (id(statement), type(dialect))
    found = _cache.get(key)
    if found is None:
        # Kept with its statement, whose id then stays its own. Two threads may
        # both compile a statement the first time: the same result either way.
        found = _cache[key] = (statement, _compile(statement, dialect))
    result = found[1]
    return None if result is _NOT_ELIGIBLE else result


def wrap(error: psycopg.Error, statement: Prepared, params: Mapping[str, Any], lost: bool) -> Any:
    """The SQLAlchemy exception SQLAlchemy itself would raise for ``error``."""
    return sa_exc.DBAPIError.instance(
        statement.sql, dict(params), error, psycopg.Error, connection_invalidated=lost
    )


def exactly_one(rows: list[Any]) -> Any:
    if len(rows) != 1:
        if not rows:
            raise sa_exc.NoResultFound("No row was found when one was required")
        raise sa_exc.MultipleResultsFound("Multiple rows were found when exactly one was required")
    return rows[0]


def one_or_none(rows: list[Any]) -> Any:
    if len(rows) > 1:
        raise sa_exc.MultipleResultsFound("Multiple rows were found when one or none was required")
    return rows[0] if rows else None


def release(raw: PoolProxiedConnection, *, invalidate: bool = False) -> None:
    """Return a pooled connection, or discard it when its state is unknown."""
    if invalidate:
        raw.invalidate()
    else:
        raw.close()


async def async_release(raw: PoolProxiedConnection, *, invalidate: bool = False) -> None:
    """``release`` for an AsyncEngine's pool, whose connections do their I/O in a greenlet."""
    await greenlet_spawn(release, raw, invalidate=invalidate)


def driver(conn: Any) -> Any:
    """The psycopg connection under a SQLAlchemy ``Connection`` (in its transaction)."""
    return conn.connection.driver_connection


async def async_driver(conn: Any) -> Any:
    """The psycopg connection under an ``AsyncConnection`` (in its transaction)."""
    return (await conn.get_raw_connection()).driver_connection
