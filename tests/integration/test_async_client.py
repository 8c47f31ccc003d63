"""``AsyncAbsurd`` against a real PostgreSQL: the binds it takes and refuses,
handlers of the wrong kind, writes that join the caller's ``AsyncSession`` or
``AsyncConnection`` without committing, and the client's methods (SPEC §3).

ci/generate_sync.py turns test_async_client.py into its sync twin,
test_gen_sync_client.py, so every behaviour here is asserted on both clients.
Each test makes its own client (``async_app_for``); in test_async_client.py
inside the test's own event loop, since async connections belong to their loop.
"""

from __future__ import annotations

import builtins
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import sessionmaker

import absurd_sqla
from absurd_sqla import (
    Absurd,
    AsyncAbsurd,
    AsyncTaskContext,
    InvalidArgument,
    QueueMismatch,
    QueueNotFound,
    SpawnRequest,
    SpawnResult,
    TaskNotFound,
    TaskResultSnapshot,
    TaskStateError,
)
from absurd_sqla.models import events, tasks
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import (
    Order,
    async_app_for,
    count_runs,
    count_tasks,
    run_async,
    task_state,
    wait_until,
)

# -- helpers -------------------------------------------------------------------


def orders_and_tasks(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        orders = conn.scalar(select(func.count()).select_from(Order.__table__))
        spawned = conn.scalar(select(func.count()).select_from(tasks))
    return int(orders or 0), int(spawned or 0)


def event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(events)) or 0)


def engine_url(database_url: str) -> str:
    """The database's URL with the driver of this module's engines, psycopg 3's
    ``psycopg_async`` (the same URL in the sync twin of this module)."""
    return database_url.replace("postgresql+psycopg://", "postgresql+psycopg_async://", 1)


def plain_url(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def register_flaky(app: AsyncAbsurd, queue: str | None = None) -> None:
    """``echo`` returns its params; ``fails`` always raises (one attempt)."""

    @app.register_task("echo", queue=queue)
    async def echo(params: Any, ctx: AsyncTaskContext) -> Any:
        return await ctx.step("copy", _value(params))

    @app.register_task("fails", queue=queue, max_attempts=1)
    async def fails(params: Any, ctx: AsyncTaskContext) -> Any:
        await ctx.step("before", _value("kept"))
        raise RuntimeError("boom")


def _value(value: Any) -> Any:
    async def produce() -> Any:
        return value

    return produce


# -- constructor -----------------------------------------------------------------------


@run_async  # async only
async def test_bind_url_gives_an_engine_and_session_factory(
    database_url: str, clean_db: Engine
) -> None:
    app = AsyncAbsurd(database_url, queue_name="from-url")
    try:
        assert isinstance(app.engine, AsyncEngine)
        assert app.engine.dialect.is_async  # async only
        assert app.engine.dialect.name == "postgresql"
        assert isinstance(app.session_factory, async_sessionmaker)
        assert app.session_factory.kw["bind"] is app.engine
        assert app.queue_name == "from-url"
        await app.create_queue()
        spawned = await app.spawn("t", {"a": 1})
        assert count_tasks(clean_db, task_id=spawned.task_id, queue_name="from-url") == 1
    finally:
        await app.close()
    # A plain postgresql:// URL gets psycopg 3's (async) driver too.
    plain = AsyncAbsurd(plain_url(clean_db))
    try:
        assert plain.engine.url.drivername == "postgresql+psycopg_async"
        assert await plain.list_queues() == ["from-url"]
    finally:
        await plain.close()


@run_async  # async only
async def test_bind_engine_and_sessionmaker(database_url: str, clean_db: Engine) -> None:
    engine = create_async_engine(engine_url(database_url))
    try:
        app = AsyncAbsurd(engine)
        assert app.engine is engine
        assert isinstance(app.session_factory, async_sessionmaker)
        assert app.session_factory.kw["bind"] is engine
        await app.create_queue()
        first = await app.spawn("t", {})

        factory = async_sessionmaker(engine)
        from_factory = AsyncAbsurd(factory, queue_name="other")
        assert from_factory.session_factory is factory
        assert from_factory.engine is engine
        assert from_factory.queue_name == "other"
        snapshot = await from_factory.fetch_task_result(first.task_id)
        assert snapshot == TaskResultSnapshot("pending")
    finally:
        await engine.dispose()
    assert count_tasks(clean_db) == 1


# async only: begin
def test_sync_binds_are_refused_by_async_absurd_and_async_binds_by_absurd(
    database_url: str, clean_db: Engine
) -> None:
    with pytest.raises(TypeError, match="AsyncAbsurd needs an AsyncEngine or async_sessionmaker"):
        AsyncAbsurd(clean_db)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AsyncAbsurd needs an AsyncEngine or async_sessionmaker"):
        AsyncAbsurd(sessionmaker(clean_db))  # type: ignore[arg-type]
    async_engine = create_async_engine(engine_url(database_url))  # no connection is made
    with pytest.raises(TypeError, match="Absurd needs an Engine or sessionmaker; use AsyncAbsurd"):
        Absurd(async_engine)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Absurd needs an Engine or sessionmaker; use AsyncAbsurd"):
        Absurd(async_sessionmaker(async_engine))  # type: ignore[arg-type]
    # An async_sessionmaker bound to nothing is refused too.
    with pytest.raises(TypeError, match="bound to an AsyncEngine"):
        AsyncAbsurd(async_sessionmaker())


# async only: end


def test_an_autocommit_engine_is_refused(database_url: str) -> None:
    url = engine_url(database_url)
    for bind in (
        create_async_engine(url, isolation_level="AUTOCOMMIT"),
        create_async_engine(url).execution_options(isolation_level="AUTOCOMMIT"),
        async_sessionmaker(create_async_engine(url, isolation_level="AUTOCOMMIT")),
    ):
        with pytest.raises(InvalidArgument, match="needs transactions"):
            AsyncAbsurd(bind)


# async only: begin
@run_async
async def test_a_handler_of_the_wrong_kind_is_refused_at_registration(
    database_url: str, clean_db: Engine
) -> None:
    sync_app = Absurd(clean_db)

    async def coroutine_handler(params: Any, ctx: Any) -> None:
        return None

    def plain_handler(params: Any, ctx: Any) -> None:
        return None

    with pytest.raises(InvalidArgument, match="'job' is an async def: register it on AsyncAbsurd"):
        sync_app.register_task("job")(coroutine_handler)
    async with async_app_for(database_url) as app:
        with pytest.raises(InvalidArgument, match="'job' is a plain def: make it an async def"):
            app.register_task("job")(plain_handler)
        # Nothing was registered: each client takes the right kind under that name.
        assert app.register_task("job")(coroutine_handler) is coroutine_handler
    assert sync_app.register_task("job")(plain_handler) is plain_handler


# async only: end


# -- the caller's transaction ------------------------------------------------------------


@run_async  # async only
async def test_commit_keeps_order_and_task(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app, app.session_factory() as session:
        order = Order(email="a@example.com", amount=10)
        session.add(order)
        await session.flush()
        spawned = await app.spawn("fulfil", {"order_id": order.id}, session=session)
        assert orders_and_tasks(clean_db) == (0, 0)  # invisible before the commit
        await session.commit()
        assert orders_and_tasks(clean_db) == (1, 1)
        assert await app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("pending")


@run_async  # async only
async def test_rollback_drops_order_and_task(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        async with app.session_factory() as session:
            session.add(Order(email="a@example.com", amount=10))
            await session.flush()
            spawned = await app.spawn("fulfil", {"order_id": 1}, session=session)
            await session.rollback()
        assert orders_and_tasks(clean_db) == (0, 0)
        assert count_runs(clean_db) == 0
        assert await app.fetch_task_result(spawned.task_id) is None


@run_async  # async only
async def test_exception_inside_session_begin_writes_nothing(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:
        with pytest.raises(RuntimeError, match="payment declined"):
            async with app.session_factory.begin() as session:
                session.add(Order(email="b@example.com", amount=5))
                await app.spawn("fulfil", {"order_id": 2}, session=session)
                await app.spawn_many([SpawnRequest("fulfil", {"n": 1})], session=session)
                assert await app.emit_event("order.created:2", {"id": 2}, session=session)
                raise RuntimeError("payment declined")
        assert orders_and_tasks(clean_db) == (0, 0)
        assert event_count(clean_db) == 0
        # The rolled-back emit never happened: the next one is the first.
        assert await app.emit_event("order.created:2", {"id": 3}) is True


@run_async  # async only
async def test_savepoint_rollback_drops_only_the_inner_task(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:
        async with app.session_factory() as session:
            session.add(Order(email="c@example.com", amount=7))
            outer = await app.spawn("fulfil", {"n": "outer"}, session=session)
            nested = await session.begin_nested()
            inner = await app.spawn("fulfil", {"n": "inner"}, session=session)
            await nested.rollback()
            await session.commit()
        assert orders_and_tasks(clean_db) == (1, 1)
        assert await app.fetch_task_result(outer.task_id) is not None
        assert await app.fetch_task_result(inner.task_id) is None


@run_async  # async only
async def test_a_lone_spawn_on_a_bare_connection_commits_and_rolls_back_with_it(
    database_url: str, clean_db: Engine
) -> None:
    """The spawn is the connection's first statement: its transaction must be
    the one the caller's ``commit()`` or ``rollback()`` ends."""
    async with async_app_for(database_url) as app:
        async with app.engine.connect() as conn:
            await app.spawn("fulfil", {}, session=conn)
            await conn.rollback()
        assert count_tasks(clean_db) == 0
        async with app.engine.connect() as conn:
            await app.spawn("fulfil", {}, session=conn)
            await conn.commit()
        assert count_tasks(clean_db) == 1


@run_async  # async only
async def test_a_connection_joins_too(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        async with app.engine.connect() as conn:
            await app.spawn("fulfil", {}, session=conn)
            await app.spawn_many([SpawnRequest("fulfil", {"i": i}) for i in range(3)], session=conn)
            await app.emit_event("e", session=conn)
            assert count_tasks(clean_db) == 0
            await conn.rollback()
        assert count_tasks(clean_db) == 0
        assert event_count(clean_db) == 0
        async with app.engine.begin() as conn:
            await app.spawn("fulfil", {}, session=conn)
        assert count_tasks(clean_db) == 1


@run_async  # async only
async def test_cancel_and_retry_roll_back_with_the_caller(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:
        register_flaky(app)
        pending = await app.spawn("echo", {}, run_after=3600)
        failed = await app.spawn("fails", {})
        assert await run_until_idle(app) == 1
        async with app.session_factory() as session:
            assert await app.cancel_task(pending.task_id, session=session) is True
            retried = await app.retry_task(failed.task_id, session=session)
            assert retried.attempt == 2
            await session.rollback()
        assert task_state(clean_db, pending.task_id) == "pending"
        assert task_state(clean_db, failed.task_id) == "failed"
        async with app.session_factory.begin() as session:
            await app.cancel_task(pending.task_id, session=session)
        assert task_state(clean_db, pending.task_id) == "cancelled"


@run_async  # async only
async def test_queue_writes_join_the_caller(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        async with app.session_factory() as session:
            await app.create_queue("billing", session=session)
            await app.drop_queue("default", session=session)
            await session.rollback()
        assert await app.list_queues() == ["default"]


@run_async  # async only
async def test_notify_is_sent_only_on_commit(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        with psycopg.connect(plain_url(clean_db), autocommit=True) as listener:
            listener.execute('LISTEN "absurd.default"')
            async with app.session_factory() as session:
                await app.spawn("fulfil", {}, session=session)
                await session.rollback()
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
            async with app.session_factory() as session:
                await app.spawn("fulfil", {}, session=session)
                assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not yet
                await session.commit()
            received = list(listener.notifies(timeout=5, stop_after=1))
            assert [n.channel for n in received] == ["absurd.default"]
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []


# async only: begin
@run_async
async def test_a_sync_session_is_refused(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        with (
            clean_db.connect() as conn,
            pytest.raises(TypeError, match="AsyncSession or an AsyncConnection"),
        ):
            await app.spawn("t", {}, session=conn)  # type: ignore[arg-type]
        assert count_tasks(clean_db) == 0


# async only: end


# -- queues, spawn, events ---------------------------------------------------------------


@run_async  # async only
async def test_queues_create_list_and_drop(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("zeta")
        await app.create_queue("alpha")
        await app.create_queue("alpha")  # idempotent
        assert await app.list_queues() == ["alpha", "default", "zeta"]
        spawned = await app.spawn("t", {}, queue="zeta")
        await app.drop_queue("zeta")
        assert await app.list_queues() == ["alpha", "default"]
        assert count_tasks(clean_db, task_id=spawned.task_id) == 0
        with pytest.raises(QueueNotFound):
            await app.spawn("t", {}, queue="zeta")


@run_async  # async only
async def test_spawn_stores_every_option(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("billing")
        retry = {"kind": "fixed", "base_seconds": 30}
        spawned = await app.spawn(
            "charge",
            {"order": 17},
            max_attempts=9,
            retry_strategy=retry,
            headers={"trace_id": "abc"},
            queue="billing",
            cancellation={"max_delay": 120},
            idempotency_key="charge:17",
            run_after=timedelta(hours=1),
        )
        assert isinstance(spawned, SpawnResult)
        assert (spawned.attempt, spawned.created) == (1, True)
        with clean_db.connect() as conn:
            task = conn.execute(
                text("SELECT * FROM absurd.tasks WHERE task_id = :t"), {"t": spawned.task_id}
            ).one()
            available_at = conn.scalar(
                text("SELECT available_at - clock_timestamp() FROM absurd.runs WHERE run_id = :r"),
                {"r": spawned.run_id},
            )
        assert (task.task_name, task.queue_name, task.params) == (
            "charge",
            "billing",
            {"order": 17},
        )
        assert (task.max_attempts, task.retry_strategy, task.headers) == (
            9,
            retry,
            {"trace_id": "abc"},
        )
        assert (task.cancellation, task.idempotency_key) == ({"max_delay": 120}, "charge:17")
        assert timedelta(minutes=59) < available_at <= timedelta(hours=1)
        again = await app.spawn(
            "charge", {"order": 18}, queue="billing", idempotency_key="charge:17"
        )
        assert (again.task_id, again.run_id, again.created) == (
            spawned.task_id,
            spawned.run_id,
            False,
        )
        assert count_tasks(clean_db) == 1


@run_async  # async only
async def test_spawn_many_in_request_order_and_all_or_nothing(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("other")
        requests = [
            SpawnRequest("a", {"i": 0}),
            SpawnRequest("b", {"i": 1}, queue="other"),
            SpawnRequest("c", {"i": 2}, idempotency_key="k"),
            SpawnRequest("d", {"i": 3}, idempotency_key="k"),
        ]
        results = await app.spawn_many(requests)
        assert [r.created for r in results] == [True, True, True, False]
        assert results[3].task_id == results[2].task_id
        with clean_db.connect() as conn:
            rows: dict[uuid.UUID, str] = dict(
                conn.execute(
                    text("SELECT task_id, task_name FROM absurd.tasks"),
                ).all()
            )
        assert [rows[r.task_id] for r in results] == ["a", "b", "c", "c"]
        assert await app.spawn_many([]) == []
        with pytest.raises(QueueNotFound):
            await app.spawn_many([SpawnRequest("e"), SpawnRequest("f", queue="missing")])
        assert count_tasks(clean_db) == 3


@run_async  # async only
async def test_emit_event_first_emit_wins(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("other")
        assert await app.emit_event("paid", {"n": 1}) is True
        assert await app.emit_event("paid", {"n": 2}) is False
        assert await app.emit_event("paid", {"n": 3}, queue_name="other") is True  # per queue
        with clean_db.connect() as conn:
            query = text("SELECT queue_name, payload FROM absurd.events")
            stored: dict[str, Any] = dict(conn.execute(query).all())
        assert stored == {"default": {"n": 1}, "other": {"n": 3}}
        with pytest.raises(QueueNotFound):
            await app.emit_event("paid", queue_name="missing")


# -- cancel, retry, results ---------------------------------------------------------------


@run_async  # async only
async def test_cancel_task(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        spawned = await app.spawn("t", {})
        bystander = await app.spawn("t", {})
        assert await app.cancel_task(spawned.task_id) is True
        assert await app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("cancelled")
        assert await app.cancel_task(str(spawned.task_id)) is False  # already finished
        assert task_state(clean_db, bystander.task_id) == "pending"
        missing = uuid.uuid4()
        with pytest.raises(TaskNotFound, match=f"task {missing} not found"):
            await app.cancel_task(missing)


@run_async  # async only
async def test_retry_task_in_place_and_as_a_new_task(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        register_flaky(app)
        failed = await app.spawn("fails", {"x": 1}, headers={"h": 1})
        await run_until_idle(app)
        assert task_state(clean_db, failed.task_id) == "failed"

        copy = await app.retry_task(failed.task_id, spawn_new=True, max_attempts=3)
        assert copy.task_id != failed.task_id and copy.created
        with clean_db.connect() as conn:
            row = conn.execute(
                text("SELECT params, headers, max_attempts FROM absurd.tasks WHERE task_id = :t"),
                {"t": copy.task_id},
            ).one()
        assert (row.params, row.headers, row.max_attempts) == ({"x": 1}, {"h": 1}, 3)

        retried = await app.retry_task(failed.task_id, max_attempts=2)
        assert (retried.task_id, retried.attempt, retried.created) == (failed.task_id, 2, False)
        assert task_state(clean_db, failed.task_id) == "pending"
        with pytest.raises(TaskStateError, match="is pending"):
            await app.retry_task(failed.task_id)
        # In place, the checkpoint of the first attempt is kept.
        with clean_db.connect() as conn:
            kept = conn.scalar(
                text("SELECT count(*) FROM absurd.checkpoints WHERE task_id = :t"),
                {"t": failed.task_id},
            )
        assert kept == 1


@run_async  # async only
async def test_fetch_and_await_task_result(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        register_flaky(app)
        done = await app.spawn("echo", {"v": 1})
        failed = await app.spawn("fails", {})
        pending = await app.spawn("echo", {}, run_after=3600)
        assert await app.fetch_task_result(done.task_id) == TaskResultSnapshot("pending")
        assert await run_until_idle(app) == 2

        assert await app.fetch_task_result(done.task_id) == TaskResultSnapshot(
            "completed", {"v": 1}
        )
        assert (await app.await_task_result(done.task_id, timeout=5)).result == {"v": 1}
        snapshot = await app.await_task_result(str(failed.task_id), timeout=5)
        assert snapshot.state == "failed"
        assert snapshot.failure is not None and snapshot.failure["message"] == "boom"
        assert await app.fetch_task_result(uuid.uuid4()) is None

        with pytest.raises(absurd_sqla.TimeoutError, match="still pending") as info:
            await app.await_task_result(pending.task_id, timeout=0.05)
        assert isinstance(info.value, builtins.TimeoutError)
        assert (info.value.task_id, info.value.state) == (pending.task_id, "pending")
        with pytest.raises(TaskNotFound):
            await app.await_task_result(uuid.uuid4(), timeout=1)


# -- task ids ---------------------------------------------------------------------------------


@run_async  # async only
async def test_task_ids_are_found_by_id_alone(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("other")
        register_flaky(app, queue="other")
        done = await app.spawn("echo", {"x": 1})
        failing = await app.spawn("fails", {})
        live = await app.spawn("echo", {}, run_after=3600)
        assert await run_until_idle(app, queue="other") == 2
        snapshot = await app.fetch_task_result(done.task_id)
        assert snapshot == TaskResultSnapshot("completed", {"x": 1})
        assert await app.await_task_result(done.task_id, timeout=1) == snapshot
        assert await app.fetch_task_result(done.task_id, queue_name="other") == snapshot
        new = await app.retry_task(failing.task_id, spawn_new=True)
        with clean_db.connect() as conn:
            queue = conn.scalar(
                text("SELECT queue_name FROM absurd.tasks WHERE task_id = :t"), {"t": new.task_id}
            )
        assert queue == "other"
        assert (await app.retry_task(failing.task_id)).attempt == 2
        assert await app.cancel_task(live.task_id) is True


@pytest.mark.parametrize("method", ["fetch", "await", "cancel", "retry", "retry_new"])
@run_async  # async only
async def test_a_queue_name_that_does_not_match_is_refused_and_writes_nothing(
    database_url: str, clean_db: Engine, method: str
) -> None:
    async with async_app_for(database_url) as app:
        await app.create_queue("other")
        register_flaky(app, queue="other")
        failing = await app.spawn("fails", {})
        await run_until_idle(app, queue="other")
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "fetch": lambda: app.fetch_task_result(failing.task_id, queue_name="default"),
            "await": lambda: app.await_task_result(failing.task_id, queue_name="default"),
            "cancel": lambda: app.cancel_task(failing.task_id, queue_name="default"),
            "retry": lambda: app.retry_task(failing.task_id, queue_name="default"),
            "retry_new": lambda: app.retry_task(
                failing.task_id, queue_name="default", spawn_new=True
            ),
        }
        with pytest.raises(QueueMismatch, match="is on queue 'other', not 'default'") as info:
            await calls[method]()
        assert (info.value.task_id, info.value.queue) == (failing.task_id, "other")
        assert task_state(clean_db, failing.task_id) == "failed"
        assert (count_tasks(clean_db), count_runs(clean_db)) == (1, 1)


# -- retention, workers, close --------------------------------------------------------------


@run_async  # async only
async def test_cleanup_deletes_old_finished_tasks_and_events(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:
        register_flaky(app)
        clock = FakeClock(app.engine)
        try:
            done = await app.spawn("echo", {})
            waiting = await app.spawn("echo", {}, run_after=timedelta(days=30))
            await app.emit_event("old")
            await run_until_idle(app)
            assert await app.cleanup(older_than=60) == (0, 0)  # nothing is old yet
            clock.advance(3600)
            assert await app.cleanup(older_than=60) == (1, 1)
            assert await app.cleanup(older_than=60) == (0, 0)
        finally:
            clock.close()
        assert await app.fetch_task_result(done.task_id) is None
        assert await app.fetch_task_result(waiting.task_id) == TaskResultSnapshot("pending")
        with pytest.raises(InvalidArgument, match="limit"):
            await app.cleanup(limit=0)


@run_async  # async only
async def test_work_batch_runs_handlers(database_url: str, clean_db: Engine) -> None:
    seen: list[tuple[str, int, str]] = []
    async with async_app_for(database_url) as app:

        @app.register_task("greet")
        async def greet(params: Any, ctx: AsyncTaskContext) -> str:
            assert isinstance(ctx, AsyncTaskContext)
            seen.append((ctx.task_name, ctx.attempt, ctx.queue_name))
            return str(await ctx.step("say", _value(f"hello {params['name']}")))

        first = await app.spawn("greet", {"name": "ada"})
        second = await app.spawn("greet", {"name": "bob"})
        assert await app.work_batch(batch_size=1) == 1
        assert await app.work_batch(worker_id="w2", batch_size=5) == 1
        assert await app.work_batch() == 0
        assert (await app.fetch_task_result(first.task_id)) == TaskResultSnapshot(
            "completed", "hello ada"
        )
        assert (await app.fetch_task_result(second.task_id)) == TaskResultSnapshot(
            "completed", "hello bob"
        )
        assert seen == [("greet", 1, "default"), ("greet", 1, "default")]
        with pytest.raises(InvalidArgument):
            await app.work_batch(batch_size=0)


def backends_named(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": name},
            )
            or 0
        )


@run_async  # async only
async def test_close_disposes_of_the_pool(database_url: str, clean_db: Engine) -> None:
    name = f"absurd-close-{uuid.uuid4().hex[:8]}"
    app = AsyncAbsurd(f"{database_url}?application_name={name}")
    await app.create_queue()
    await app.spawn("t", {})
    assert backends_named(clean_db, name) >= 1  # the pool keeps its connection
    await app.close()
    # A closed connection's backend leaves pg_stat_activity a moment after it exits.
    wait_until(lambda: backends_named(clean_db, name) == 0, "the pool's backends to exit")


# -- absurd_sqla.testing ---------------------------------------------------------------------


@run_async  # async only
async def test_fake_clock_moves_a_sleep(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("nap")
        async def nap(params: Any, ctx: AsyncTaskContext) -> str:
            await ctx.sleep_for("an-hour", 3600)
            return "rested"

        with FakeClock(app.engine, start=datetime(2030, 1, 1, 12)) as clock:
            spawned = await app.spawn("nap", {})
            pending_run = run_until_idle(app)
            assert not isinstance(pending_run, int)  # an awaitable, not run yet  # async only
            assert await pending_run == 1
            assert await app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("sleeping")
            clock.advance(3599)
            assert await run_until_idle(app) == 0  # not due yet
            assert clock.advance(1) == datetime(2030, 1, 1, 13, tzinfo=UTC)
            assert await run_until_idle(app) == 1
        assert await app.fetch_task_result(spawned.task_id) == TaskResultSnapshot(
            "completed", "rested"
        )


# async only: begin
async def fake_now_of(engine: AsyncEngine) -> tuple[int, str]:
    """(backend pid, absurd.fake_now) of a connection the engine hands out."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT pg_backend_pid(), current_setting('absurd.fake_now', true)")
            )
        ).one()
    return int(row[0]), str(row[1] or "")


@run_async
async def test_fake_clock_on_an_async_engine_starts_without_io(database_url: str) -> None:
    engine = create_async_engine(engine_url(database_url))
    try:
        before = datetime.now(UTC)
        clock = FakeClock(engine)
        assert before <= clock.now() <= datetime.now(UTC)
        pool = engine.sync_engine.pool
        assert pool.checkedin() + pool.checkedout() == 0  # type: ignore[attr-defined]
        _, seen = await fake_now_of(engine)
        assert datetime.fromisoformat(seen) == clock.now()
        clock.close()
    finally:
        await engine.dispose()


# async only: end


@run_async  # async only
async def test_closing_the_fake_clock_leaves_no_pooled_connection_on_it(database_url: str) -> None:
    engine = create_async_engine(engine_url(database_url), pool_size=3)
    try:
        clock = FakeClock(engine, start=datetime(2030, 1, 1, tzinfo=UTC))
        async with contextlib.AsyncExitStack() as stack:  # three pooled connections pinned
            conns = [await stack.enter_async_context(engine.connect()) for _ in range(3)]
            for conn in conns:
                assert await conn.scalar(text("SELECT absurd.now()")) == clock.now()
            pinned = {await conn.scalar(text("SELECT pg_backend_pid()")) for conn in conns}
        assert len(pinned) == 3
        clock.close()
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(engine.connect()) for _ in range(3)]
            reused = {await conn.scalar(text("SELECT pg_backend_pid()")) for conn in conns}
            for conn in conns:
                now = await conn.scalar(text("SELECT absurd.now()"))
                assert abs(now - datetime.now(UTC)) < timedelta(minutes=5)
        assert reused == pinned  # the very connections that carried the fake time
    finally:
        await engine.dispose()


@run_async  # async only
async def test_a_closed_fake_clock_leaves_the_next_clock_or_the_real_one(database_url: str) -> None:
    engine = create_async_engine(engine_url(database_url), pool_size=2)
    try:
        with FakeClock(engine, start=datetime(2030, 1, 1, tzinfo=UTC)) as clock:
            async with engine.connect() as first, engine.connect() as second:
                assert await first.scalar(text("SELECT absurd.now()")) == clock.now()
                assert await second.scalar(text("SELECT absurd.now()")) == clock.now()
        second_clock = FakeClock(engine, start=datetime(2040, 1, 1, tzinfo=UTC))
        async with engine.connect() as conn:  # the next clock's time, not the closed one's
            assert await conn.scalar(text("SELECT absurd.now()")) == second_clock.now()
        second_clock.close()
        async with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                setting = text("SELECT current_setting('absurd.fake_now', true)")
                assert await conn.scalar(setting) == ""
    finally:
        await engine.dispose()


@run_async  # async only
async def test_run_until_idle_gives_up_on_a_task_that_never_finishes(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url, default_max_attempts=None) as app:

        @app.register_task("forever")
        async def forever(params: Any, ctx: AsyncTaskContext) -> None:
            raise RuntimeError("again")

        await app.spawn("forever", {})
        with pytest.raises(RuntimeError, match="still busy after 3 batches"):
            await run_until_idle(app, max_batches=3)
