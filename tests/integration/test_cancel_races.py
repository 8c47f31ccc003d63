"""Cancellation racing other writers, against the real PostgreSQL.

``cancel_task`` locks a task's runs, then the task, then its waits. These
tests pin that a cancel racing a retrying failure, an emit to the task's
waiter, or a child finishing neither deadlocks nor leaves a live run behind.
Each race is made deterministic without sleeps (see ``tests.support``): one
side's transaction is held open, the other side is started in a thread, and
``pg_stat_activity`` is polled until it waits on a lock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from absurd_sqla import Absurd
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._run import RunState, failure_reason
from absurd_sqla.context import TaskContext
from absurd_sqla.models import tasks
from absurd_sqla.testing import run_until_idle
from tests.internals import claim
from tests.support import Outcome, run_states, task_state, wait_for_lock_waiters, wait_rows


def claim_one(app: Absurd, worker: str = "w", claim_timeout: float = 120) -> Any:
    (run,) = claim(app, "default", worker, claim_timeout, 1)
    return run


# -- cancel racing a run-creating transaction ------------------------------------------


def test_cancel_racing_a_retrying_failure_leaves_no_live_run(app: Absurd) -> None:
    """fail_run (retrying) holds run 1; cancel waits for it; fail commits attempt 2.

    The fail transaction is kept open to stretch the window; sweep_expired (one
    transaction over up to 100 runs) and a child's _fail (fail_run + announce) hold
    it open in production as well.
    """
    spawned = app.spawn("flaky", {}, max_attempts=3)
    run = claim_one(app)
    state = RunState(run, "w", 120)
    with app.engine.connect() as failer:
        row = failer.execute(
            sqlw.fail_run, state.fail_params(failure_reason(RuntimeError("boom")))
        ).one()
        assert row.owned == 1 and row.retried == 1  # attempt 2 inserted, not committed
        cancel = Outcome(lambda: app.cancel_task(spawned.task_id))
        wait_for_lock_waiters(app.engine, 1)  # cancel blocks on run 1
        failer.commit()
        cancel.join()
    assert cancel.error is None and cancel.value is True
    assert task_state(app.engine, spawned.task_id) == "cancelled"
    # Observed: ["failed", "pending"]: attempt 2 of a cancelled task is still live ...
    assert run_states(app.engine, spawned.task_id) == ["failed", "cancelled"]
    # ... and the next claim runs it, flipping the task back from cancelled to running.
    assert claim(app, "default", "w2", 120, 1) == []
    assert task_state(app.engine, spawned.task_id) == "cancelled"


# -- lock order: waits -> runs (wake_waiters) vs runs -> waits (cancel) ----------------


def test_cancel_racing_an_emit_to_its_waiter_does_not_deadlock(app: Absurd) -> None:
    """A third connection holds the waiter's task row only to stretch the window
    between cancel taking the run lock and reaching the waits row; in production
    any delay there (CPU, a claim's SKIP LOCKED probe, a user lock) does the same.
    Without the third connection, 300 plain cancel/emit pairs started on a
    Barrier deadlocked 22 times in review.
    """

    @app.register_task("waiter")
    def waiter(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("go")

    spawned = app.spawn("waiter", {})
    run_until_idle(app)
    assert run_states(app.engine, spawned.task_id) == ["sleeping"] and wait_rows(app.engine) == 1
    with app.engine.connect() as blocker:
        blocker.execute(
            select(tasks.c.task_id).where(tasks.c.task_id == spawned.task_id).with_for_update()
        )
        cancel = Outcome(lambda: app.cancel_task(spawned.task_id))
        wait_for_lock_waiters(app.engine, 1)  # cancel: holds the run, waits for the task
        emit = Outcome(lambda: app.emit_event("go", 1))
        wait_for_lock_waiters(app.engine, 2)  # emit: holds the wait row, waits for the run
        blocker.rollback()
        cancel.join()
        emit.join()
    errors = [repr(o.error) for o in (cancel, emit) if o.error is not None]
    # Observed: one of them fails with psycopg.errors.DeadlockDetected.
    assert errors == []
    assert task_state(app.engine, spawned.task_id) == "cancelled"


def test_cancel_of_a_parent_racing_its_child_finishing_does_not_deadlock(app: Absurd) -> None:
    """Same inversion, reached through announce_done (here: cancelling the child)."""

    @app.register_task("parent")
    def parent(params: Any, ctx: TaskContext) -> Any:
        child = ctx.spawn("child", {})
        return ctx.await_task_result(child.task_id).state

    spawned = app.spawn("parent", {})
    app.work_batch()  # parent spawns the child and suspends on it
    assert run_states(app.engine, spawned.task_id) == ["sleeping"]
    with app.engine.connect() as conn:
        child_id = conn.execute(
            select(tasks.c.task_id).where(tasks.c.task_name == "child")
        ).scalar_one()
    with app.engine.connect() as blocker:
        blocker.execute(
            select(tasks.c.task_id).where(tasks.c.task_id == spawned.task_id).with_for_update()
        )
        cancel_parent = Outcome(lambda: app.cancel_task(spawned.task_id))
        wait_for_lock_waiters(app.engine, 1)
        cancel_child = Outcome(lambda: app.cancel_task(child_id))  # announces $task:<child>
        wait_for_lock_waiters(app.engine, 2)
        blocker.rollback()
        cancel_parent.join()
        cancel_child.join()
    errors = [repr(o.error) for o in (cancel_parent, cancel_child) if o.error is not None]
    assert errors == []  # observed: DeadlockDetected
