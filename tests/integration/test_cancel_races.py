"""Cancellation racing other writers, against the real PostgreSQL.

``cancel_task`` locks a task's runs, then the task, then its waits. These
tests pin that a cancel racing a retrying failure, an emit to the task's
waiter, or a child finishing neither deadlocks nor leaves a live run behind.
Each race is made deterministic without sleeps (see ``tests.support``): one
side's transaction is held open, the other side is started in a thread, and
``pg_stat_activity`` is polled until it waits on a lock.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import select, text

from absurd_sqla import Absurd, CancelledTask
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._run import ClaimedRun, RunState, failure_reason
from absurd_sqla.context import TaskContext
from absurd_sqla.models import tasks
from absurd_sqla.testing import run_until_idle
from tests.internals import claim, execute
from tests.support import (
    Outcome,
    run_states,
    task_state,
    wait_for_lock_waiters,
    wait_rows,
    wait_until,
)


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


# -- cancel racing the completion of a retried run (reliability defect 1) ---------------


def blocked_by(engine: Any, pid: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalar(text("SELECT pg_blocking_pids(:pid)"), {"pid": pid}) or [])


def backend_pid(conn: Any) -> int:
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())


def test_cancel_racing_the_completion_of_a_retried_run_never_deadlocks(app: Absurd) -> None:
    """The interleaving fault injection found, forced step by step.

    A failure creates attempt 2 (and a worker claims it) after the cancel took
    its snapshot; the cancel then reaches the task while that worker holds
    attempt 2 and waits for the task. A cancel that then locked attempt 2
    (run after task) deadlocked with the completion (run then task).
    """
    engine = app.engine
    spawned = app.spawn("flaky", {}, max_attempts=3)
    run1 = claim_one(app, "w1")
    with (
        engine.connect() as failer,
        engine.connect() as canceller,
        engine.connect() as sharer,
        engine.connect() as completer,
    ):
        pids = {
            name: backend_pid(c)
            for name, c in [("F", failer), ("C", canceller), ("H", sharer), ("W", completer)]
        }
        for conn in (canceller, sharer, completer):
            conn.commit()  # end the transaction the pid query opened
        # F fails attempt 1 (creating attempt 2) and claims attempt 2 as worker w2.
        failed = failer.execute(
            sqlw.fail_run, RunState(run1, "w1", 120).fail_params(failure_reason(RuntimeError()))
        ).one()
        assert failed.retried == 1
        (row,) = failer.execute(
            sqlw.claim, {"queue": "default", "worker": "w2", "claim_timeout": 120, "batch_size": 1}
        ).all()
        run2 = ClaimedRun.from_row(row)
        assert run2.attempt == 2
        # C's snapshot predates attempt 2; it waits for attempt 1's row (held by F).
        cancel = Outcome(lambda: app.cancel_task(spawned.task_id, session=canceller))
        wait_until(lambda: pids["F"] in blocked_by(engine, pids["C"]), "cancel waits for F")
        # H share-locks the task (behind F), so that C will queue behind H.
        share = Outcome(
            lambda: sharer.execute(
                select(tasks.c.task_id)
                .where(tasks.c.task_id == spawned.task_id)
                .with_for_update(read=True)
            ).all()
        )
        wait_until(lambda: pids["F"] in blocked_by(engine, pids["H"]), "H waits for F")
        failer.commit()
        # H normally takes the task first; on a loaded machine the cancel's retry
        # can get there before it. Then there is no race left to force, but the
        # outcome must still be consistent.
        wait_until(
            lambda: not share.thread.is_alive() or not cancel.thread.is_alive(),
            "H or the cancel takes the task",
        )

        def completion() -> Any:
            params = RunState(run2, "w2", 120).complete_params("done")
            return completer.execute(sqlw.complete_run, params).one()

        if share.thread.is_alive():  # the cancel won the task
            assert cancel.join().error is None, cancel.error
            canceller.commit()
            assert share.join().error is None
            sharer.commit()
            complete = Outcome(completion)
            assert complete.join().error is None, complete.error
            completer.commit()
        else:
            assert share.error is None
            wait_until(
                lambda: pids["H"] in blocked_by(engine, pids["C"]), "cancel waits on the task"
            )
            # W2 completes attempt 2 (locking the run, then the task) while C holds
            # or waits for the task: the old cancel then locked attempt 2 after it.
            complete = Outcome(completion)
            wait_until(lambda: blocked_by(engine, pids["W"]), "the completion waits")
            sharer.commit()
            # Whichever statement returns first commits first; the other follows.
            sides = [(cancel, canceller), (complete, completer)]
            wait_until(
                lambda: any(not side.thread.is_alive() for side, _ in sides), "one side returns"
            )
            sides.sort(key=lambda pair: pair[0].thread.is_alive())
            for side, conn in sides:
                assert side.join().error is None, side.error  # no DeadlockDetected
                conn.commit()
    final = task_state(engine, spawned.task_id)
    states = run_states(engine, spawned.task_id)
    assert states[0] == "failed" and states[1] == final  # task and last run agree
    if cancel.value:
        assert (final, complete.value.owned) == ("cancelled", 0)
    else:
        assert (final, complete.value.owned) == ("completed", 1)


# -- a cancel a checkpoint waited for (reliability defect 2) ----------------------------


def test_a_checkpoint_that_waited_for_a_cancel_reports_the_cancel(app: Absurd) -> None:
    """The checkpoint's snapshot says "running"; what happened is "cancelled"."""
    gate = threading.Event()
    signals: list[BaseException] = []

    @app.register_task("stepper")
    def stepper(params: Any, ctx: TaskContext) -> str:
        gate.wait(10)
        try:
            ctx.step("after-cancel", lambda: 1)
        except BaseException as exc:
            signals.append(exc)
            raise
        return "not reached"

    spawned = app.spawn("stepper", {})
    run = claim_one(app)
    worker = Outcome(lambda: execute(app, run, "w", 120))
    with app.engine.connect() as canceller:
        assert app.cancel_task(spawned.task_id, session=canceller) is True  # holds the run
        gate.set()
        wait_for_lock_waiters(app.engine, 1)  # the checkpoint waits for the run's row
        canceller.commit()
    assert worker.join().error is None
    (signal,) = signals
    assert isinstance(signal, CancelledTask), signal
    assert (signal.task_id, signal.run_id, signal.state) == (
        spawned.task_id,
        run.run_id,
        "cancelled",
    )
