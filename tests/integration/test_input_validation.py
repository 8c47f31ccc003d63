"""Bad input is refused with a clear exception before any statement runs, and
the caller's transaction stays usable: names PostgreSQL cannot store, JSON that
``json.dumps`` would silently change or cannot encode, worker arguments, and
binds that would break exactly-once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from absurd_sqla import (
    Absurd,
    InvalidArgument,
    NotSerializable,
    SpawnRequest,
    TaskContext,
)
from absurd_sqla.testing import run_until_idle

SURROGATE = "bad\ud800name"


def count_tasks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM absurd.tasks")) or 0)


class StatementCounter:
    """Counts statements sent through an engine (to prove none ran)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def statements(app: Absurd) -> Any:
    counter = StatementCounter(app.engine)
    yield counter
    counter.close()


BAD_CALLS: dict[str, Callable[[Absurd, Any], Any]] = {
    "task name": lambda app, s: app.spawn(SURROGATE, {}, session=s),
    "idempotency key": lambda app, s: app.spawn("t", {}, idempotency_key=SURROGATE, session=s),
    "params value": lambda app, s: app.spawn("t", {"v": SURROGATE}, session=s),
    "params key": lambda app, s: app.spawn("t", {SURROGATE: 1}, session=s),
    "header key": lambda app, s: app.spawn("t", {}, headers={SURROGATE: 1}, session=s),
    "event name": lambda app, s: app.emit_event(SURROGATE, session=s),
    "payload": lambda app, s: app.emit_event("e", [SURROGATE], session=s),
    "int key": lambda app, s: app.spawn("t", {1: "a", "1": "b"}, session=s),
    "nested int key": lambda app, s: app.spawn("t", [{"x": [{2: "y"}]}], session=s),
    "bool key": lambda app, s: app.emit_event("e", {True: 1}, session=s),
    "none key": lambda app, s: app.spawn_many([SpawnRequest("t", {None: 1})], session=s),
}


@pytest.mark.parametrize("what", sorted(BAD_CALLS))
def test_refused_before_any_statement_and_the_transaction_stays_usable(
    app: Absurd, statements: StatementCounter, what: str
) -> None:
    with Session(app.engine) as session, session.begin():
        session.execute(text("SELECT 1"))
        before = statements.count
        with pytest.raises(InvalidArgument):
            BAD_CALLS[what](app, session)
        assert statements.count == before  # nothing was sent
        app.spawn("t", {"ok": True}, session=session)  # the transaction still works
    assert count_tasks(app.engine) == 1


def test_non_string_keys_are_refused_not_silently_merged(app: Absurd) -> None:
    with pytest.raises(NotSerializable, match="key that is not a string: 1"):
        app.spawn("t", {1: "a", "1": "b"})
    assert count_tasks(app.engine) == 0


def test_too_deep_nesting_is_not_serialisable_not_a_recursion_error(app: Absurd) -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(NotSerializable, match="nested too deeply"):
        app.spawn("t", deep)
    with pytest.raises(NotSerializable, match="nested too deeply"):
        app.emit_event("e", {"k": deep})
    assert count_tasks(app.engine) == 0


def test_moderate_nesting_round_trips(app: Absurd) -> None:
    nested: Any = {"leaf": 1}
    for _ in range(200):
        nested = {"n": [nested]}
    spawned = app.spawn("echo", nested)
    app.register_task("echo")(lambda params, ctx: params)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == nested


def test_a_step_name_that_is_not_utf8_fails_the_run_cleanly(app: Absurd) -> None:
    seen: list[str] = []

    @app.register_task("steps", max_attempts=1)
    def steps(params: Any, ctx: TaskContext) -> None:
        try:
            ctx.step(SURROGATE, lambda: 1)
        except InvalidArgument as exc:
            seen.append(str(exc))
            raise

    spawned = app.spawn("steps", {})
    run_until_idle(app)
    assert seen and "not valid UTF-8" in seen[0]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None and snapshot.failure["name"] == "InvalidArgument"


def test_internal_step_names_fit_the_longest_names_the_api_accepts(app: Absurd) -> None:
    """``$await:<event>`` and ``$spawn:<task>`` are longer than the name itself."""
    event_name = "e" * 255
    child_name = "c" * 255

    @app.register_task(child_name)
    def child(params: Any, ctx: TaskContext) -> str:
        return "child done"

    @app.register_task("parent")
    def parent(params: Any, ctx: TaskContext) -> Any:
        spawned = ctx.spawn(child_name, {})
        payload = ctx.await_event(event_name)
        return [payload, ctx.await_task_result(spawned.task_id).result]

    spawned = app.spawn("parent", {})
    run_until_idle(app)
    app.emit_event(event_name, "hello")
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == ["hello", "child done"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": -1},
        {"batch_size": 1.5},
        {"batch_size": True},
        {"claim_timeout": "60"},
        {"claim_timeout": float("nan")},
        {"claim_timeout": float("inf")},
        {"worker_id": ""},
        {"worker_id": SURROGATE},
    ],
)
def test_work_batch_arguments_are_checked(
    app: Absurd, statements: StatementCounter, kwargs: dict[str, Any]
) -> None:
    app.spawn("t", {})
    before = statements.count
    with pytest.raises(InvalidArgument):
        app.work_batch(**kwargs)
    assert statements.count == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poll_interval": 0},
        {"poll_interval": -1},
        {"poll_interval": float("nan")},
        {"concurrency": 0},
        {"concurrency": 2.0},
        {"batch_size": 0},
        {"claim_timeout": None},
        {"shutdown_timeout": -1},
        {"handle_signals": "no"},
        {"handle_signals": 0},
    ],
)
def test_start_worker_arguments_are_checked_before_it_starts(
    app: Absurd, statements: StatementCounter, kwargs: dict[str, Any]
) -> None:
    before = statements.count
    with pytest.raises(InvalidArgument):
        app.start_worker(**kwargs)  # returns at once: nothing ran
    assert statements.count == before


def test_zero_claim_timeout_is_a_lease_that_never_expires(app: Absurd) -> None:
    app.register_task("t")(lambda params, ctx: "ok")
    spawned = app.spawn("t", {})
    assert app.work_batch(claim_timeout=0) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"


def autocommit_binds(url: str) -> dict[str, Callable[[], Any]]:
    return {
        "engine": lambda: create_engine(url, isolation_level="AUTOCOMMIT"),
        "execution_options": lambda: create_engine(url).execution_options(
            isolation_level="AUTOCOMMIT"
        ),
        "sessionmaker": lambda: sessionmaker(create_engine(url, isolation_level="AUTOCOMMIT")),
    }


@pytest.mark.parametrize("kind", ["engine", "execution_options", "sessionmaker"])
def test_an_autocommit_bind_is_refused(database_url: str, kind: str) -> None:
    bind = autocommit_binds(database_url)[kind]()
    with pytest.raises(InvalidArgument, match="AUTOCOMMIT"):
        Absurd(bind)
