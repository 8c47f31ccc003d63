"""The hot path's statements go straight to psycopg (``absurd_sqla._wire``):
which statements do, that a listener on SQLAlchemy's cursor events turns it
off, and that a pooled connection comes back from it exactly as it went out
(in a transaction-ready state, or discarded when its state is unknown)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    Float,
    Integer,
    Text,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from absurd_sqla import Absurd, TaskContext, _wire
from absurd_sqla import _sql as sql
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._db import Database
from absurd_sqla._db_async import AsyncDatabase
from tests.support import Order, wait_until

# Every statement a run or a single spawn sends on its own: each must take the wire.
HOT = {
    "claim": sqlw.claim,
    "seconds_until_due": sqlw.seconds_until_due,
    "heartbeat": sqlw.heartbeat,
    "write_checkpoint": sqlw.write_checkpoint,
    "sleep": sqlw.sleep,
    "await_event": sqlw.await_event,
    "complete_run": sqlw.complete_run,
    "fail_run": sqlw.fail_run,
    "defer_run": sqlw.defer_run,
    "spawn_one": sql.spawn_one,
    "existing_by_key": sql.existing_by_key,
    "spawn": sql.spawn,
    "existing_by_keys": sql.existing_by_keys,
    "write_checkpoints": sqlw.write_checkpoints,
    "task_identity": sql.task_identity,
}
# ... and what a retried write reads to tell its own landed change from a lost lease.
HOT.update(
    {
        f"landed {name}": sqlw.landed_statement(HOT[name])
        for name in ("write_checkpoint", "sleep", "await_event", "complete_run", "fail_run")
    }
)


@pytest.mark.parametrize("name", sorted(HOT))
def test_each_hot_statement_takes_the_wire(name: str, engine: Engine) -> None:
    statement = HOT[name]
    assert statement is not None and _wire.prepared(statement, engine) is not None


def test_a_statement_that_needs_sqlalchemy_does_not(engine: Engine) -> None:
    # An expanding IN list is rendered by SQLAlchemy at execution time; a
    # numeric result is converted by SQLAlchemy according to its type code.
    assert _wire.prepared(sql.existing_queues, engine) is None
    assert _wire.prepared(sql.list_queues, engine) is not None
    assert _wire.prepared(select(literal(1) / literal(3)), engine) is None


def test_constants_are_written_into_the_statement(engine: Engine) -> None:
    prepared = _wire.prepared(sql.spawn_one, engine)
    assert prepared is not None
    # literal("pending"), literal(1), coalesce(..., 0.0): no parameter to adapt
    assert prepared.defaults == {} and "%(param_" not in prepared.sql
    assert "'pending'" in prepared.sql
    assert "%(task_id)s" in prepared.sql  # a named parameter stays one


@pytest.fixture
def wire_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every statement sent through the wire, in order."""
    calls: list[str] = []
    rows = _wire.Prepared.rows

    def counting(self: _wire.Prepared, cursor: Any, fetched: Any) -> Any:
        calls.append(self.sql)
        return rows(self, cursor, fetched)

    monkeypatch.setattr(_wire.Prepared, "rows", counting)
    return calls


def three_steps(params: Any, ctx: TaskContext) -> int:
    a = ctx.step("one", lambda: 1)
    b = ctx.step("two", lambda: a + 1)
    return ctx.step("three", lambda: b + 1)


def test_a_task_runs_on_the_wire(app: Absurd, wire_calls: list[str]) -> None:
    app.register_task("three")(three_steps)
    spawned = app.spawn("three", {})
    assert len(wire_calls) == 1  # the spawn
    wire_calls.clear()
    assert app.work_batch("w") == 1
    assert app.fetch_task_result(spawned.task_id).state == "completed"  # type: ignore[union-attr]
    # claim, three checkpoints, completion (the sweep is a transaction of its own)
    assert len(wire_calls) == 5, wire_calls


def test_a_cursor_listener_sees_every_statement_instead(
    app: Absurd, engine: Engine, wire_calls: list[str]
) -> None:
    app.register_task("three")(three_steps)
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", listener)
    try:
        app.spawn("three", {})
        assert app.work_batch("w") == 1
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert wire_calls == []
    assert len(seen) >= 6  # spawn, sweep, claim, 3 checkpoints, completion


@pytest.fixture
def one_connection(database_url: str) -> Iterator[Engine]:
    """An engine whose pool holds a single connection, so every use reuses it."""
    eng = create_engine(database_url, pool_size=1, max_overflow=0)
    yield eng
    eng.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.pg_backend_pid())) or 0)


def rolled_back_order_survives(engine: Engine) -> bool:
    """Whether an INSERT in a Session that rolls back is still there: it is
    only if the pooled connection was left in autocommit."""
    with Session(engine) as session:
        session.add(Order(email="ghost@example.com", amount=1))
        session.flush()
        session.rollback()
    with engine.connect() as conn:
        return bool(
            conn.scalar(text("SELECT count(*) FROM orders WHERE email = 'ghost@example.com'"))
        )


def test_a_connection_goes_back_to_the_pool_out_of_autocommit(
    clean_db: Engine, one_connection: Engine
) -> None:
    db = Database(one_connection)
    assert db.rows(select(literal(1).label("one")), {})[0].one == 1
    assert not rolled_back_order_survives(one_connection)


def test_a_constant_is_quoted_and_escaped_for_psycopg(
    clean_db: Engine, one_connection: Engine
) -> None:
    statement = select(
        # A constant whose text looks like the placeholder of the next one.
        literal("100% 'sure' %(param_2)s").label("text"),
        literal("next").label("next"),
        bindparam("n", type_=Integer).label("n"),
    )
    row = Database(one_connection).rows(statement, {"n": 5})[0]
    assert (row.text, row.next, row.n) == ("100% 'sure' %(param_2)s", "next", 5)


@pytest.mark.parametrize(
    ("item_type", "values"),
    [
        (Text, ['a "quoted", {braced} \\ back\\slashed', None, "", "NULL", "ü ß"]),
        (Text, [None, None]),  # no item to tell psycopg the type: the cast does
        (JSONB, ['{"a": "{x}, \\"y\\""}', None, "[1, 2.5]"]),
        (Integer, [1, None, 2**31 - 1]),
        (Float, [0.5, None, -1e300]),
    ],
)
def test_a_list_travels_as_a_binary_array(
    clean_db: Engine, one_connection: Engine, item_type: Any, values: list[Any]
) -> None:
    statement = select(
        func.unnest(sql.array_param("values", item_type))
        # An untyped column: psycopg's own loaders read the values.
        .table_valued(column("value"), with_ordinality="position")
        .render_derived(name="item")
    )
    prepared = _wire.prepared(statement, one_connection)
    assert prepared is not None and "%(values)b" in prepared.sql  # binary, no text quoting
    rows = Database(one_connection).rows(statement, {"values": values})
    expected = (
        values if item_type is not JSONB else [None if v is None else json.loads(v) for v in values]
    )
    assert [row.value for row in rows] == expected
    assert [row.position for row in rows] == list(range(1, len(values) + 1))


def test_a_failed_statement_leaves_the_connection_usable_and_out_of_autocommit(
    clean_db: Engine, one_connection: Engine
) -> None:
    db = Database(one_connection)
    pid = backend_pid(one_connection)
    with pytest.raises(DBAPIError) as raised:
        db.rows(select(cast(literal("x"), Integer)), {})
    assert raised.value.orig is not None and raised.value.orig.sqlstate == "22P02"
    assert not raised.value.connection_invalidated
    assert backend_pid(one_connection) == pid  # kept, not discarded
    assert not rolled_back_order_survives(one_connection)


def test_a_lost_connection_is_discarded_and_replaced(
    clean_db: Engine, one_connection: Engine
) -> None:
    db = Database(one_connection)
    pid = backend_pid(one_connection)
    with clean_db.connect() as observer:
        observer.execute(select(func.pg_terminate_backend(pid)))
    with pytest.raises(DBAPIError) as raised:
        db.rows(select(literal(1)), {})
    assert raised.value.connection_invalidated
    assert db.rows(select(literal(2).label("two")), {})[0].two == 2
    assert backend_pid(one_connection) != pid


def test_a_statement_cancelled_midway_discards_its_connection(
    clean_db: Engine, database_url: str
) -> None:
    async def scenario() -> None:
        engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
        db = AsyncDatabase(engine)
        try:
            sleeping = asyncio.ensure_future(
                db.rows(select(func.pg_sleep(30), literal("marker-a1")), {})
            )

            def asleep() -> bool:
                with clean_db.connect() as conn:
                    query = text(
                        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                        "'%pg_sleep%' AND state = 'active' AND pid <> pg_backend_pid()"
                    )
                    return bool(conn.scalar(query))

            while not await asyncio.to_thread(asleep):
                await asyncio.sleep(0)
            sleeping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sleeping
            # The connection, mid-statement, was closed rather than pooled: its
            # backend goes away, and the pool hands out a fresh one.
            await asyncio.to_thread(wait_until, lambda: not asleep(), "the backend to go")
            rows = await db.rows(select(literal(3).label("three")), {})
            assert rows[0].three == 3
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_an_opt_out_of_prepared_statements_is_respected(
    clean_db: Engine, database_url: str
) -> None:
    def prepared_count(engine: Engine) -> int:
        db = Database(engine)
        db.rows(sqlw.seconds_until_due, {"queue": "default"})
        with engine.connect() as conn:
            return int(conn.scalar(text("SELECT count(*) FROM pg_prepared_statements")) or 0)

    for connect_args, expected in [({}, True), ({"prepare_threshold": None}, False)]:
        engine = create_engine(database_url, pool_size=1, max_overflow=0, connect_args=connect_args)
        try:
            assert (prepared_count(engine) > 0) is expected, connect_args
        finally:
            engine.dispose()


def test_a_connection_goes_back_in_the_mode_it_came_in(clean_db: Engine, database_url: str) -> None:
    """An engine whose connections are in autocommit (``connect_args``) gets them
    back in autocommit."""
    engine = create_engine(
        database_url, pool_size=1, max_overflow=0, connect_args={"autocommit": True}
    )
    try:
        Database(engine).rows(select(literal(1).label("one")), {})
        raw = engine.raw_connection()
        try:
            assert raw.driver_connection.autocommit is True  # type: ignore[union-attr]
        finally:
            raw.close()
    finally:
        engine.dispose()


def test_a_connection_lost_in_the_callers_transaction_is_invalidated(
    clean_db: Engine, one_connection: Engine
) -> None:
    """As SQLAlchemy would: the caller's rollback() then succeeds."""
    db = Database(one_connection)
    with one_connection.connect() as conn:
        pid = int(conn.scalar(select(func.pg_backend_pid())) or 0)
        with clean_db.connect() as observer:
            observer.execute(select(func.pg_terminate_backend(pid)))
        with pytest.raises(DBAPIError) as raised:
            db.rows(select(literal(1)), {}, conn)
        assert raised.value.connection_invalidated
        assert conn.invalidated
        conn.rollback()
