"""Helpers for testing code that uses absurd_sqla.

    clock = FakeClock(app.engine)             # "now" is frozen for the engine's connections
    clock.set(datetime(2030, 1, 1, tzinfo=UTC))
    app.spawn("remind", {})
    run_until_idle(app)                        # runs everything that is due
    clock.advance(3600)                        # sleeps and retry delays come due
    run_until_idle(app)

    assert_spawned(app, "remind", {"user_id": 7})   # spawned, whether it ran or not

They work with ``AsyncAbsurd`` too: ``FakeClock(async_app.engine)`` (an
``AsyncEngine``), ``await run_until_idle(async_app)``, ``await
assert_spawned(async_app, ...)``. pytest fixtures are in
``absurd_sqla.pytest_plugin``.

The database clock is ``absurd.now()``: ``clock_timestamp()`` unless the
session setting ``absurd.fake_now`` holds a timestamp. ``FakeClock`` sets it on
every connection the engine hands out, so the worker, the client and your own
sessions all agree on the time.
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, overload

from sqlalchemy import Engine, event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

from .client import Absurd
from .client_async import AsyncAbsurd
from .models import tasks

__all__ = [
    "ANY",
    "FakeClock",
    "SpawnedTask",
    "assert_not_spawned",
    "assert_spawned",
    "run_until_idle",
    "spawned_tasks",
]

# In a pooled connection's ``info``: the FakeClock whose time it carries.
_PINNED_BY = "absurd_sqla.fake_clock"


def _set_fake_now(dbapi_connection: Any, value: str) -> None:
    """Set ``absurd.fake_now`` for the connection's session ('' = the real clock).

    Runs in the pool's checkout event: for an AsyncEngine that is inside
    SQLAlchemy's greenlet, where the adapted DBAPI connection awaits for us."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT set_config('absurd.fake_now', %s, false)", (value,))
    finally:
        cursor.close()
    # The setting is session-level: end the implicit transaction it opened.
    dbapi_connection.commit()


def _restore_real_clock(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    """Hand out a connection pinned by a closed FakeClock on the real clock again.

    One such listener per engine, registered with its first FakeClock and kept:
    a pooled connection keeps a closed clock's time until it is next checked
    out, and then this puts it back (a dictionary lookup for any other)."""
    clock = record.info.get(_PINNED_BY)
    if isinstance(clock, FakeClock) and clock._now is None:
        _set_fake_now(dbapi_connection, "")
        del record.info[_PINNED_BY]


class FakeClock:
    """Freeze and move the database clock for connections from ``engine``.

    ``engine`` is an ``Engine`` or an ``AsyncEngine``. Without ``start`` the
    clock starts at the database's time (an ``Engine``) or at this machine's
    (an ``AsyncEngine``: reading the database's would need I/O, and this
    constructor is not a coroutine)."""

    def __init__(self, engine: Engine | AsyncEngine, start: datetime | None = None) -> None:
        self.engine = engine
        self._pool_events: Engine = (
            engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        )
        self._now: datetime | None = None
        # Registered first, so it runs before this clock's own listener.
        if not event.contains(self._pool_events, "checkout", _restore_real_clock):
            event.listen(self._pool_events, "checkout", _restore_real_clock)
        event.listen(self._pool_events, "checkout", self._on_checkout)
        if start is None:
            if isinstance(engine, AsyncEngine):
                start = datetime.now(UTC)
            else:
                with engine.connect() as conn:
                    start = conn.scalar(text("SELECT clock_timestamp()"))
        assert start is not None
        self.set(start)

    def _on_checkout(self, dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        if self._now is None:
            return
        _set_fake_now(dbapi_connection, self._now.isoformat())
        record.info[_PINNED_BY] = self

    def now(self) -> datetime:
        assert self._now is not None
        return self._now

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        self._now = when

    def advance(self, seconds: float | timedelta) -> datetime:
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        self.set(self.now() + delta)
        return self.now()

    def close(self) -> None:
        """Back to the real clock, without I/O: stop setting it; a pooled
        connection that still carries this clock's time is put back on the
        real clock when the pool next hands it out. (A connection checked out
        now keeps the fake time until it is returned.)"""
        self._now = None
        if event.contains(self._pool_events, "checkout", self._on_checkout):
            event.remove(self._pool_events, "checkout", self._on_checkout)

    def __enter__(self) -> FakeClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@overload
def run_until_idle(
    app: Absurd, *, queue: str | None = None, max_batches: int = 10_000, batch_size: int = 10
) -> int: ...
@overload
def run_until_idle(
    app: AsyncAbsurd,
    *,
    queue: str | None = None,
    max_batches: int = 10_000,
    batch_size: int = 10,
) -> Coroutine[Any, Any, int]: ...


def run_until_idle(
    app: Absurd | AsyncAbsurd,
    *,
    queue: str | None = None,
    max_batches: int = 10_000,
    batch_size: int = 10,
) -> int | Coroutine[Any, Any, int]:
    """Run due work until nothing is claimable; return runs processed.

    With an ``Absurd`` it runs in this thread; with an ``AsyncAbsurd`` it
    returns a coroutine to await (``await run_until_idle(async_app)``)."""
    if isinstance(app, AsyncAbsurd):
        return _run_until_idle_async(
            app, queue=queue, max_batches=max_batches, batch_size=batch_size
        )
    total = 0
    for _ in range(max_batches):
        claimed = app.work_batch("test-worker", batch_size=batch_size, queue=queue)
        if claimed == 0:
            return total
        total += claimed
    raise _still_busy(max_batches)


async def _run_until_idle_async(
    app: AsyncAbsurd, *, queue: str | None, max_batches: int, batch_size: int
) -> int:
    total = 0
    for _ in range(max_batches):
        claimed = await app.work_batch("test-worker", batch_size=batch_size, queue=queue)
        if claimed == 0:
            return total
        total += claimed
    raise _still_busy(max_batches)


def _still_busy(max_batches: int) -> RuntimeError:
    return RuntimeError(f"still busy after {max_batches} batches: is a task looping forever?")


# -- what was spawned ------------------------------------------------------------


class _Any:
    """Matches any params (the default of ``assert_spawned``)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


@dataclass(frozen=True, slots=True)
class SpawnedTask:
    """A task as spawned: what ``assert_spawned`` found."""

    task_id: uuid.UUID
    task_name: str
    queue_name: str
    params: Any
    headers: dict[str, Any] | None
    state: str


_SHOWN = 5  # tasks an assertion message lists


def _spawned_statement(task_name: str | None, queue: str | None) -> Any:
    statement = select(
        tasks.c.task_id,
        tasks.c.task_name,
        tasks.c.queue_name,
        tasks.c.params,
        tasks.c.headers,
        tasks.c.state,
    ).order_by(tasks.c.task_id)
    if task_name is not None:
        statement = statement.where(tasks.c.task_name == task_name)
    if queue is not None:
        statement = statement.where(tasks.c.queue_name == queue)
    return statement


def _found(rows: Sequence[Any]) -> list[SpawnedTask]:
    return [SpawnedTask(*row) for row in rows]


@overload
def spawned_tasks(
    app: Absurd, task_name: str | None = None, *, queue: str | None = None
) -> list[SpawnedTask]: ...
@overload
def spawned_tasks(
    app: AsyncAbsurd, task_name: str | None = None, *, queue: str | None = None
) -> Coroutine[Any, Any, list[SpawnedTask]]: ...


def spawned_tasks(
    app: Absurd | AsyncAbsurd, task_name: str | None = None, *, queue: str | None = None
) -> list[SpawnedTask] | Coroutine[Any, Any, list[SpawnedTask]]:
    """Every committed task (of ``task_name``, on ``queue``), oldest first."""
    statement = _spawned_statement(task_name, queue)
    if isinstance(app, AsyncAbsurd):
        return _spawned_async(app, statement)
    with app.engine.connect() as conn:
        return _found(conn.execute(statement).all())


async def _spawned_async(app: AsyncAbsurd, statement: Any) -> list[SpawnedTask]:
    async with app.engine.connect() as conn:
        return _found((await conn.execute(statement)).all())


def _match(found: list[SpawnedTask], task_name: str, params: Any, count: int | None) -> SpawnedTask:
    matching = [task for task in found if task.params == params]
    wanted = f"a task {task_name!r}" + ("" if params is ANY else f" with params {params!r}")
    if count is not None and len(matching) != count:
        raise AssertionError(f"expected {count} of {wanted}, found {len(matching)}")
    if not matching:
        if not found:
            raise AssertionError(f"expected {wanted} to be spawned; none named {task_name!r} was")
        shown = ", ".join(repr(task.params) for task in found[-_SHOWN:])
        raise AssertionError(
            f"expected {wanted} to be spawned; {len(found)} {task_name!r} task(s) were, "
            f"with params: {shown}"
        )
    return matching[-1]


@overload
def assert_spawned(
    app: Absurd,
    task_name: str,
    params: Any = ANY,
    *,
    queue: str | None = None,
    count: int | None = None,
) -> SpawnedTask: ...
@overload
def assert_spawned(
    app: AsyncAbsurd,
    task_name: str,
    params: Any = ANY,
    *,
    queue: str | None = None,
    count: int | None = None,
) -> Coroutine[Any, Any, SpawnedTask]: ...


def assert_spawned(
    app: Absurd | AsyncAbsurd,
    task_name: str,
    params: Any = ANY,
    *,
    queue: str | None = None,
    count: int | None = None,
) -> SpawnedTask | Coroutine[Any, Any, SpawnedTask]:
    """Assert that a task ``task_name`` with ``params`` (compared with ``==``:
    ``ANY``, or ``unittest.mock.ANY`` inside them, matches anything) was
    spawned and committed, and return it (the newest if several match).
    ``count=``: exactly that many match. The task need not have run: test the
    code that spawns without a worker. With an ``AsyncAbsurd``, await it."""
    if isinstance(app, AsyncAbsurd):
        return _assert_spawned_async(app, task_name, params, queue, count)
    return _match(spawned_tasks(app, task_name, queue=queue), task_name, params, count)


async def _assert_spawned_async(
    app: AsyncAbsurd, task_name: str, params: Any, queue: str | None, count: int | None
) -> SpawnedTask:
    found = await spawned_tasks(app, task_name, queue=queue)
    return _match(found, task_name, params, count)


def _absent(found: list[SpawnedTask], task_name: str, params: Any) -> None:
    matching = [task for task in found if task.params == params]
    if matching:
        wanted = f"no task {task_name!r}" + ("" if params is ANY else f" with params {params!r}")
        ids = ", ".join(str(task.task_id) for task in matching[:_SHOWN])
        raise AssertionError(f"expected {wanted}, found {len(matching)}: {ids}")


@overload
def assert_not_spawned(
    app: Absurd, task_name: str, params: Any = ANY, *, queue: str | None = None
) -> None: ...
@overload
def assert_not_spawned(
    app: AsyncAbsurd, task_name: str, params: Any = ANY, *, queue: str | None = None
) -> Coroutine[Any, Any, None]: ...


def assert_not_spawned(
    app: Absurd | AsyncAbsurd, task_name: str, params: Any = ANY, *, queue: str | None = None
) -> Coroutine[Any, Any, None] | None:
    """Assert that no committed task ``task_name`` (with ``params``) exists.
    With an ``AsyncAbsurd``, await it."""
    if isinstance(app, AsyncAbsurd):
        return _assert_not_spawned_async(app, task_name, params, queue)
    _absent(spawned_tasks(app, task_name, queue=queue), task_name, params)
    return None


async def _assert_not_spawned_async(
    app: AsyncAbsurd, task_name: str, params: Any, queue: str | None
) -> None:
    _absent(await spawned_tasks(app, task_name, queue=queue), task_name, params)
