"""Task ids are unique across queues: every method taking a task id finds the
task by id alone; ``queue_name=`` (the original SDK's) must match when given."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from absurd_sqla import (
    Absurd,
    QueueMismatch,
    TaskContext,
    TaskNotFound,
    TaskStateError,
)
from absurd_sqla.testing import run_until_idle


@pytest.fixture
def other_app(app: Absurd) -> Absurd:
    """Tasks live on queue "other"; ``app``'s default queue stays "default"."""
    app.create_queue("other")

    @app.register_task("on-other", queue="other", max_attempts=1)
    def on_other(params: Any, ctx: TaskContext) -> Any:
        if params.get("fail"):
            raise RuntimeError("boom")
        return params

    return app


def state_of(engine: Engine, task_id: uuid.UUID) -> str:
    with engine.connect() as conn:
        return str(
            conn.scalar(text("SELECT state FROM absurd.tasks WHERE task_id = :t"), {"t": task_id})
        )


def test_every_task_id_method_finds_a_task_on_another_queue_by_id(other_app: Absurd) -> None:
    app = other_app
    done = app.spawn("on-other", {"x": 1})
    failing = app.spawn("on-other", {"fail": True})
    live = app.spawn("on-other", {"x": 2}, run_after=3600)
    assert run_until_idle(app, queue="other") == 2

    snapshot = app.fetch_task_result(done.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == {"x": 1}
    assert app.await_task_result(done.task_id, timeout=1).result == {"x": 1}
    retried = app.retry_task(failing.task_id)
    assert (retried.task_id, retried.attempt) == (failing.task_id, 2)
    assert app.cancel_task(live.task_id) is True
    assert state_of(app.engine, live.task_id) == "cancelled"
    # The matching queue is accepted too (compatibility with the original SDK).
    assert app.fetch_task_result(done.task_id, queue_name="other") == snapshot


def test_retry_spawn_new_keeps_the_tasks_own_queue(other_app: Absurd) -> None:
    app = other_app
    failing = app.spawn("on-other", {"fail": True})
    run_until_idle(app, queue="other")
    new = app.retry_task(failing.task_id, spawn_new=True)
    with app.engine.connect() as conn:
        queue = conn.scalar(
            text("SELECT queue_name FROM absurd.tasks WHERE task_id = :t"), {"t": new.task_id}
        )
    assert queue == "other" and new.task_id != failing.task_id


@pytest.mark.parametrize("method", ["fetch", "await", "cancel", "retry", "retry_new"])
def test_a_queue_name_that_does_not_match_is_refused_and_writes_nothing(
    other_app: Absurd, method: str
) -> None:
    app = other_app
    failing = app.spawn("on-other", {"fail": True})
    run_until_idle(app, queue="other")
    calls = {
        "fetch": lambda: app.fetch_task_result(failing.task_id, queue_name="default"),
        "await": lambda: app.await_task_result(failing.task_id, queue_name="default"),
        "cancel": lambda: app.cancel_task(failing.task_id, queue_name="default"),
        "retry": lambda: app.retry_task(failing.task_id, queue_name="default"),
        "retry_new": lambda: app.retry_task(failing.task_id, queue_name="default", spawn_new=True),
    }
    with pytest.raises(QueueMismatch, match="is on queue 'other', not 'default'") as info:
        calls[method]()
    assert info.value.task_id == failing.task_id
    assert info.value.queue == "other" and info.value.state == "failed"
    assert state_of(app.engine, failing.task_id) == "failed"
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM absurd.tasks")) == 1
        assert conn.scalar(text("SELECT count(*) FROM absurd.runs")) == 1


def test_a_mismatch_inside_the_callers_transaction_leaves_it_usable(
    other_app: Absurd,
) -> None:
    app = other_app
    live = app.spawn("on-other", {}, run_after=3600)
    with Session(app.engine) as session, session.begin():
        with pytest.raises(QueueMismatch):
            app.cancel_task(live.task_id, session=session, queue_name="default")
        assert app.cancel_task(live.task_id, session=session) is True
    assert state_of(app.engine, live.task_id) == "cancelled"


def test_not_found_errors_name_the_task(app: Absurd) -> None:
    missing = uuid.uuid4()
    for call in (
        lambda: app.cancel_task(missing),
        lambda: app.retry_task(missing),
        lambda: app.retry_task(missing, spawn_new=True),
        lambda: app.await_task_result(missing, timeout=1),
    ):
        with pytest.raises(TaskNotFound, match=f"task {missing} not found") as info:
            call()
        assert info.value.task_id == missing
    assert app.fetch_task_result(missing) is None


def test_retrying_a_task_that_did_not_fail_names_its_state(app: Absurd) -> None:
    spawned = app.spawn("anything", {})
    with pytest.raises(TaskStateError, match="is pending") as info:
        app.retry_task(spawned.task_id)
    assert (info.value.task_id, info.value.state, info.value.queue) == (
        spawned.task_id,
        "pending",
        "default",
    )


def test_retry_found_by_id_notifies_the_tasks_own_queue(other_app: Absurd) -> None:
    """The retry statement names the channel in SQL, from the task's queue."""
    import psycopg

    app = other_app
    failing = app.spawn("on-other", {"fail": True})
    run_until_idle(app, queue="other")
    url = app.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute('LISTEN "absurd.other"')
        listener.execute('LISTEN "absurd.default"')
        app.retry_task(failing.task_id)
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in received] == ["absurd.other"]
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
