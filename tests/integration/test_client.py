"""The sync client against a real PostgreSQL: constructor, queues, spawn,
spawn_many, events, cancel, results and bad input (SPEC §2, §3, §5).

The worker does not exist here: where a test needs a task to be completed,
failed or sleeping it sets the rows by hand with SQL, as a worker would.
"""

from __future__ import annotations

import builtins
import math
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import absurd_sqla
from absurd_sqla import (
    Absurd,
    Hooks,
    InvalidArgument,
    InvalidQueueName,
    NotSerializable,
    QueueMismatch,
    QueueNotFound,
    SpawnRequest,
    SpawnResult,
    TaskNotFound,
    TaskResultSnapshot,
)

FAKE_NOW = datetime(2030, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)
NASTY = "x'); drop table absurd.tasks; --"
TABLES = ("queues", "tasks", "runs", "checkpoints", "events", "waits")


# -- helpers -------------------------------------------------------------------


def sql(engine: Engine, statement: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(statement), params))


def scalar(engine: Engine, statement: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.scalar(text(statement), params)


def execute(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def count(engine: Engine, table: str, where: str = "true", **params: Any) -> int:
    assert table in TABLES
    return int(scalar(engine, f"SELECT count(*) FROM absurd.{table} WHERE {where}", **params))


def counts(engine: Engine) -> dict[str, int]:
    return {table: count(engine, table) for table in TABLES}


def task_row(engine: Engine, task_id: uuid.UUID) -> Any:
    return sql(engine, "SELECT * FROM absurd.tasks WHERE task_id = :t", t=task_id)[0]


def run_row(engine: Engine, run_id: uuid.UUID) -> Any:
    return sql(engine, "SELECT * FROM absurd.runs WHERE run_id = :r", r=run_id)[0]


def db_now(engine: Engine) -> datetime:
    value = scalar(engine, "SELECT absurd.now()")
    assert isinstance(value, datetime)
    return value


def set_fake_now(conn: Any, when: datetime) -> None:
    """Transaction-local, so nothing leaks into the pool."""
    conn.execute(text("SELECT set_config('absurd.fake_now', :v, true)"), {"v": when.isoformat()})


def complete_by_hand(engine: Engine, task_id: uuid.UUID, result: Any) -> None:
    """What a worker's completion writes."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE absurd.runs SET state = 'completed', result = CAST(:r AS jsonb), "
                "finished_at = absurd.now() WHERE task_id = :t"
            ),
            {"t": task_id, "r": absurd_sqla._core.encode_json("result", result)},
        )
        conn.execute(
            text(
                "UPDATE absurd.tasks SET state = 'completed', result = CAST(:r AS jsonb), "
                "finished_at = absurd.now() WHERE task_id = :t"
            ),
            {"t": task_id, "r": absurd_sqla._core.encode_json("result", result)},
        )


def fail_by_hand(engine: Engine, task_id: uuid.UUID, failure: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE absurd.runs SET state = 'failed', failure_reason = CAST(:f AS jsonb), "
                "finished_at = absurd.now() WHERE task_id = :t"
            ),
            {"t": task_id, "f": absurd_sqla._core.encode_json("failure", failure)},
        )
        conn.execute(
            text(
                "UPDATE absurd.tasks SET state = 'failed', finished_at = absurd.now(), "
                "result = '{\"stale\": true}' WHERE task_id = :t"
            ),
            {"t": task_id},
        )


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run_threads(*targets: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
        assert not thread.is_alive(), "thread hung"
    if errors:
        raise errors[0]


# -- constructor ----------------------------------------------------------------


def test_constructor_url_string(app: Absurd, clean_db: Engine) -> None:
    other = Absurd(url_of(clean_db))
    try:
        assert other.engine is not clean_db
        assert other.engine.url.drivername == "postgresql+psycopg"
        other.create_queue("from-url")
        spawned = other.spawn("t", {"a": 1}, queue="from-url")
        assert app.fetch_task_result(spawned.task_id, queue_name="from-url") is not None
    finally:
        other.close()
    assert "from-url" in app.list_queues()


def test_constructor_plain_postgresql_url_uses_psycopg3(clean_db: Engine) -> None:
    plain = clean_db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    other = Absurd(plain)
    try:
        assert other.engine.url.drivername == "postgresql+psycopg"
        assert other.list_queues() == []
    finally:
        other.close()
    other = Absurd(make_url(plain))  # a URL object works too
    try:
        assert other.engine.url.drivername == "postgresql+psycopg"
    finally:
        other.close()


def test_constructor_engine(clean_db: Engine) -> None:
    app = Absurd(clean_db)
    assert app.engine is clean_db
    app.create_queue()
    spawned = app.spawn("t", {})
    assert count(clean_db, "tasks", "task_id = :t", t=spawned.task_id) == 1


def test_constructor_sessionmaker(clean_db: Engine) -> None:
    factory = sessionmaker(clean_db)
    app = Absurd(factory)
    assert app.engine is clean_db
    assert app.session_factory is factory
    app.create_queue()
    spawned = app.spawn("t", {})
    assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("pending")


def test_constructor_rejects_unbound_sessionmaker() -> None:
    with pytest.raises(TypeError):
        Absurd(sessionmaker())


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///tmp/x.db", "mysql+pymysql://u@localhost/db"]
)
def test_constructor_rejects_non_postgres_url(url: str) -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        Absurd(url)


@pytest.mark.parametrize("bind", [42, 1.5, object(), ["postgresql://x/y"]])
def test_constructor_rejects_wrong_type(bind: Any) -> None:
    with pytest.raises(TypeError):
        Absurd(bind)


def test_constructor_rejects_bad_queue_and_attempts() -> None:
    with pytest.raises(InvalidQueueName):
        Absurd("postgresql://localhost/x", queue_name="bad name")
    with pytest.raises(InvalidArgument):
        Absurd("postgresql://localhost/x", default_max_attempts=0)


def test_default_url_from_absurd_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSURD_DATABASE_URL", "postgresql://someone@db.example:6543/jobs")
    monkeypatch.setenv("PGDATABASE", "ignored")
    app = Absurd()
    url = app.engine.url
    assert (url.drivername, url.username, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "someone",
        "db.example",
        6543,
        "jobs",
    )
    app.close()


def test_default_url_from_pgdatabase_then_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSURD_DATABASE_URL", raising=False)
    monkeypatch.setenv("PGDATABASE", "jobsdb")
    url = Absurd().engine.url
    assert (url.drivername, url.database) == ("postgresql+psycopg", "jobsdb")
    monkeypatch.delenv("PGDATABASE")
    url = Absurd().engine.url
    assert (url.drivername, url.host, url.database) == ("postgresql+psycopg", "localhost", "absurd")


# -- queues ---------------------------------------------------------------------


def test_create_queue_is_idempotent_and_list_sorted(app: Absurd) -> None:
    for name in ["zeta", "alpha", "Mid.q-1", "alpha", "beta_2"]:
        app.create_queue(name)
    app.create_queue()  # "default" again
    assert app.list_queues() == sorted(["zeta", "alpha", "Mid.q-1", "beta_2", "default"])


def test_longest_queue_name_works_end_to_end(app: Absurd, clean_db: Engine) -> None:
    # 56 characters: "absurd." + name is exactly 63 bytes, Postgres' channel limit.
    name = "q" * 56
    app.create_queue(name)
    spawned = app.spawn("t", {}, queue=name)
    assert app.emit_event("e", 1, queue_name=name) is True
    assert count(clean_db, "tasks", "queue_name = :q", q=name) == 1
    assert app.fetch_task_result(spawned.task_id, queue_name=name) is not None


def test_drop_queue_cascades(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("doomed")
    app.create_queue("kept")
    doomed = [app.spawn("t", {"i": i}, queue="doomed") for i in range(3)]
    kept = app.spawn("t", {}, queue="kept")
    app.emit_event("e", {"x": 1}, queue_name="doomed")
    app.emit_event("e", {"x": 2}, queue_name="kept")
    # A checkpoint and a wait, as a worker would write them.
    for spawned in (doomed[0], kept):
        execute(
            clean_db,
            "INSERT INTO absurd.checkpoints (task_id, checkpoint_name, state, owner_run_id) "
            "VALUES (:t, 'step', '1', :r)",
            t=spawned.task_id,
            r=spawned.run_id,
        )
        execute(
            clean_db,
            "INSERT INTO absurd.waits (run_id, task_id, queue_name, event_name, step_name) "
            "SELECT run_id, task_id, queue_name, 'later', 'wait' FROM absurd.runs "
            "WHERE run_id = :r",
            r=spawned.run_id,
        )

    app.drop_queue("doomed")

    assert "doomed" not in app.list_queues()
    assert counts(clean_db) == {
        "queues": 2,  # default, kept
        "tasks": 1,
        "runs": 1,
        "checkpoints": 1,
        "events": 1,
        "waits": 1,
    }
    assert app.fetch_task_result(doomed[0].task_id, queue_name="doomed") is None
    assert app.fetch_task_result(kept.task_id, queue_name="kept") is not None


INVALID_QUEUE_NAMES: list[Any] = [
    "",
    "q" * 57,
    "has space",
    ";drop",
    "x'; drop table absurd.queues; --",
    "-leading-dash",
    "café",
    "tab\t",
    "new\nline",
    "default\n",  # a regex ending in `$` would match before the newline
    5,
    b"bytes",
    ["default"],
]


@pytest.mark.parametrize("name", INVALID_QUEUE_NAMES)
def test_invalid_queue_names_write_nothing(app: Absurd, clean_db: Engine, name: Any) -> None:
    before = counts(clean_db)
    with pytest.raises(InvalidQueueName) as info:
        app.create_queue(name)
    assert isinstance(info.value, InvalidArgument)  # callers may catch the general error
    with pytest.raises(InvalidQueueName):
        app.drop_queue(name)
    with pytest.raises(InvalidQueueName):
        app.spawn("t", {}, queue=name)
    with pytest.raises(InvalidQueueName):
        app.spawn_many([SpawnRequest("ok", {}), SpawnRequest("t", {}, queue=name)])
    with pytest.raises(InvalidQueueName):
        app.emit_event("e", 1, queue_name=name)
    with pytest.raises(InvalidQueueName):
        app.register_task("t", queue=name)(lambda params, ctx: None)
    assert counts(clean_db) == before
    assert app.list_queues() == ["default"]


def test_unknown_queue_raises_queue_not_found_and_writes_nothing(
    app: Absurd, clean_db: Engine
) -> None:
    with pytest.raises(QueueNotFound):
        app.spawn("t", {}, queue="missing")
    with pytest.raises(QueueNotFound):
        app.spawn("t", {}, queue="missing", idempotency_key="k")
    with pytest.raises(QueueNotFound):
        app.spawn_many([SpawnRequest("a", {}), SpawnRequest("b", {}, queue="missing")])
    with pytest.raises(QueueNotFound):
        app.emit_event("e", {"x": 1}, queue_name="missing")
    missing_app = Absurd(clean_db, queue_name="missing")
    with pytest.raises(QueueNotFound):
        missing_app.spawn("t", {})
    assert counts(clean_db) == {t: (1 if t == "queues" else 0) for t in TABLES}


def test_unknown_queue_with_session_leaves_transaction_usable(
    app: Absurd, clean_db: Engine
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(QueueNotFound):
            app.spawn("t", {}, queue="missing", session=session)
        with pytest.raises(QueueNotFound):
            app.emit_event("e", None, queue_name="missing", session=session)
        ok = app.spawn("t", {"ok": True}, session=session)
        session.commit()
    assert count(clean_db, "tasks") == 1
    assert count(clean_db, "events") == 0
    assert task_row(clean_db, ok.task_id).params == {"ok": True}


def test_spawn_many_unknown_queue_with_session_writes_nothing(
    app: Absurd, clean_db: Engine
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(QueueNotFound):
            app.spawn_many(
                [SpawnRequest("a", {"i": 1}), SpawnRequest("b", {"i": 2}, queue="missing")],
                session=session,
            )
        # The caller handled the error and carries on with its own work.
        session.commit()
    assert count(clean_db, "tasks") == 0
    assert count(clean_db, "runs") == 0


# -- register_task ---------------------------------------------------------------


def test_register_task_returns_function_and_defaults_apply(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("mail")

    def send(params: Any, ctx: Any) -> str:
        return "sent"

    decorated = app.register_task(
        "send-mail",
        queue="mail",
        default_max_attempts=7,
        default_cancellation={"max_delay": 60, "max_duration": 300},
    )(send)
    assert decorated is send

    spawned = app.spawn("send-mail", {"to": "a@example.com"})
    row = task_row(clean_db, spawned.task_id)
    assert row.queue_name == "mail"
    assert row.max_attempts == 7
    assert row.cancellation == {"max_delay": 60, "max_duration": 300}
    assert run_row(clean_db, spawned.run_id).queue_name == "mail"

    # Explicit arguments win over the registration.
    app.create_queue("other")
    spawned = app.spawn(
        "send-mail", {}, queue="other", max_attempts=2, cancellation={"max_delay": 5}
    )
    row = task_row(clean_db, spawned.task_id)
    assert (row.queue_name, row.max_attempts, row.cancellation) == ("other", 2, {"max_delay": 5})


def test_register_task_without_overrides_uses_app_defaults(clean_db: Engine) -> None:
    app = Absurd(clean_db, default_max_attempts=3)
    app.create_queue()

    @app.register_task("plain")
    def plain(params: Any, ctx: Any) -> None:
        return None

    row = task_row(clean_db, app.spawn("plain", {}).task_id)
    assert (row.queue_name, row.max_attempts, row.cancellation) == ("default", 3, None)
    unregistered = task_row(clean_db, app.spawn("unknown-name", {}).task_id)
    assert unregistered.max_attempts == 3


def test_app_default_max_attempts_none_means_unlimited(clean_db: Engine) -> None:
    app = Absurd(clean_db, default_max_attempts=None)
    app.create_queue()
    assert task_row(clean_db, app.spawn("t", {}).task_id).max_attempts is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_max_attempts": 0},
        {"default_max_attempts": -1},
        {"default_cancellation": {"max_wait": 3}},
        {"default_cancellation": {"max_delay": -1}},
    ],
)
def test_register_task_rejects_bad_defaults(app: Absurd, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        app.register_task("t", **kwargs)(lambda params, ctx: None)


@pytest.mark.parametrize("name", ["", "n" * 256, None, 3])
def test_register_task_rejects_bad_names(app: Absurd, name: Any) -> None:
    with pytest.raises(InvalidArgument):
        app.register_task(name)(lambda params, ctx: None)


# -- spawn ------------------------------------------------------------------------


def test_spawn_stores_every_option(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("billing")
    retry = {"kind": "exponential", "base_seconds": 30, "factor": 3, "max_seconds": 600}
    spawned = app.spawn(
        "charge",
        {"order": 17, "items": [1, 2.5, "x", None, True], "nested": {"ü": "ß"}},
        max_attempts=9,
        retry_strategy=retry,
        headers={"trace_id": "abc", "n": 1},
        queue="billing",
        cancellation={"max_delay": 120, "max_duration": 3600.5},
        idempotency_key="charge:17",
    )
    assert isinstance(spawned, SpawnResult)
    assert (spawned.attempt, spawned.created) == (1, True)
    assert spawned.task_id.version == 7 and spawned.run_id.version == 7
    assert spawned.task_id != spawned.run_id

    task = task_row(clean_db, spawned.task_id)
    assert task.task_name == "charge"
    assert task.queue_name == "billing"
    assert task.params == {"order": 17, "items": [1, 2.5, "x", None, True], "nested": {"ü": "ß"}}
    assert task.headers == {"trace_id": "abc", "n": 1}
    assert task.retry_strategy == retry
    assert task.max_attempts == 9
    assert task.cancellation == {"max_delay": 120, "max_duration": 3600.5}
    assert task.idempotency_key == "charge:17"
    assert task.state == "pending"
    assert task.attempts == 1
    assert task.last_run_id == spawned.run_id
    assert task.result is None and task.first_started_at is None and task.finished_at is None

    run = run_row(clean_db, spawned.run_id)
    assert run.task_id == spawned.task_id
    assert run.queue_name == "billing"
    assert run.attempt == 1
    assert run.state == "pending"
    assert run.claimed_by is None and run.claim_expires_at is None
    # absurd.now() is clock_timestamp(): each call in the statement differs slightly.
    for moment in (run.available_at, run.created_at):
        assert abs(moment - task.enqueued_at) < timedelta(seconds=1)


def test_spawn_defaults(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t")
    task = task_row(clean_db, spawned.task_id)
    assert task.queue_name == "default"
    assert task.max_attempts == 5
    assert (task.retry_strategy, task.headers, task.cancellation) == (None, None, None)
    assert task.idempotency_key is None
    assert task.params is None


@pytest.mark.parametrize(
    "params",
    ["just a string", 42, 3.25, [1, [2, [3]]], True, {"big": 10**30}, {"empty": {}}, []],
)
def test_spawn_params_round_trip(app: Absurd, clean_db: Engine, params: Any) -> None:
    spawned = app.spawn("t", params)
    assert task_row(clean_db, spawned.task_id).params == params


def test_spawn_run_after_seconds_uses_database_clock(app: Absurd, clean_db: Engine) -> None:
    with clean_db.connect() as conn:
        set_fake_now(conn, FAKE_NOW)
        assert conn.scalar(text("SELECT absurd.now()")) == FAKE_NOW
        delayed = app.spawn("t", {}, run_after=90, session=conn)
        fractional = app.spawn("t", {}, run_after=1.5, session=conn)
        as_timedelta = app.spawn("t", {}, run_after=timedelta(minutes=2), session=conn)
        immediate = app.spawn("t", {}, run_after=0, session=conn)
        default = app.spawn("t", {}, session=conn)
        conn.commit()
    assert run_row(clean_db, delayed.run_id).available_at == FAKE_NOW + timedelta(seconds=90)
    assert run_row(clean_db, fractional.run_id).available_at == FAKE_NOW + timedelta(seconds=1.5)
    assert run_row(clean_db, as_timedelta.run_id).available_at == FAKE_NOW + timedelta(minutes=2)
    assert run_row(clean_db, immediate.run_id).available_at == FAKE_NOW
    assert run_row(clean_db, default.run_id).available_at == FAKE_NOW
    # enqueued_at is when the task first becomes due (max_delay counts from it).
    assert task_row(clean_db, delayed.task_id).enqueued_at == FAKE_NOW + timedelta(seconds=90)
    assert task_row(clean_db, default.task_id).enqueued_at == FAKE_NOW
    # The fake clock was transaction-local: it does not leak into the pool.
    assert abs(db_now(clean_db) - datetime.now(UTC)) < timedelta(minutes=5)


def test_spawn_run_after_seconds_without_fake_clock(app: Absurd, clean_db: Engine) -> None:
    before = db_now(clean_db)
    spawned = app.spawn("t", {}, run_after=3600)
    after = db_now(clean_db)
    available = run_row(clean_db, spawned.run_id).available_at
    assert before + timedelta(hours=1) <= available <= after + timedelta(hours=1)


def test_spawn_run_after_aware_datetime_is_exact(app: Absurd, clean_db: Engine) -> None:
    when = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    past = datetime(2001, 1, 1, tzinfo=UTC)
    later = app.spawn("t", {}, run_after=when)
    earlier = app.spawn("t", {}, run_after=past)
    assert run_row(clean_db, later.run_id).available_at == when
    assert run_row(clean_db, earlier.run_id).available_at == past


def test_spawn_run_after_naive_datetime_rejected(app: Absurd, clean_db: Engine) -> None:
    with pytest.raises(InvalidArgument, match="timezone"):
        app.spawn("t", {}, run_after=datetime(2031, 1, 1))
    assert count(clean_db, "tasks") == 0


def test_spawn_idempotency(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("other")
    first = app.spawn("t", {"v": 1}, idempotency_key="once")
    again = app.spawn("t", {"v": 2}, idempotency_key="once")
    assert again == SpawnResult(first.task_id, first.run_id, 1, False)
    assert count(clean_db, "tasks", "idempotency_key = 'once'") == 1
    assert count(clean_db, "runs") == 1
    assert task_row(clean_db, first.task_id).params == {"v": 1}  # first spawn wins

    elsewhere = app.spawn("t", {"v": 3}, idempotency_key="once", queue="other")
    assert elsewhere.created is True
    assert elsewhere.task_id != first.task_id
    assert count(clean_db, "tasks", "idempotency_key = 'once'") == 2


def test_spawn_idempotency_survives_task_progress(app: Absurd, clean_db: Engine) -> None:
    first = app.spawn("t", {}, idempotency_key="k")
    complete_by_hand(clean_db, first.task_id, "done")
    again = app.spawn("t", {}, idempotency_key="k")
    assert (again.task_id, again.created) == (first.task_id, False)


def test_concurrent_idempotent_spawns_create_one_task(app: Absurd, clean_db: Engine) -> None:
    rounds = 8
    results: dict[tuple[int, int], SpawnResult] = {}
    barriers = [threading.Barrier(2, timeout=10) for _ in range(rounds)]

    def spawner(who: int) -> Callable[[], None]:
        def run() -> None:
            for n in range(rounds):
                with Session(clean_db) as session:
                    session.execute(text("SELECT 1"))  # connection checked out, tx open
                    barriers[n].wait()
                    results[who, n] = app.spawn(
                        "t", {"who": who}, idempotency_key=f"race-{n}", session=session
                    )
                    session.commit()

        return run

    run_threads(spawner(0), spawner(1))
    for n in range(rounds):
        a, b = results[0, n], results[1, n]
        assert a.task_id == b.task_id
        assert a.run_id == b.run_id
        assert sorted([a.created, b.created]) == [False, True]
        assert count(clean_db, "tasks", "idempotency_key = :k", k=f"race-{n}") == 1
    assert count(clean_db, "runs") == rounds


def _wait_until_blocked_on_lock(engine: Engine) -> None:
    """Until another backend of this database waits for a lock (bounded)."""
    done = threading.Event()
    for _ in range(1000):
        waiting = scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'",
        )
        if waiting:
            return
        done.wait(0.005)
    raise AssertionError("the second spawn never blocked on the first one's key")


@pytest.mark.parametrize("first_commits", [True, False])
def test_idempotent_spawn_blocked_by_uncommitted_twin(
    app: Absurd, clean_db: Engine, first_commits: bool
) -> None:
    """B's insert waits on A's uncommitted key; A's outcome decides B's result."""
    with Session(clean_db) as a_session:
        a = app.spawn("t", {"who": "a"}, idempotency_key="twin", session=a_session)
        b_result: list[SpawnResult] = []

        def spawn_b() -> None:
            b_result.append(app.spawn("t", {"who": "b"}, idempotency_key="twin"))

        thread = threading.Thread(target=spawn_b, daemon=True)
        thread.start()
        _wait_until_blocked_on_lock(clean_db)
        if first_commits:
            a_session.commit()
        else:
            a_session.rollback()
        thread.join(timeout=10)
        assert not thread.is_alive()
    (b,) = b_result
    if first_commits:
        assert (b.task_id, b.created) == (a.task_id, False)
    else:
        assert b.created is True and b.task_id != a.task_id
        assert task_row(clean_db, b.task_id).params == {"who": "b"}
    assert count(clean_db, "tasks") == 1


def test_spawn_hook_can_rewrite_requests(clean_db: Engine) -> None:
    def add_trace(request: SpawnRequest) -> SpawnRequest:
        headers = dict(request.headers or {}, trace="t-1")
        return SpawnRequest(request.task_name, request.params, headers=headers)

    app = Absurd(clean_db, hooks=Hooks(before_spawn=add_trace))
    app.create_queue()
    spawned = app.spawn("t", {}, headers={"a": 1})
    assert task_row(clean_db, spawned.task_id).headers == {"a": 1, "trace": "t-1"}


# -- spawn_many -------------------------------------------------------------------


def test_spawn_many_mixed_batch(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("q2")
    existing = app.spawn("t", {"old": True}, idempotency_key="exists")
    requests = [
        SpawnRequest("a", {"i": 0}),
        SpawnRequest("b", {"i": 1}, queue="q2"),
        SpawnRequest("c", {"i": 2}, idempotency_key="dup"),
        SpawnRequest("d", {"i": 3}, idempotency_key="exists"),
        SpawnRequest("e", {"i": 4}, queue="q2", idempotency_key="dup"),  # other queue: new
        SpawnRequest("f", {"i": 5}, idempotency_key="dup"),  # duplicate within the batch
        SpawnRequest("g", {"i": 6}, run_after=30, max_attempts=1),
        SpawnRequest("h", {"i": 7}, queue="q2"),
    ]
    results = app.spawn_many(requests)
    assert len(results) == len(requests)

    created = [r.created for r in results]
    assert created == [True, True, True, False, True, False, True, True]
    assert results[3] == SpawnResult(existing.task_id, existing.run_id, 1, False)
    assert results[5].task_id == results[2].task_id
    assert results[5].run_id == results[2].run_id
    assert results[4].task_id != results[2].task_id
    new_ids = [r.task_id for r in results if r.created]
    assert len(set(new_ids)) == len(new_ids)

    # Results are in request order: each created task holds its request's params.
    for request, result in zip(requests, results, strict=True):
        row = task_row(clean_db, result.task_id)
        if result.created:
            assert (row.task_name, row.params) == (request.task_name, request.params)
            assert row.queue_name == (request.queue or "default")
            assert run_row(clean_db, result.run_id).task_id == result.task_id
    assert task_row(clean_db, results[6].task_id).max_attempts == 1
    assert count(clean_db, "tasks") == 1 + 6
    assert count(clean_db, "runs") == 1 + 6
    assert count(clean_db, "tasks", "queue_name = 'q2'") == 3


def test_spawn_many_large_batch_in_order(app: Absurd, clean_db: Engine) -> None:
    results = app.spawn_many(SpawnRequest("bulk", {"i": i}) for i in range(500))
    assert [r.created for r in results] == [True] * 500
    rows = sql(clean_db, "SELECT task_id, params FROM absurd.tasks")
    by_id = {row.task_id: row.params for row in rows}
    assert [by_id[r.task_id]["i"] for r in results] == list(range(500))
    # uuid7: ids are time ordered in request order.
    assert [r.task_id for r in results] == sorted(r.task_id for r in results)


def test_spawn_many_empty(app: Absurd, clean_db: Engine) -> None:
    assert app.spawn_many([]) == []
    assert count(clean_db, "tasks") == 0


@pytest.mark.parametrize("use_session", [False, True])
def test_spawn_many_one_bad_item_writes_nothing(
    app: Absurd, clean_db: Engine, use_session: bool
) -> None:
    requests = [
        SpawnRequest("ok", {"i": 0}),
        SpawnRequest("ok", {"i": 1}, idempotency_key="k"),
        SpawnRequest("bad", {"oops": object()}),
        SpawnRequest("ok", {"i": 3}),
    ]
    if use_session:
        with Session(clean_db) as session:
            with pytest.raises(NotSerializable):
                app.spawn_many(requests, session=session)
            session.commit()
    else:
        with pytest.raises(NotSerializable):
            app.spawn_many(requests)
    assert count(clean_db, "tasks") == 0
    assert count(clean_db, "runs") == 0


def test_spawn_many_rejects_non_requests(app: Absurd, clean_db: Engine) -> None:
    with pytest.raises(InvalidArgument):
        app.spawn_many([SpawnRequest("ok", {}), {"task_name": "dict"}])  # type: ignore[list-item]
    assert count(clean_db, "tasks") == 0


# -- emit_event -------------------------------------------------------------------


def test_emit_event_first_write_wins(app: Absurd, clean_db: Engine) -> None:
    assert app.emit_event("paid", {"amount": 10}) is True
    assert app.emit_event("paid", {"amount": 99}) is False
    assert app.emit_event("paid") is False
    rows = sql(clean_db, "SELECT payload, emitted_at FROM absurd.events")
    assert len(rows) == 1
    assert rows[0].payload == {"amount": 10}
    assert rows[0].emitted_at is not None


def test_emit_event_null_payload_is_json_null_and_counts(app: Absurd, clean_db: Engine) -> None:
    assert app.emit_event("ping") is True
    assert app.emit_event("ping", {"late": True}) is False
    assert (
        count(
            clean_db,
            "events",
            "event_name = 'ping' AND payload IS NOT NULL AND payload = 'null'::jsonb "
            "AND emitted_at IS NOT NULL",
        )
        == 1
    )


@pytest.mark.parametrize(
    "payload", [object(), math.nan, math.inf, {1, 2}, {"k": b"bytes"}, {(1, 2): "tuple key"}]
)
def test_emit_event_non_serialisable_payload(app: Absurd, clean_db: Engine, payload: Any) -> None:
    with pytest.raises(NotSerializable):
        app.emit_event("e", payload)
    with Session(clean_db) as session:
        with pytest.raises(NotSerializable):
            app.emit_event("e", payload, session=session)
        session.execute(text("SELECT 1"))  # still usable
    assert count(clean_db, "events") == 0
    assert app.emit_event("e", "fine") is True  # and the name is still free


def test_events_are_per_queue(app: Absurd, clean_db: Engine) -> None:
    app.create_queue("other")
    assert app.emit_event("done", 1) is True
    assert app.emit_event("done", 2, queue_name="other") is True
    assert app.emit_event("done", 3, queue_name="other") is False
    rows = sql(clean_db, "SELECT queue_name, payload FROM absurd.events ORDER BY queue_name")
    assert [(r.queue_name, r.payload) for r in rows] == [("default", 1), ("other", 2)]


def test_emit_fills_a_waiters_placeholder(app: Absurd, clean_db: Engine) -> None:
    """A placeholder (emitted_at IS NULL) written by a waiter is not an emit."""
    execute(
        clean_db,
        "INSERT INTO absurd.events (queue_name, event_name) VALUES ('default', 'later')",
    )
    assert app.emit_event("later", {"v": 1}) is True
    assert app.emit_event("later", {"v": 2}) is False
    (row,) = sql(clean_db, "SELECT payload, emitted_at FROM absurd.events")
    assert row.payload == {"v": 1} and row.emitted_at is not None


def test_emit_wakes_a_sleeping_waiter(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    other = app.spawn("t", {})
    for s, event in ((spawned, "go"), (other, "not-this-one")):
        execute(
            clean_db,
            "UPDATE absurd.runs SET state = 'sleeping', available_at = '2100-01-01Z', "
            "wake_event = :e WHERE run_id = :r",
            r=s.run_id,
            e=event,
        )
        execute(
            clean_db, "UPDATE absurd.tasks SET state = 'sleeping' WHERE task_id = :t", t=s.task_id
        )
        execute(
            clean_db,
            "INSERT INTO absurd.waits (run_id, task_id, queue_name, event_name, step_name) "
            "VALUES (:r, :t, 'default', :e, 'wait-step')",
            r=s.run_id,
            t=s.task_id,
            e=event,
        )
    assert app.emit_event("go", {"n": 1}) is True
    run = run_row(clean_db, spawned.run_id)
    assert run.state == "pending" and run.available_at <= db_now(clean_db)
    assert task_row(clean_db, spawned.task_id).state == "pending"
    assert count(clean_db, "waits", "run_id = :r", r=spawned.run_id) == 0
    assert (
        count(
            clean_db,
            "checkpoints",
            "task_id = :t AND checkpoint_name = 'wait-step'",
            t=spawned.task_id,
        )
        == 1
    )
    # The other waiter is untouched.
    assert run_row(clean_db, other.run_id).state == "sleeping"
    assert count(clean_db, "waits", "run_id = :r", r=other.run_id) == 1


@pytest.mark.parametrize("name", ["", "e" * 256, None, 7])
def test_emit_event_bad_name(app: Absurd, clean_db: Engine, name: Any) -> None:
    with pytest.raises(InvalidArgument):
        app.emit_event(name, 1)
    assert count(clean_db, "events") == 0


# -- cancel_task ------------------------------------------------------------------


def test_cancel_pending_task(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    bystander = app.spawn("t", {})
    assert app.cancel_task(spawned.task_id) is True
    task = task_row(clean_db, spawned.task_id)
    run = run_row(clean_db, spawned.run_id)
    assert (task.state, run.state) == ("cancelled", "cancelled")
    assert task.finished_at is not None and run.finished_at is not None
    assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("cancelled")
    assert app.cancel_task(spawned.task_id) is False
    assert app.cancel_task(str(spawned.task_id)) is False  # a string id works too
    assert task_row(clean_db, bystander.task_id).state == "pending"
    assert run_row(clean_db, bystander.run_id).state == "pending"


def test_cancel_sleeping_waiter_removes_wait(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    execute(
        clean_db, "UPDATE absurd.runs SET state = 'sleeping' WHERE run_id = :r", r=spawned.run_id
    )
    execute(
        clean_db, "UPDATE absurd.tasks SET state = 'sleeping' WHERE task_id = :t", t=spawned.task_id
    )
    execute(
        clean_db,
        "INSERT INTO absurd.waits (run_id, task_id, queue_name, event_name, step_name) "
        "VALUES (:r, :t, 'default', 'e', 's')",
        r=spawned.run_id,
        t=spawned.task_id,
    )
    assert app.cancel_task(spawned.task_id) is True
    assert count(clean_db, "waits") == 0
    assert run_row(clean_db, spawned.run_id).state == "cancelled"


def test_cancel_finished_task_returns_false(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    complete_by_hand(clean_db, spawned.task_id, {"ok": 1})
    assert app.cancel_task(spawned.task_id) is False
    assert task_row(clean_db, spawned.task_id).state == "completed"
    assert run_row(clean_db, spawned.run_id).state == "completed"


def test_cancel_unknown_or_invalid_id(app: Absurd, clean_db: Engine) -> None:
    with pytest.raises(TaskNotFound):
        app.cancel_task(uuid.uuid4())
    app.create_queue("other")
    spawned = app.spawn("t", {})
    with pytest.raises(QueueMismatch, match="is on queue 'default', not 'other'") as info:
        app.cancel_task(spawned.task_id, queue_name="other")
    assert (info.value.task_id, info.value.queue) == (spawned.task_id, "default")
    for bad in ["not-a-uuid", "", 12, None]:
        with pytest.raises(InvalidArgument):
            app.cancel_task(bad)  # type: ignore[arg-type]
    assert task_row(clean_db, spawned.task_id).state == "pending"


# -- results ------------------------------------------------------------------------


def test_fetch_task_result_states(app: Absurd, clean_db: Engine) -> None:
    assert app.fetch_task_result(uuid.uuid4()) is None
    pending = app.spawn("t", {})
    assert app.fetch_task_result(pending.task_id) == TaskResultSnapshot("pending", None, None)
    assert app.fetch_task_result(str(pending.task_id)) == TaskResultSnapshot("pending")
    app.create_queue("other")
    with pytest.raises(QueueMismatch, match="is on queue 'default'"):
        app.fetch_task_result(pending.task_id, queue_name="other")
    assert app.fetch_task_result(pending.task_id, queue_name="default") is not None

    # A running task that has a result stored on its run is still not "completed".
    execute(
        clean_db, "UPDATE absurd.tasks SET state = 'running' WHERE task_id = :t", t=pending.task_id
    )
    execute(
        clean_db,
        "UPDATE absurd.runs SET state = 'running', failure_reason = '{\"x\": 1}' WHERE run_id = :r",
        r=pending.run_id,
    )
    assert app.fetch_task_result(pending.task_id) == TaskResultSnapshot("running")

    done = app.spawn("t", {})
    complete_by_hand(clean_db, done.task_id, {"total": 3, "items": ["a"]})
    execute(
        clean_db,
        "UPDATE absurd.runs SET failure_reason = '{\"old\": 1}' WHERE run_id = :r",
        r=done.run_id,
    )
    assert app.fetch_task_result(done.task_id) == TaskResultSnapshot(
        "completed", {"total": 3, "items": ["a"]}, None
    )

    scalar_done = app.spawn("t", {})
    complete_by_hand(clean_db, scalar_done.task_id, "plain string")
    assert app.fetch_task_result(scalar_done.task_id) == TaskResultSnapshot(
        "completed", "plain string"
    )

    failed = app.spawn("t", {})
    failure = {"name": "ValueError", "message": "boom", "traceback": "Traceback ..."}
    fail_by_hand(clean_db, failed.task_id, failure)
    assert app.fetch_task_result(failed.task_id) == TaskResultSnapshot("failed", None, failure)

    cancelled = app.spawn("t", {})
    app.cancel_task(cancelled.task_id)
    assert app.fetch_task_result(cancelled.task_id) == TaskResultSnapshot("cancelled")


def test_fetch_task_result_reports_last_runs_failure(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    second_run = uuid.uuid4()
    with clean_db.begin() as conn:
        conn.execute(
            text(
                "UPDATE absurd.runs SET state = 'failed', failure_reason = '{\"n\": 1}' "
                "WHERE run_id = :r"
            ),
            {"r": spawned.run_id},
        )
        conn.execute(
            text(
                "INSERT INTO absurd.runs (run_id, task_id, queue_name, attempt, state, "
                "failure_reason) VALUES (:r, :t, 'default', 2, 'failed', '{\"n\": 2}')"
            ),
            {"r": second_run, "t": spawned.task_id},
        )
        conn.execute(
            text(
                "UPDATE absurd.tasks SET state = 'failed', attempts = 2, last_run_id = :r "
                "WHERE task_id = :t"
            ),
            {"r": second_run, "t": spawned.task_id},
        )
    assert app.fetch_task_result(spawned.task_id) == TaskResultSnapshot("failed", None, {"n": 2})


def test_fetch_task_result_invalid_id(app: Absurd) -> None:
    with pytest.raises(InvalidArgument):
        app.fetch_task_result("nope")


def test_await_task_result_returns_once_completed(
    app: Absurd, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = app.spawn("t", {})
    polled = threading.Event()
    real_fetch = app.fetch_task_result

    polled_states: list[str] = []

    def fetch_and_signal(*args: Any, **kwargs: Any) -> TaskResultSnapshot | None:
        snapshot = real_fetch(*args, **kwargs)
        polled_states.append(snapshot.state if snapshot is not None else "missing")
        polled.set()
        return snapshot

    monkeypatch.setattr(app, "fetch_task_result", fetch_and_signal)

    def completer() -> None:
        if polled.wait(10):  # complete only once a poll has seen the task pending
            complete_by_hand(clean_db, spawned.task_id, {"answer": 42})

    thread = threading.Thread(target=completer, daemon=True)
    thread.start()
    snapshot = app.await_task_result(spawned.task_id, timeout=10)
    thread.join(timeout=10)
    assert not thread.is_alive()
    # It kept polling while the task was pending and returned the first terminal state.
    assert len(polled_states) >= 2
    assert set(polled_states[:-1]) == {"pending"} and polled_states[-1] == "completed"
    assert snapshot == TaskResultSnapshot("completed", {"answer": 42}, None)


def test_await_task_result_returns_at_once_when_terminal(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("t", {})
    fail_by_hand(clean_db, spawned.task_id, {"name": "E", "message": "m", "traceback": ""})
    snapshot = app.await_task_result(spawned.task_id, timeout=0)
    assert snapshot.state == "failed" and snapshot.failure == {
        "name": "E",
        "message": "m",
        "traceback": "",
    }


def test_await_task_result_timeout(app: Absurd) -> None:
    spawned = app.spawn("t", {})
    with pytest.raises(absurd_sqla.TimeoutError) as info:
        app.await_task_result(spawned.task_id, timeout=0.05)
    assert isinstance(info.value, builtins.TimeoutError)
    with pytest.raises(builtins.TimeoutError):
        app.await_task_result(spawned.task_id, timeout=timedelta(milliseconds=20))  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, "1", True])
def test_await_task_result_bad_timeout(app: Absurd, timeout: Any) -> None:
    spawned = app.spawn("t", {})
    with pytest.raises(InvalidArgument):
        app.await_task_result(spawned.task_id, timeout=timeout)


def test_await_task_result_unknown_task(app: Absurd) -> None:
    with pytest.raises(TaskNotFound):
        app.await_task_result(uuid.uuid4(), timeout=1)


# -- bad input ------------------------------------------------------------------------

BAD_SPAWNS: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("object", {"params": {"x": object()}}, NotSerializable),
    ("nan", {"params": {"x": math.nan}}, NotSerializable),
    ("inf", {"params": [math.inf]}, NotSerializable),
    ("set", {"params": {1, 2, 3}}, NotSerializable),
    ("bytes", {"params": b"raw"}, NotSerializable),
    ("datetime", {"params": {"at": datetime.now(UTC)}}, NotSerializable),
    ("bad-header-value", {"headers": {"h": object()}}, NotSerializable),
    ("headers-not-dict", {"headers": ["a"]}, InvalidArgument),
    ("max_attempts-negative", {"max_attempts": -1}, InvalidArgument),
    ("max_attempts-zero", {"max_attempts": 0}, InvalidArgument),
    ("max_attempts-float", {"max_attempts": 2.5}, InvalidArgument),
    ("max_attempts-bool", {"max_attempts": True}, InvalidArgument),
    ("retry-kind", {"retry_strategy": {"kind": "linear"}}, InvalidArgument),
    ("retry-not-dict", {"retry_strategy": "fixed"}, InvalidArgument),
    ("retry-negative", {"retry_strategy": {"kind": "fixed", "base_seconds": -1}}, InvalidArgument),
    ("retry-unknown-key", {"retry_strategy": {"kind": "fixed", "jitter": 1}}, InvalidArgument),
    ("run_after-negative", {"run_after": -5}, InvalidArgument),
    ("run_after-nan", {"run_after": math.nan}, InvalidArgument),
    ("run_after-string", {"run_after": "10"}, InvalidArgument),
    ("run_after-negative-td", {"run_after": timedelta(seconds=-1)}, InvalidArgument),
    ("run_after-naive", {"run_after": datetime(2030, 1, 1)}, InvalidArgument),
    ("cancellation-key", {"cancellation": {"max_wait": 10}}, InvalidArgument),
    ("cancellation-negative", {"cancellation": {"max_delay": -10}}, InvalidArgument),
    ("cancellation-zero", {"cancellation": {"max_duration": 0}}, InvalidArgument),
    ("cancellation-not-dict", {"cancellation": 10}, InvalidArgument),
    ("idempotency-empty", {"idempotency_key": ""}, InvalidArgument),
    ("idempotency-int", {"idempotency_key": 5}, InvalidArgument),
    ("queue-int", {"queue": 5}, InvalidQueueName),
]


@pytest.mark.parametrize(
    ("kwargs", "error"), [(k, e) for _, k, e in BAD_SPAWNS], ids=[i for i, _, _ in BAD_SPAWNS]
)
def test_bad_spawn_input_writes_nothing(
    app: Absurd, clean_db: Engine, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    call = dict(kwargs)
    params = call.pop("params", {"ok": True})
    with pytest.raises(error) as info:
        app.spawn("t", params, **call)
    assert isinstance(info.value, InvalidArgument)
    assert str(info.value)  # a message, not a bare class

    with Session(clean_db) as session:
        good = app.spawn("before", {}, session=session)
        with pytest.raises(error):
            app.spawn("t", params, session=session, **call)
        with pytest.raises(error):
            app.spawn_many([SpawnRequest("t", params, **call)], session=session)
        # The transaction is intact: earlier and later writes commit.
        after = app.spawn("after", {}, session=session)
        session.commit()
    assert count(clean_db, "tasks") == 2
    assert count(clean_db, "runs") == 2
    names = {row.task_name for row in sql(clean_db, "SELECT task_name FROM absurd.tasks")}
    assert names == {"before", "after"}
    assert {good.task_id, after.task_id} == {
        row.task_id for row in sql(clean_db, "SELECT task_id FROM absurd.tasks")
    }


@pytest.mark.parametrize("name", ["", "n" * 256, None, 12])
def test_bad_task_name_writes_nothing(app: Absurd, clean_db: Engine, name: Any) -> None:
    with pytest.raises(InvalidArgument):
        app.spawn(name, {})
    assert count(clean_db, "tasks") == 0


@pytest.mark.parametrize("bad_text", ["a\x00b", "\ud800"], ids=["nul", "lone-surrogate"])
def test_unstorable_text_in_params_is_rejected_before_writing(
    app: Absurd, clean_db: Engine, bad_text: str
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(InvalidArgument):
            app.spawn("t", {"text": bad_text}, session=session)
        app.spawn("after", {}, session=session)  # transaction still usable
        session.commit()
    assert count(clean_db, "tasks") == 1


@pytest.mark.parametrize("bad_text", ["\x00", "\udfff"], ids=["nul", "lone-surrogate"])
def test_unstorable_text_in_payload_is_rejected_before_writing(
    app: Absurd, clean_db: Engine, bad_text: str
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(InvalidArgument):
            app.emit_event("e", {"text": bad_text}, session=session)
        app.emit_event("after", 1, session=session)
        session.commit()
    assert count(clean_db, "events") == 1


# -- names are bound parameters ----------------------------------------------------


def test_hostile_names_round_trip_verbatim(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn(NASTY, {NASTY: NASTY}, idempotency_key=NASTY, headers={NASTY: 1})
    assert app.emit_event(NASTY, NASTY) is True
    assert app.emit_event(NASTY, "second") is False
    task = task_row(clean_db, spawned.task_id)
    assert task.task_name == NASTY
    assert task.idempotency_key == NASTY
    assert task.params == {NASTY: NASTY}
    assert task.headers == {NASTY: 1}
    (event,) = sql(clean_db, "SELECT event_name, payload FROM absurd.events")
    assert (event.event_name, event.payload) == (NASTY, NASTY)
    again = app.spawn(NASTY, {}, idempotency_key=NASTY)
    assert (again.task_id, again.created) == (spawned.task_id, False)
    # absurd.tasks is of course still there.
    assert count(clean_db, "tasks") == 1
    for name in ['"; select pg_sleep(10); --', "a\\b", "%(queue)s", ":queue", "$1", "ü ☃ 🚀"]:
        result = app.spawn(name, {})
        assert task_row(clean_db, result.task_id).task_name == name
        assert app.emit_event(name, name) is True
        assert (
            scalar(clean_db, "SELECT payload FROM absurd.events WHERE event_name = :n", n=name)
            == name
        )


@pytest.mark.parametrize("where", ["task_name", "event_name", "idempotency_key"])
def test_nul_character_in_names_is_rejected_before_writing(
    app: Absurd, clean_db: Engine, where: str
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(InvalidArgument):
            if where == "task_name":
                app.spawn("a\x00b", {}, session=session)
            elif where == "event_name":
                app.emit_event("a\x00b", 1, session=session)
            else:
                app.spawn("t", {}, idempotency_key="k\x00", session=session)
        app.spawn("after", {}, session=session)
        session.commit()
    assert count(clean_db, "tasks") == 1


@pytest.mark.parametrize("run_after", [1e15, timedelta.max], ids=["1e15", "timedelta.max"])
def test_out_of_range_run_after_is_rejected_before_writing(
    app: Absurd, clean_db: Engine, run_after: Any
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(InvalidArgument):
            app.spawn("t", {}, run_after=run_after, session=session)
        app.spawn("after", {}, session=session)
        session.commit()
    assert count(clean_db, "tasks") == 1


def test_concurrent_emits_exactly_one_wins(app: Absurd, clean_db: Engine) -> None:
    rounds = 8
    won: dict[tuple[int, int], bool] = {}
    barriers = [threading.Barrier(2, timeout=10) for _ in range(rounds)]

    def emitter(who: int) -> Callable[[], None]:
        def run() -> None:
            for n in range(rounds):
                with Session(clean_db) as session:
                    session.execute(text("SELECT 1"))
                    barriers[n].wait()
                    won[who, n] = app.emit_event(f"race-{n}", {"who": who}, session=session)
                    session.commit()

        return run

    run_threads(emitter(0), emitter(1))
    for n in range(rounds):
        assert sorted([won[0, n], won[1, n]]) == [False, True]
        winner = 0 if won[0, n] else 1
        payload = scalar(
            clean_db, "SELECT payload FROM absurd.events WHERE event_name = :e", e=f"race-{n}"
        )
        assert payload == {"who": winner}


@pytest.mark.parametrize("first_commits", [True, False])
def test_emit_blocked_by_uncommitted_twin(
    app: Absurd, clean_db: Engine, first_commits: bool
) -> None:
    with Session(clean_db) as a_session:
        assert app.emit_event("twin", "a", session=a_session) is True
        b_won: list[bool] = []
        thread = threading.Thread(
            target=lambda: b_won.append(app.emit_event("twin", "b")), daemon=True
        )
        thread.start()
        _wait_until_blocked_on_lock(clean_db)
        if first_commits:
            a_session.commit()
        else:
            a_session.rollback()
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert b_won == [not first_commits]
    expected = "a" if first_commits else "b"
    assert scalar(clean_db, "SELECT payload FROM absurd.events") == expected


def test_max_attempts_out_of_integer_range_rejected_before_writing(
    app: Absurd, clean_db: Engine
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(InvalidArgument):
            app.spawn("t", {}, max_attempts=2**31, session=session)
        app.spawn("after", {}, session=session)
        session.commit()
    assert count(clean_db, "tasks") == 1


def test_backslash_u0000_text_round_trips(app: Absurd, clean_db: Engine) -> None:
    """Six ordinary characters that merely look like an escaped NUL are stored verbatim."""
    text_value = "\\u0000 and \\\\u0000"
    spawned = app.spawn("t", {"s": text_value, text_value: 1})
    assert task_row(clean_db, spawned.task_id).params == {"s": text_value, text_value: 1}
    assert app.emit_event("e", text_value) is True
    assert scalar(clean_db, "SELECT payload FROM absurd.events") == text_value
