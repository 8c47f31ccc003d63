"""``Database``: the one internal interface to PostgreSQL.

It owns the engine, an autocommit view of the same pool and the Session
factory, and offers the few I/O primitives everything else is written with:
one statement in autocommit, a transaction of our own, the caller's
transaction, and a Session. ``Absurd``, ``TaskContext`` and the executor all
talk to the database through it and through nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

from ._engine import Bind, engine_and_sessions
from .errors import InvalidArgument

SessionLike = Session | Connection


def is_disconnect(exc: BaseException) -> bool:
    """An error that means the connection or the server went away (a restart, a
    failover, a terminated backend), as opposed to an error in what we sent
    (a deadlock, a timeout, a constraint: those carry their own SQLSTATE)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:  # raised by the client: no server answer at all
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    # 08: connection exception; 57P: the server shut down or is starting.
    return exc.sqlstate.startswith(("08", "57P"))


def refuse_autocommit(engine: Engine, session_factory: sessionmaker[Session]) -> None:
    """An AUTOCOMMIT bind would commit ``transaction_step``'s writes before its
    checkpoint is fenced, silently making exactly-once at-least-once."""
    binds = [engine, session_factory.kw.get("bind")]
    for bind in binds:
        if not isinstance(bind, Engine):
            continue
        levels = (
            bind.get_execution_options().get("isolation_level"),
            # create_engine(isolation_level=...) is kept here; SQLAlchemy has no
            # public getter for it (and reading a connection would mean I/O).
            getattr(bind.dialect, "_on_connect_isolation_level", None),
        )
        if "AUTOCOMMIT" in levels:
            raise InvalidArgument(
                "absurd_sqla needs transactions: pass an Engine without "
                "isolation_level='AUTOCOMMIT' (it runs its single-statement writes in "
                "autocommit itself, and transaction_step depends on real transactions)"
            )


class Database:
    """The engine, its autocommit twin and the Session factory, with I/O primitives."""

    def __init__(self, bind: Bind) -> None:
        # A URL bind gets a pool big enough for a worker with a few threads, whose
        # connections are pinged on checkout: one that died while idle (a server
        # restart, a terminated backend, a proxy's idle timeout) is replaced
        # rather than handed to a task, whose write would fail on it.
        self.engine, self.session_factory = engine_and_sessions(
            bind, pool_size=10, max_overflow=20, pool_pre_ping=True
        )
        refuse_autocommit(self.engine, self.session_factory)
        # Single statements are atomic alone: run them without BEGIN/COMMIT,
        # one round trip instead of three. Shares the engine's pool.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def one(self, statement: Executable, params: Mapping[str, Any]) -> Row[Any]:
        """Run one self-contained statement in autocommit; return its single row."""
        with self._autocommit.connect() as conn:
            return conn.execute(statement, params).one()

    def one_or_none(self, statement: Executable, params: Mapping[str, Any]) -> Row[Any] | None:
        with self._autocommit.connect() as conn:
            return conn.execute(statement, params).one_or_none()

    def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[Row[Any]]:
        with self._autocommit.connect() as conn:
            return conn.execute(statement, params).all()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction of our own, committed when the block ends without error."""
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def joined(self, session: SessionLike | None, *, atomic: bool = True) -> Iterator[Connection]:
        """The caller's transaction (never committed here), or our own: a
        transaction, or autocommit when ``atomic=False`` (a single statement)."""
        if session is None:
            if atomic:
                with self.transaction() as conn:
                    yield conn
            else:
                with self._autocommit.connect() as conn:
                    yield conn
        elif isinstance(session, Session):
            yield session.connection()
        elif isinstance(session, Connection):
            yield session
        else:
            raise TypeError(f"session must be a Session or a Connection, not {session!r}")

    def session(self) -> Session:
        """A new Session from the factory (the caller begins and closes it)."""
        return self.session_factory()

    def close(self) -> None:
        """Dispose of the engine's connection pool."""
        self.engine.dispose()
