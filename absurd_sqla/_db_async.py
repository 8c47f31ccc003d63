"""``AsyncDatabase``: the one internal interface to PostgreSQL.

It owns the engine, an autocommit view of the same pool and the Session
factory, and offers the few I/O primitives everything else is written with:
one statement in autocommit, a transaction of our own, the caller's
transaction, and a Session. ``AsyncAbsurd``, ``AsyncTaskContext`` and the
executor all talk to the database through it and through nothing else.

A run's own writes (its checkpoints, sleeps, awaits, heartbeats and outcome)
survive a lost connection: ``AsyncDatabase.retrying`` tries them again with
backoff, deciding with the I/O-free ``_retry.reconnect_delay`` and
``_sql_worker.landed_statement``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from asyncio import sleep as async_sleep
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql import Executable

from . import _sql_worker as sqlw
from . import _wire
from ._engine import AsyncBind, async_engine_and_sessions
from ._group_async import Group
from ._retry import reconnect_delay
from .errors import InvalidArgument

log = logging.getLogger("absurd_sqla.worker")
_T = TypeVar("_T")

AsyncSessionLike = AsyncSession | AsyncConnection


def refuse_autocommit(
    engine: AsyncEngine, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """An AUTOCOMMIT bind would commit ``transaction_step``'s writes before its
    checkpoint is fenced, silently making exactly-once at-least-once."""
    for bind in (engine, session_factory.kw.get("bind")):
        if not isinstance(bind, AsyncEngine):
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


class AsyncDatabase:
    """The engine, its autocommit twin and the Session factory, with I/O primitives."""

    def __init__(self, bind: AsyncBind) -> None:
        # A URL bind gets a pool big enough for a worker with a few handlers, whose
        # connections are checked on checkout (``discard_closed_connections``):
        # one that died while idle (a restart, a terminated backend, a proxy's
        # idle timeout) is replaced rather than handed to a task, whose write
        # would fail on it; a busy connection is not pinged.
        self.engine, self.session_factory = async_engine_and_sessions(
            bind, pool_size=10, max_overflow=20
        )
        refuse_autocommit(self.engine, self.session_factory)
        # Single statements are atomic alone: run them without BEGIN/COMMIT,
        # one round trip instead of three. Shares the engine's pool.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # Checkpoints of concurrent handlers go together (``_group_async``).
        self.checkpoints: Group[Mapping[str, Any], _wire.Record] = Group(
            self._checkpoint_alone, self._checkpoint_group
        )

    async def _checkpoint_alone(self, params: Mapping[str, Any]) -> _wire.Record:
        return await self.retrying(sqlw.write_checkpoint, params)

    async def _checkpoint_group(self, items: Sequence[Mapping[str, Any]]) -> list[_wire.Record]:
        rows = await self.rows(
            sqlw.write_checkpoints,
            {
                "runs": [item["run"] for item in items],
                "steps": [item["step"] for item in items],
                "values": [item["value_json"] for item in items],
                "timeouts": [float(item["claim_timeout"]) for item in items],
            },
        )
        if len(rows) != len(items):
            raise RuntimeError(f"a group of {len(items)} checkpoints returned {len(rows)} rows")
        return rows

    async def one(
        self, statement: Executable, params: Mapping[str, Any], *, retry: bool = False
    ) -> _wire.Record:
        """Run one self-contained statement in autocommit; return its single row.

        ``retry=True`` for a run's fenced write: see :meth:`retrying`."""
        if retry:
            return await self.retrying(statement, params)
        return _wire.exactly_one(await self.rows(statement, params))

    async def retrying(
        self,
        statement: Executable,
        params: Mapping[str, Any],
        attempt: Callable[[], Awaitable[_wire.Record]] | None = None,
    ) -> _wire.Record:
        """A run's write of ``statement``, tried again on a lost connection.

        ``attempt`` makes the write on a connection of its own (default: the
        statement alone, in autocommit) and returns its row. A lost connection
        (a restart, a failover) makes it wait (``reconnect_delay``) and try
        again, for up to ``WRITE_RETRY_BUDGET`` seconds; any other error is
        raised at once. Safe because the write is fenced: it names its run and
        changes nothing once the run is not ours. If an attempt broke after it
        had committed, the retry finds the run already changed and says "not
        owned": the landed statement then tells our own change from a lost
        lease, and its row is returned instead.

        Only for writes whose effect is the statement's alone: never for
        ``transaction_step`` (it would run the user's function again) or a claim.
        """
        if attempt is None:

            async def attempt() -> _wire.Record:
                return _wire.exactly_one(await self.rows(statement, params))

        async def write(retries: int) -> _wire.Record:
            row = await attempt()
            if retries and not row.owned:
                landed = await self._landed(statement, params)
                if landed is not None:
                    log.info("a retried write found its earlier attempt committed")
                    return landed
            return row

        return await self._retried(write, params)

    async def reading(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Sequence[_wire.Record]:
        """A run's read, tried again on a lost connection like :meth:`retrying`."""

        async def read(retries: int) -> Sequence[_wire.Record]:
            return await self.rows(statement, params)

        return await self._retried(read, params)

    async def _retried(self, call: Callable[[int], Awaitable[_T]], params: Mapping[str, Any]) -> _T:
        """``call(retries)``, again after a lost connection (see :meth:`retrying`)."""
        started = time.monotonic()
        retries = 0
        while True:
            try:
                return await call(retries)
            except Exception as exc:
                delay = reconnect_delay(exc, retries, time.monotonic() - started, random.random())
                if delay is None:
                    raise
                retries += 1
                log.warning(
                    "lost the database connection for run %s (%s); retrying in %.2fs (retry %d)",
                    params.get("run"),
                    exc.__class__.__name__,
                    delay,
                    retries,
                )
                await async_sleep(delay)

    async def _landed(self, write: Executable, params: Mapping[str, Any]) -> _wire.Record | None:
        landed = sqlw.landed_statement(write)
        if landed is None:
            return None
        return _wire.one_or_none(await self.rows(landed, params))

    async def one_or_none(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> _wire.Record | None:
        return _wire.one_or_none(await self.rows(statement, params))

    async def all(self, statement: Executable, params: Mapping[str, Any]) -> Sequence[_wire.Record]:
        return await self.rows(statement, params)

    async def rows(
        self,
        statement: Executable,
        params: Mapping[str, Any],
        conn: AsyncConnection | None = None,
    ) -> list[Any]:
        """Every row of one statement: on ``conn`` (in its transaction), or on
        its own in autocommit.

        Straight on psycopg when ``_wire`` can take the statement (compiled
        once, prepared on the server, and in autocommit no isolation switch
        through SQLAlchemy); otherwise through SQLAlchemy."""
        prepared = _wire.prepared(statement, self.engine if conn is None else conn)
        if prepared is None:
            if conn is not None:
                return list((await conn.execute(statement, params)).all())
            async with self._autocommit.connect() as own:
                return list((await own.execute(statement, params)).all())
        bound = prepared.params(params)
        if conn is not None:
            return await self._rows_on(conn, prepared, bound)
        raw = await self.engine.raw_connection()
        driver: Any = raw.driver_connection
        was = driver.autocommit  # restored as found (a connect_args autocommit=True too)
        try:
            await driver.set_autocommit(True)
            cursor = await driver.execute(prepared.sql, bound, prepare=True)
            fetched = await cursor.fetchall()
            await driver.set_autocommit(was)
        except psycopg.Error as error:
            lost = driver.broken or driver.closed
            if not lost:
                try:
                    await driver.set_autocommit(was)
                except psycopg.Error:
                    lost = True
            await _wire.async_release(raw, invalidate=lost)
            raise _wire.wrap(error, prepared, bound, lost) from error
        except BaseException:
            # Cancelled or interrupted mid-statement: the connection's state is unknown.
            await _wire.async_release(raw, invalidate=True)
            raise
        await _wire.async_release(raw)
        return prepared.rows(cursor, fetched)

    @staticmethod
    async def _rows_on(
        conn: AsyncConnection, prepared: _wire.Prepared, bound: dict[str, Any]
    ) -> list[Any]:
        if not conn.in_transaction():
            # What SQLAlchemy's autobegin would do, so that the caller's
            # commit() or rollback() reaches what is sent here.
            await conn.begin()
        driver = await _wire.async_driver(conn)
        try:
            cursor = await driver.execute(prepared.sql, bound, prepare=True)
            return prepared.rows(cursor, await cursor.fetchall())
        except psycopg.Error as error:
            lost = driver.broken or driver.closed
            if lost:  # as SQLAlchemy would: the caller's rollback() then fails no more
                await conn.invalidate()
            raise _wire.wrap(error, prepared, bound, lost) from error

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction of our own, committed when the block ends without error."""
        async with self.engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def joined(
        self, session: AsyncSessionLike | None, *, atomic: bool = True
    ) -> AsyncIterator[AsyncConnection]:
        """The caller's transaction (never committed here), or our own: a
        transaction, or autocommit when ``atomic=False`` (a single statement)."""
        if session is None:
            if atomic:
                async with self.transaction() as conn:
                    yield conn
            else:
                async with self._autocommit.connect() as conn:
                    yield conn
        elif isinstance(session, AsyncSession):
            yield await session.connection()
        elif isinstance(session, AsyncConnection):
            yield session
        else:
            raise TypeError(
                f"session must be an AsyncSession or an AsyncConnection, not {session!r}"
            )

    def session(self) -> AsyncSession:
        """A new Session from the factory (the caller begins and closes it)."""
        return self.session_factory()

    async def close(self) -> None:
        """Dispose of the engine's connection pool."""
        await self.engine.dispose()
