# GENERATED from tests/integration/test_async_client.py by ci/generate_sync.py: do not edit.
# Change tests/integration/test_async_client.py and run `python ci/generate_sync.py`.
"""``Absurd`` against a real PostgreSQL: the binds it takes and refuses,
handlers of the wrong kind, writes that join the caller's ``Session`` or
``Connection`` without committing, and the client's methods (SPEC §3).

ci/generate_sync.py turns test_async_client.py into its sync twin,
test_gen_sync_client.py, so every behaviour here is asserted on both clients.
Each test makes its own client (``app_for``); in test_async_client.py
inside the test's own event loop, since async connections belong to their loop.
"""

from __future__ import annotations

import builtins
import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import sessionmaker

import absurd_sqla
from absurd_sqla import (
    Absurd,
    InvalidArgument,
    QueueMismatch,
    QueueNotFound,
    SpawnRequest,
    SpawnResult,
    TaskContext,
    TaskNotFound,
    TaskResultSnapshot,
    TaskStateError,
)
from absurd_sqla.models import events, tasks
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import (
    Order,
    app_for,
    count_runs,
    count_tasks,
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
    ``psycopg`` (the same URL in the sync twin of this module)."""
    return database_url.replace("postgresql+psycopg://", "postgresql+psycopg://", 1)


def plain_url(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def register_flaky(app: Absurd, queue: str | None = None) -> None:
    """``echo`` returns its params; ``fails`` always raises (one attempt)."""

    @app.register_task("echo", queue=queue)
    def echo(params: Any, ctx: TaskContext) -> Any:
        return ctx.step("copy", _value(params))

    @app.register_task("fails", queue=queue, max_attempts=1)
    def fails(params: Any, ctx: TaskContext) -> Any:
        ctx.step("before", _value("kept"))
        raise RuntimeError("boom")


def _value(value: Any) -> Any:
    def produce() -> Any:
        return value

    return produce


# -- constructor -----------------------------------------------------------------------


def test_bind_url_gives_an_engine_and_session_factory(database_url: str, clean_db: Engine) -> None:
    app = Absurd(database_url, queue_name="from-url")
    try:
        assert isinstance(app.engine, Engine)
        assert app.engine.dialect.name == "postgresql"
        assert isinstance(app.session_factory, sessionmaker)
        assert app.session_factory.kw["bind"] is app.engine
        assert app.queue_name == "from-url"
        app.create_queue()
        spawned = app.spawn("t", {"a": 1})
        assert count_tasks(clean_db, task_id=spawned.task_id, queue_name="from-url") == 1
    finally:
        app.close()
    # A plain postgresql:// URL gets psycopg 3's (async) driver too.
    plain = Absurd(plain_url(clean_db))
    try:
        assert plain.engine.url.drivername == "postgresql+psycopg"
        assert plain.list_queues() == ["from-url"]
    finally:
        plain.close()


def test_bind_engine_and_sessionmaker(database_url: str, clean_db: Engine) -> None:
    engine = create_engine(engine_url(database_url))
    try:
        app = Absurd(engine)
        assert app.engine is engine
        assert isinstance(app.session_factory, sessionmaker)
        assert app.session_factory.kw["bind"] is engine
        app.create_queue()
        first = app.spawn("t", {})

        factory = sessionmaker(engine)
        from_factory = Absurd(factory, queue_name="other")
        assert from_factory.session_factory is factory
        assert from_factory.engine is engine
        assert from_factory.queue_name == "other"
        snapshot = from_factory.fetch_task_result(first.task_id)
        assert snapshot == TaskResultSnapshot("pending")
    finally:
        engine.dispose()
    assert count_tasks(clean_db) == 1


def test_an_autocommit_engine_is_refused(database_url: str) -> None:
    url = engine_url(database_url)
    for bind in (
        create_engine(url, isolation_level="AUTOCOMMIT"),
        create_engine(url).execution_options(isolation_level="AUTOCOMMIT"),
        sessionmaker(create_engine(url, isolation_level="AUTOCOMMIT")),
    ):
        with pytest.raises(InvalidArgument, match="needs transactions"):
            Absurd(bind)


# -- the caller's transaction ------------------------------------------------------------


def test_commit_keeps_order_and_task(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app, app.session_factory() as session:
        order = Order(email="a@example.com", amount=10)
        session.add(order)
        session.flush()
        spawned = app.spawn("fulfil", {"order_id": order.id}, session=session)
        assert orders_and_tasks(clean_db) == (0, 0)  # invisible before the commit
        session.commit()
        assert orders_and_tasks(clean_db) == (1, 1)
        assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("pending")


def test_rollback_drops_order_and_task(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        with app.session_factory() as session:
            session.add(Order(email="a@example.com", amount=10))
            session.flush()
            spawned = app.spawn("fulfil", {"order_id": 1}, session=session)
            session.rollback()
        assert orders_and_tasks(clean_db) == (0, 0)
        assert count_runs(clean_db) == 0
        assert app.fetch_task_result(spawned.task_id) is None


def test_exception_inside_session_begin_writes_nothing(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        with (
            pytest.raises(RuntimeError, match="payment declined"),
            app.session_factory.begin() as session,
        ):
            session.add(Order(email="b@example.com", amount=5))
            app.spawn("fulfil", {"order_id": 2}, session=session)
            app.spawn_many([SpawnRequest("fulfil", {"n": 1})], session=session)
            assert app.emit_event("order.created:2", {"id": 2}, session=session)
            raise RuntimeError("payment declined")
        assert orders_and_tasks(clean_db) == (0, 0)
        assert event_count(clean_db) == 0
        # The rolled-back emit never happened: the next one is the first.
        assert app.emit_event("order.created:2", {"id": 3}) is True


def test_savepoint_rollback_drops_only_the_inner_task(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        with app.session_factory() as session:
            session.add(Order(email="c@example.com", amount=7))
            outer = app.spawn("fulfil", {"n": "outer"}, session=session)
            nested = session.begin_nested()
            inner = app.spawn("fulfil", {"n": "inner"}, session=session)
            nested.rollback()
            session.commit()
        assert orders_and_tasks(clean_db) == (1, 1)
        assert app.fetch_task_result(outer.task_id) is not None
        assert app.fetch_task_result(inner.task_id) is None


def test_a_lone_spawn_on_a_bare_connection_commits_and_rolls_back_with_it(
    database_url: str, clean_db: Engine
) -> None:
    """The spawn is the connection's first statement: its transaction must be
    the one the caller's ``commit()`` or ``rollback()`` ends."""
    with app_for(database_url) as app:
        with app.engine.connect() as conn:
            app.spawn("fulfil", {}, session=conn)
            conn.rollback()
        assert count_tasks(clean_db) == 0
        with app.engine.connect() as conn:
            app.spawn("fulfil", {}, session=conn)
            conn.commit()
        assert count_tasks(clean_db) == 1


def test_a_connection_joins_too(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        with app.engine.connect() as conn:
            app.spawn("fulfil", {}, session=conn)
            app.spawn_many([SpawnRequest("fulfil", {"i": i}) for i in range(3)], session=conn)
            app.emit_event("e", session=conn)
            assert count_tasks(clean_db) == 0
            conn.rollback()
        assert count_tasks(clean_db) == 0
        assert event_count(clean_db) == 0
        with app.engine.begin() as conn:
            app.spawn("fulfil", {}, session=conn)
        assert count_tasks(clean_db) == 1


def test_cancel_and_retry_roll_back_with_the_caller(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        register_flaky(app)
        pending = app.spawn("echo", {}, run_after=3600)
        failed = app.spawn("fails", {})
        assert run_until_idle(app) == 1
        with app.session_factory() as session:
            assert app.cancel_task(pending.task_id, session=session) is True
            retried = app.retry_task(failed.task_id, session=session)
            assert retried.attempt == 2
            session.rollback()
        assert task_state(clean_db, pending.task_id) == "pending"
        assert task_state(clean_db, failed.task_id) == "failed"
        with app.session_factory.begin() as session:
            app.cancel_task(pending.task_id, session=session)
        assert task_state(clean_db, pending.task_id) == "cancelled"


def test_queue_writes_join_the_caller(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        with app.session_factory() as session:
            app.create_queue("billing", session=session)
            app.drop_queue("default", session=session)
            session.rollback()
        assert app.list_queues() == ["default"]


def test_notify_is_sent_only_on_commit(database_url: str, clean_db: Engine) -> None:
    with (
        app_for(database_url) as app,
        psycopg.connect(plain_url(clean_db), autocommit=True) as listener,
    ):
        listener.execute('LISTEN "absurd.default"')
        with app.session_factory() as session:
            app.spawn("fulfil", {}, session=session)
            session.rollback()
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
        with app.session_factory() as session:
            app.spawn("fulfil", {}, session=session)
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not yet
            session.commit()
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in received] == ["absurd.default"]
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []


# -- queues, spawn, events ---------------------------------------------------------------


def test_queues_create_list_and_drop(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        app.create_queue("zeta")
        app.create_queue("alpha")
        app.create_queue("alpha")  # idempotent
        assert app.list_queues() == ["alpha", "default", "zeta"]
        spawned = app.spawn("t", {}, queue="zeta")
        app.drop_queue("zeta")
        assert app.list_queues() == ["alpha", "default"]
        assert count_tasks(clean_db, task_id=spawned.task_id) == 0
        with pytest.raises(QueueNotFound):
            app.spawn("t", {}, queue="zeta")


def test_spawn_stores_every_option(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        app.create_queue("billing")
        retry = {"kind": "fixed", "base_seconds": 30}
        spawned = app.spawn(
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
        again = app.spawn("charge", {"order": 18}, queue="billing", idempotency_key="charge:17")
        assert (again.task_id, again.run_id, again.created) == (
            spawned.task_id,
            spawned.run_id,
            False,
        )
        assert count_tasks(clean_db) == 1


def test_spawn_many_in_request_order_and_all_or_nothing(
    database_url: str, clean_db: Engine
) -> None:
    with app_for(database_url) as app:
        app.create_queue("other")
        requests = [
            SpawnRequest("a", {"i": 0}),
            SpawnRequest("b", {"i": 1}, queue="other"),
            SpawnRequest("c", {"i": 2}, idempotency_key="k"),
            SpawnRequest("d", {"i": 3}, idempotency_key="k"),
        ]
        results = app.spawn_many(requests)
        assert [r.created for r in results] == [True, True, True, False]
        assert results[3].task_id == results[2].task_id
        with clean_db.connect() as conn:
            rows: dict[uuid.UUID, str] = dict(
                conn.execute(
                    text("SELECT task_id, task_name FROM absurd.tasks"),
                ).all()
            )
        assert [rows[r.task_id] for r in results] == ["a", "b", "c", "c"]
        assert app.spawn_many([]) == []
        with pytest.raises(QueueNotFound):
            app.spawn_many([SpawnRequest("e"), SpawnRequest("f", queue="missing")])
        assert count_tasks(clean_db) == 3


def test_emit_event_first_emit_wins(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        app.create_queue("other")
        assert app.emit_event("paid", {"n": 1}) is True
        assert app.emit_event("paid", {"n": 2}) is False
        assert app.emit_event("paid", {"n": 3}, queue_name="other") is True  # per queue
        with clean_db.connect() as conn:
            query = text("SELECT queue_name, payload FROM absurd.events")
            stored: dict[str, Any] = dict(conn.execute(query).all())
        assert stored == {"default": {"n": 1}, "other": {"n": 3}}
        with pytest.raises(QueueNotFound):
            app.emit_event("paid", queue_name="missing")


# -- cancel, retry, results ---------------------------------------------------------------


def test_cancel_task(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        spawned = app.spawn("t", {})
        bystander = app.spawn("t", {})
        assert app.cancel_task(spawned.task_id) is True
        assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("cancelled")
        assert app.cancel_task(str(spawned.task_id)) is False  # already finished
        assert task_state(clean_db, bystander.task_id) == "pending"
        missing = uuid.uuid4()
        with pytest.raises(TaskNotFound, match=f"task {missing} not found"):
            app.cancel_task(missing)


def test_retry_task_in_place_and_as_a_new_task(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        register_flaky(app)
        failed = app.spawn("fails", {"x": 1}, headers={"h": 1})
        run_until_idle(app)
        assert task_state(clean_db, failed.task_id) == "failed"

        copy = app.retry_task(failed.task_id, spawn_new=True, max_attempts=3)
        assert copy.task_id != failed.task_id and copy.created
        with clean_db.connect() as conn:
            row = conn.execute(
                text("SELECT params, headers, max_attempts FROM absurd.tasks WHERE task_id = :t"),
                {"t": copy.task_id},
            ).one()
        assert (row.params, row.headers, row.max_attempts) == ({"x": 1}, {"h": 1}, 3)

        retried = app.retry_task(failed.task_id, max_attempts=2)
        assert (retried.task_id, retried.attempt, retried.created) == (failed.task_id, 2, False)
        assert task_state(clean_db, failed.task_id) == "pending"
        with pytest.raises(TaskStateError, match="is pending"):
            app.retry_task(failed.task_id)
        # In place, the checkpoint of the first attempt is kept.
        with clean_db.connect() as conn:
            kept = conn.scalar(
                text("SELECT count(*) FROM absurd.checkpoints WHERE task_id = :t"),
                {"t": failed.task_id},
            )
        assert kept == 1


def test_fetch_and_await_task_result(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        register_flaky(app)
        done = app.spawn("echo", {"v": 1})
        failed = app.spawn("fails", {})
        pending = app.spawn("echo", {}, run_after=3600)
        assert app.fetch_task_result(done.task_id) == TaskResultSnapshot("pending")
        assert run_until_idle(app) == 2

        assert app.fetch_task_result(done.task_id) == TaskResultSnapshot("completed", {"v": 1})
        assert app.await_task_result(done.task_id, timeout=5).result == {"v": 1}
        snapshot = app.await_task_result(str(failed.task_id), timeout=5)
        assert snapshot.state == "failed"
        assert snapshot.failure is not None and snapshot.failure["message"] == "boom"
        assert app.fetch_task_result(uuid.uuid4()) is None

        with pytest.raises(absurd_sqla.TimeoutError, match="still pending") as info:
            app.await_task_result(pending.task_id, timeout=0.05)
        assert isinstance(info.value, builtins.TimeoutError)
        assert (info.value.task_id, info.value.state) == (pending.task_id, "pending")
        with pytest.raises(TaskNotFound):
            app.await_task_result(uuid.uuid4(), timeout=1)


# -- task ids ---------------------------------------------------------------------------------


def test_task_ids_are_found_by_id_alone(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        app.create_queue("other")
        register_flaky(app, queue="other")
        done = app.spawn("echo", {"x": 1})
        failing = app.spawn("fails", {})
        live = app.spawn("echo", {}, run_after=3600)
        assert run_until_idle(app, queue="other") == 2
        snapshot = app.fetch_task_result(done.task_id)
        assert snapshot == TaskResultSnapshot("completed", {"x": 1})
        assert app.await_task_result(done.task_id, timeout=1) == snapshot
        assert app.fetch_task_result(done.task_id, queue_name="other") == snapshot
        new = app.retry_task(failing.task_id, spawn_new=True)
        with clean_db.connect() as conn:
            queue = conn.scalar(
                text("SELECT queue_name FROM absurd.tasks WHERE task_id = :t"), {"t": new.task_id}
            )
        assert queue == "other"
        assert app.retry_task(failing.task_id).attempt == 2
        assert app.cancel_task(live.task_id) is True


@pytest.mark.parametrize("method", ["fetch", "await", "cancel", "retry", "retry_new"])
def test_a_queue_name_that_does_not_match_is_refused_and_writes_nothing(
    database_url: str, clean_db: Engine, method: str
) -> None:
    with app_for(database_url) as app:
        app.create_queue("other")
        register_flaky(app, queue="other")
        failing = app.spawn("fails", {})
        run_until_idle(app, queue="other")
        calls: dict[str, Callable[[], Any]] = {
            "fetch": lambda: app.fetch_task_result(failing.task_id, queue_name="default"),
            "await": lambda: app.await_task_result(failing.task_id, queue_name="default"),
            "cancel": lambda: app.cancel_task(failing.task_id, queue_name="default"),
            "retry": lambda: app.retry_task(failing.task_id, queue_name="default"),
            "retry_new": lambda: app.retry_task(
                failing.task_id, queue_name="default", spawn_new=True
            ),
        }
        with pytest.raises(QueueMismatch, match="is on queue 'other', not 'default'") as info:
            calls[method]()
        assert (info.value.task_id, info.value.queue) == (failing.task_id, "other")
        assert task_state(clean_db, failing.task_id) == "failed"
        assert (count_tasks(clean_db), count_runs(clean_db)) == (1, 1)


# -- retention, workers, close --------------------------------------------------------------


def test_cleanup_deletes_old_finished_tasks_and_events(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:
        register_flaky(app)
        clock = FakeClock(app.engine)
        try:
            done = app.spawn("echo", {})
            waiting = app.spawn("echo", {}, run_after=timedelta(days=30))
            app.emit_event("old")
            run_until_idle(app)
            assert app.cleanup(older_than=60) == (0, 0)  # nothing is old yet
            clock.advance(3600)
            assert app.cleanup(older_than=60) == (1, 1)
            assert app.cleanup(older_than=60) == (0, 0)
        finally:
            clock.close()
        assert app.fetch_task_result(done.task_id) is None
        assert app.fetch_task_result(waiting.task_id) == TaskResultSnapshot("pending")
        with pytest.raises(InvalidArgument, match="limit"):
            app.cleanup(limit=0)


def test_work_batch_runs_handlers(database_url: str, clean_db: Engine) -> None:
    seen: list[tuple[str, int, str]] = []
    with app_for(database_url) as app:

        @app.register_task("greet")
        def greet(params: Any, ctx: TaskContext) -> str:
            assert isinstance(ctx, TaskContext)
            seen.append((ctx.task_name, ctx.attempt, ctx.queue_name))
            return str(ctx.step("say", _value(f"hello {params['name']}")))

        first = app.spawn("greet", {"name": "ada"})
        second = app.spawn("greet", {"name": "bob"})
        assert app.work_batch(batch_size=1) == 1
        assert app.work_batch(worker_id="w2", batch_size=5) == 1
        assert app.work_batch() == 0
        assert (app.fetch_task_result(first.task_id)) == TaskResultSnapshot(
            "completed", "hello ada"
        )
        assert (app.fetch_task_result(second.task_id)) == TaskResultSnapshot(
            "completed", "hello bob"
        )
        assert seen == [("greet", 1, "default"), ("greet", 1, "default")]
        with pytest.raises(InvalidArgument):
            app.work_batch(batch_size=0)


def backends_named(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": name},
            )
            or 0
        )


def test_close_disposes_of_the_pool(database_url: str, clean_db: Engine) -> None:
    name = f"absurd-close-{uuid.uuid4().hex[:8]}"
    app = Absurd(f"{database_url}?application_name={name}")
    app.create_queue()
    app.spawn("t", {})
    assert backends_named(clean_db, name) >= 1  # the pool keeps its connection
    app.close()
    # A closed connection's backend leaves pg_stat_activity a moment after it exits.
    wait_until(lambda: backends_named(clean_db, name) == 0, "the pool's backends to exit")


# -- absurd_sqla.testing ---------------------------------------------------------------------


def test_fake_clock_moves_a_sleep(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:

        @app.register_task("nap")
        def nap(params: Any, ctx: TaskContext) -> str:
            ctx.sleep_for("an-hour", 3600)
            return "rested"

        with FakeClock(app.engine, start=datetime(2030, 1, 1, 12)) as clock:
            spawned = app.spawn("nap", {})
            pending_run = run_until_idle(app)
            assert pending_run == 1
            assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("sleeping")
            clock.advance(3599)
            assert run_until_idle(app) == 0  # not due yet
            assert clock.advance(1) == datetime(2030, 1, 1, 13, tzinfo=UTC)
            assert run_until_idle(app) == 1
        assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("completed", "rested")


def test_closing_the_fake_clock_leaves_no_pooled_connection_on_it(database_url: str) -> None:
    engine = create_engine(engine_url(database_url), pool_size=3)
    try:
        clock = FakeClock(engine, start=datetime(2030, 1, 1, tzinfo=UTC))
        with contextlib.ExitStack() as stack:  # three pooled connections pinned
            conns = [stack.enter_context(engine.connect()) for _ in range(3)]
            for conn in conns:
                assert conn.scalar(text("SELECT absurd.now()")) == clock.now()
            pinned = {conn.scalar(text("SELECT pg_backend_pid()")) for conn in conns}
        assert len(pinned) == 3
        clock.close()
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(engine.connect()) for _ in range(3)]
            reused = {conn.scalar(text("SELECT pg_backend_pid()")) for conn in conns}
            for conn in conns:
                now = conn.scalar(text("SELECT absurd.now()"))
                assert abs(now - datetime.now(UTC)) < timedelta(minutes=5)
        assert reused == pinned  # the very connections that carried the fake time
    finally:
        engine.dispose()


def test_a_closed_fake_clock_leaves_the_next_clock_or_the_real_one(database_url: str) -> None:
    engine = create_engine(engine_url(database_url), pool_size=2)
    try:
        with (
            FakeClock(engine, start=datetime(2030, 1, 1, tzinfo=UTC)) as clock,
            engine.connect() as first,
            engine.connect() as second,
        ):
            assert first.scalar(text("SELECT absurd.now()")) == clock.now()
            assert second.scalar(text("SELECT absurd.now()")) == clock.now()
        second_clock = FakeClock(engine, start=datetime(2040, 1, 1, tzinfo=UTC))
        with engine.connect() as conn:  # the next clock's time, not the closed one's
            assert conn.scalar(text("SELECT absurd.now()")) == second_clock.now()
        second_clock.close()
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                setting = text("SELECT current_setting('absurd.fake_now', true)")
                assert conn.scalar(setting) == ""
    finally:
        engine.dispose()


def test_run_until_idle_gives_up_on_a_task_that_never_finishes(
    database_url: str, clean_db: Engine
) -> None:
    with app_for(database_url, default_max_attempts=None) as app:

        @app.register_task("forever")
        def forever(params: Any, ctx: TaskContext) -> None:
            raise RuntimeError("again")

        app.spawn("forever", {})
        with pytest.raises(RuntimeError, match="still busy after 3 batches"):
            run_until_idle(app, max_batches=3)
