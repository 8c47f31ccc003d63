"""Review findings, each proved against the real PostgreSQL.

Some began as strict-xfail proofs of bugs, now fixed, and stay as guards;
the others pin behaviour the review checked and found correct, so a fix for
one finding cannot quietly break another.

Races are made deterministic without sleeps: a transaction is held open (or a
row lock is taken by a third connection) to stretch the window, the other side
is started in a thread, and ``pg_stat_activity`` is polled with a deadline until
it waits on a lock; only then is the first transaction released.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.pool import NullPool

from absurd_sqla import Absurd, LeaseLost, SpawnRequest, TimeoutError, _sql
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._run import ClaimedRun, RunState, failure_reason
from absurd_sqla.context import TaskContext
from absurd_sqla.models import checkpoints, events, runs, tasks, waits
from absurd_sqla.testing import FakeClock, run_until_idle
from absurd_sqla.worker import claim, execute, sweep_expired
from tests.support import Order

# -- helpers ----------------------------------------------------------------------


def lock_waiters(engine: Engine) -> int:
    """Backends of this database (other than ours) waiting for a heavyweight lock."""
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            or 0
        )


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a (database) condition with a deadline; the poll is not synchronisation."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        pause.wait(0.005)


def wait_for_lock_waiters(engine: Engine, count: int) -> None:
    wait_until(lambda: lock_waiters(engine) >= count)


class Outcome:
    """Run ``fn`` in a thread and keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.value = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> Outcome:
        self.thread.join(15)
        assert not self.thread.is_alive(), "thread still blocked"
        return self


def run_states(engine: Engine, task_id: Any) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(runs.c.state).where(runs.c.task_id == task_id).order_by(runs.c.attempt)
            )
        )


def task_state(engine: Engine, task_id: Any) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(tasks.c.state).where(tasks.c.task_id == task_id)))


def checkpoint_map(engine: Engine, task_id: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(checkpoints.c.checkpoint_name, checkpoints.c.state).where(
                checkpoints.c.task_id == task_id
            )
        )
        return {row.checkpoint_name: row.state for row in rows}


def wait_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(text("count(*)")).select_from(waits)) or 0)


def claim_one(app: Absurd, worker: str = "w", claim_timeout: float = 120) -> Any:
    (run,) = claim(app, "default", worker, claim_timeout, 1)
    return run


# == 1. cancel racing a run-creating transaction ====================================


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


# == 2. lock order: waits -> runs (wake_waiters) vs runs -> waits (cancel) ==============


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


# == 3. concurrent spawn_many with overlapping idempotency keys =========================


def test_spawn_many_with_overlapping_keys_in_different_orders_does_not_deadlock(
    app: Absurd,
) -> None:
    """A third transaction holds key "kx" only to pause batch A between k1 and k2.

    Without it, two 50-key batches in opposite orders started on a Barrier
    deadlocked in 33 of 40 rounds in review.
    """

    def batch(*keys: str) -> Callable[[], Any]:
        return lambda: app.spawn_many([SpawnRequest("t", {}, idempotency_key=k) for k in keys])

    with app.engine.connect() as holder:
        app.spawn("t", {}, idempotency_key="kx", session=holder)
        a = Outcome(batch("k1", "kx", "k2"))  # inserts k1, waits on kx
        wait_for_lock_waiters(app.engine, 1)
        b = Outcome(batch("k2", "k1"))  # inserts k2, waits on k1 (a)
        wait_for_lock_waiters(app.engine, 2)
        holder.rollback()  # a goes on to k2, held by b
        a.join()
        b.join()
    errors = [repr(o.error) for o in (a, b) if o.error is not None]
    assert errors == []  # observed: DeadlockDetected in one batch


def test_spawn_many_duplicate_keys_in_one_batch_make_one_task(app: Absurd) -> None:
    first, second, other = app.spawn_many(
        [
            SpawnRequest("t", {"n": 1}, idempotency_key="dup"),
            SpawnRequest("t", {"n": 2}, idempotency_key="dup"),
            SpawnRequest("t", {"n": 3}),
        ]
    )
    assert first.task_id == second.task_id and first.run_id == second.run_id
    assert (first.created, second.created, other.created) == (True, False, True)
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM absurd.tasks")) == 2
        assert conn.scalar(text("SELECT count(*) FROM absurd.runs")) == 2
        params = conn.scalar(select(tasks.c.params).where(tasks.c.idempotency_key == "dup"))
    assert params == {"n": 1}  # the first request wins


# == 4. emit vs a waiter whose timeout is being claimed ================================


def test_emit_racing_a_timeout_claim_delivers_the_event_once(app: Absurd, clock: FakeClock) -> None:
    """The claim (timeout reached) holds the run; emit's wake_waiters waits for it,
    then skips the now-running run. The replayed await must still see the event."""
    seen: list[Any] = []

    @app.register_task("patient")
    def patient(params: Any, ctx: TaskContext) -> Any:
        try:
            value = ctx.await_event("e", timeout=10)
        except TimeoutError:
            value = "timeout"
        seen.append(value)
        return value

    spawned = app.spawn("patient", {})
    run_until_idle(app)
    clock.advance(10)
    with app.engine.connect() as claimer:  # the timeout claim, not yet committed
        (row,) = claimer.execute(
            sqlw.claim,
            {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1},
        ).all()
        emit = Outcome(lambda: app.emit_event("e", {"v": 1}))
        wait_for_lock_waiters(app.engine, 1)  # wake_waiters waits for the run
        claimer.commit()
        emit.join()
    assert emit.error is None and emit.value is True
    execute(app, ClaimedRun.from_row(row), "w", 120)
    assert seen == [{"v": 1}]  # the event emitted before the replayed await wins
    assert checkpoint_map(app.engine, spawned.task_id) == {"$await:e": {"payload": {"v": 1}}}
    assert wait_rows(app.engine) == 0


# == 5. fencing: an expired (not yet swept) lease commits nothing =======================


def _fenced_op(name: str) -> Callable[[TaskContext], Any]:
    def tx(session: Any) -> int:
        session.add(Order(email="fenced@example.com", amount=1))
        return 1

    def fail(ctx: TaskContext) -> Any:
        raise RuntimeError("fenced failure")

    return {
        "step": lambda ctx: ctx.step("s", lambda: 1),
        "transaction_step": lambda ctx: ctx.transaction_step("tx", tx),
        "spawn": lambda ctx: ctx.spawn("child", {}),
        "emit_event": lambda ctx: ctx.emit_event("ev", 1),
        "sleep_for": lambda ctx: ctx.sleep_for("nap", 5),
        "await_event": lambda ctx: ctx.await_event("ev2", timeout=5),
        "heartbeat": lambda ctx: ctx.heartbeat(),
        "complete": lambda ctx: "result",
        "fail": fail,
    }[name]


@pytest.mark.parametrize(
    "op",
    [
        "step",
        "transaction_step",
        "spawn",
        "emit_event",
        "sleep_for",
        "await_event",
        "heartbeat",
        "complete",
        "fail",
    ],
)
def test_a_worker_with_an_expired_lease_commits_nothing(
    app: Absurd, clock: FakeClock, op: str
) -> None:
    raised: list[str] = []

    @app.register_task("fenced", default_max_attempts=3)
    def fenced(params: Any, ctx: TaskContext) -> Any:
        clock.advance(121)  # past the 120 s lease; nobody has swept yet
        try:
            return _fenced_op(op)(ctx)
        except LeaseLost:
            raised.append("LeaseLost")
            raise

    spawned = app.spawn("fenced", {})
    app.work_batch(claim_timeout=120)
    if op not in ("complete", "fail"):
        assert raised == ["LeaseLost"]
    else:  # no ctx call to fence: the worker's complete/fail write is refused instead
        assert raised == []
    assert run_states(app.engine, spawned.task_id) == ["running"]  # left for the sweep
    assert task_state(app.engine, spawned.task_id) == "running"
    assert checkpoint_map(app.engine, spawned.task_id) == {}
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM public.orders")) == 0
        assert conn.scalar(text("SELECT count(*) FROM absurd.tasks")) == 1
        assert conn.scalar(select(text("count(*)")).select_from(events)) == 0
        assert conn.scalar(select(text("count(*)")).select_from(waits)) == 0
    assert sweep_expired(app, "default") == 1
    assert run_states(app.engine, spawned.task_id) == ["failed", "pending"]


# == 6. lease bookkeeping =============================================================


def test_a_checkpoint_does_not_shorten_a_longer_heartbeat(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("long-haul")
    def long_haul(params: Any, ctx: TaskContext) -> str:
        ctx.heartbeat(100)  # "the next part takes up to 100 s"
        ctx.step("prepare", lambda: 1)  # observed: lease cut back to now + 10 s
        clock.advance(50)
        ctx.step("finish", lambda: 2)  # observed: LeaseLost
        return "ok"

    spawned = app.spawn("long-haul", {})
    app.work_batch(claim_timeout=10)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"


def test_work_batch_does_not_start_a_run_whose_lease_already_expired(
    app: Absurd, clock: FakeClock
) -> None:
    started: list[int] = []

    @app.register_task("slow")
    def slow(params: Any, ctx: TaskContext) -> str:
        started.append(params["i"])
        for _ in range(2):  # 12 s of work, keeping its own lease alive
            clock.advance(6)
            ctx.heartbeat()
        return "done"

    app.spawn_many([SpawnRequest("slow", {"i": i}) for i in range(2)])
    app.work_batch(claim_timeout=10, batch_size=2)
    # Run 1's lease (claimed with run 0, 10 s) ran out at +10 s; it was started at +12 s
    # anyway, while any other worker's sweep may already be retrying it.
    assert started == [0]


# == 7. cancellation policy after a deferral ============================================


def test_deferred_unknown_task_still_honours_max_delay(app: Absurd, clock: FakeClock) -> None:
    spawned = app.spawn("late-deploy", {}, cancellation={"max_delay": 30})
    assert app.work_batch() == 1  # no handler here yet: deferred, never started
    clock.advance(100)
    ran: list[int] = []

    @app.register_task("late-deploy")
    def late_deploy(params: Any, ctx: TaskContext) -> str:
        ran.append(1)
        return "ran"

    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None
    assert (snapshot.state, ran) == ("cancelled", [])  # observed: ("completed", [1])


# == 8. plans on a database with many finished tasks =====================================

FINISHED = 20_000

_POPULATE = f"""
INSERT INTO absurd.tasks (task_id, queue_name, task_name, params, state, attempts,
    last_run_id, result, enqueued_at, first_started_at, finished_at)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'default', 'old', '{{}}',
       'completed', 1, ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid, '1',
       now() - interval '30 days', now() - interval '30 days',
       now() - interval '30 days' + g * interval '1 ms'
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.runs (run_id, task_id, queue_name, attempt, state, available_at, result,
    started_at, finished_at)
SELECT ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid,
       ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'default', 1,
       'completed', now() - interval '30 days', '1', now(), now()
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.checkpoints (task_id, checkpoint_name, state, owner_run_id)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 's', '1',
       ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.events (queue_name, event_name, payload, emitted_at, created_at)
SELECT 'default', 'old-' || g, '1', now() - interval '30 days', now() - interval '30 days'
FROM generate_series(1, {FINISHED}) g;
"""


@pytest.fixture
def many_finished(app: Absurd) -> Absurd:
    """FINISHED completed tasks (runs, checkpoints, emitted events) plus a few live runs."""
    with app.engine.begin() as conn:
        conn.execute(text(_POPULATE))
    app.spawn_many([SpawnRequest("live", {"i": i}) for i in range(5)])
    claim(app, "default", "w", 120, 2)  # two running, three pending
    with app.engine.begin() as conn:
        conn.execute(text("ANALYZE absurd.tasks, absurd.runs, absurd.checkpoints, absurd.events"))
    return app


def explain(conn: Connection, statement: Any, params: dict[str, Any]) -> str:
    """The plan of exactly the SQL and parameters the library sends (not executed)."""

    def prefix(*args: Any) -> tuple[str, Any]:
        return "EXPLAIN (COSTS OFF) " + args[2], args[3]

    event.listen(conn, "before_cursor_execute", prefix, retval=True)
    try:
        return "\n".join(row[0] for row in conn.execute(statement, params))
    finally:
        event.remove(conn, "before_cursor_execute", prefix)


def test_hot_statements_use_their_indexes(many_finished: Absurd) -> None:
    app = many_finished
    with app.engine.connect() as conn:
        live = conn.execute(
            select(runs.c.run_id, runs.c.task_id).where(runs.c.state == "running").limit(1)
        ).one()
        plans = {
            "claim": explain(
                conn,
                sqlw.claim,
                {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1},
            ),
            "expired_runs": explain(conn, sqlw.expired_runs, {"queue": "default"}),
            "write_checkpoint": explain(
                conn,
                sqlw.write_checkpoint,
                {"run": live.run_id, "claim_timeout": 120, "step": "s", "value_json": "1"},
            ),
            "emit_event": explain(conn, _sql.emit_event, app._app.emit_params("e", 1, None)),
            "wake_waiters": explain(conn, _sql.wake_waiters, app._app.emit_params("e", 1, None)),
            "fetch": explain(
                conn, _sql.fetch_task_result, {"task": live.task_id, "queue": "default"}
            ),
        }
    assert "Index Scan using ix_runs_claim on runs" in plans["claim"]
    assert "Index Scan using ix_runs_lease on runs" in plans["expired_runs"]
    assert "Index Scan using pk_runs on runs" in plans["write_checkpoint"]
    assert "Conflict Arbiter Indexes: pk_checkpoints" in plans["write_checkpoint"]
    assert "Conflict Arbiter Indexes: pk_events" in plans["emit_event"]
    assert "Index Scan using pk_tasks on tasks" in plans["fetch"]
    for name, plan in plans.items():
        for table in ("runs", "tasks", "checkpoints", "events"):
            assert f"Seq Scan on {table}" not in plan, (name, plan)


def test_cleanup_does_not_scan_every_task_and_event(many_finished: Absurd) -> None:
    app = many_finished
    with app.engine.connect() as conn:
        plan = explain(conn, sqlw.cleanup, {"queue": "default", "older_than": 86400, "limit": 100})
    assert "Index Scan using ix_tasks_finished on tasks" in plan
    assert "Index Scan using ix_events_emitted on events" in plan
    # Observed: "Seq Scan on tasks parent" (and at this size also the DELETE's
    # "Seq Scan on tasks") and "Seq Scan on events events_2" under the DELETE.
    assert "Seq Scan on tasks" not in plan, plan
    assert "Seq Scan on events" not in plan, plan


def test_deleting_a_task_finds_its_waits_by_index(app: Absurd) -> None:
    with app.engine.begin() as conn:
        conn.execute(text(_POPULATE.replace(str(FINISHED), "5000")))
        conn.execute(
            text(
                "INSERT INTO absurd.waits (run_id, task_id, queue_name, event_name, step_name) "
                "SELECT run_id, task_id, queue_name, 'ev-' || attempt, 's' FROM absurd.runs"
            )
        )
        conn.execute(text("ANALYZE absurd.waits"))
        # The statement the RI trigger of fk_waits_task_id_tasks runs per deleted task.
        plan = "\n".join(
            conn.scalars(
                text("EXPLAIN (COSTS OFF) DELETE FROM absurd.waits WHERE task_id = :t"),
                {"t": uuid.UUID("00000000-0000-7000-8000-000000000001")},
            )
        )
    assert "Seq Scan on waits" not in plan, plan


@pytest.fixture
def generic_plans(app: Absurd) -> Iterator[tuple[Connection, list[str]]]:
    """A private connection that plans generically and sends each plan as a NOTICE."""
    engine = create_engine(app.engine.url, poolclass=NullPool)
    notices: list[str] = []
    try:
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql("LOAD 'auto_explain'")
            except Exception:
                pytest.skip("auto_explain is not loadable here")
            conn.exec_driver_sql("SET auto_explain.log_min_duration = 0")
            conn.exec_driver_sql("SET auto_explain.log_level = 'notice'")
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.commit()
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            yield conn, notices
    finally:
        engine.dispose()


def test_claim_and_sweep_use_partial_indexes_in_generic_plans(
    many_finished: Absurd, generic_plans: tuple[Connection, list[str]]
) -> None:
    conn, notices = generic_plans
    conn.execute(
        sqlw.claim, {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1}
    )
    conn.rollback()
    conn.execute(sqlw.expired_runs, {"queue": "default"})
    conn.rollback()
    claim_plan, sweep_plan = (n for n in notices if "absurd.runs" in n)
    assert "ix_runs_claim" in claim_plan, claim_plan  # observed: Seq Scan on runs
    assert "ix_runs_lease" in sweep_plan, sweep_plan


# == 9. step naming ===================================================================


def test_a_step_named_like_a_repeat_does_not_collide(app: Absurd) -> None:
    calls: list[str] = []

    def step_fn(tag: str) -> Callable[[], str]:
        def fn() -> str:
            calls.append(tag)
            return tag

        return fn

    @app.register_task("numbered")
    def numbered(params: Any, ctx: TaskContext) -> list[str]:
        return [
            ctx.step("poll", step_fn("a")),
            ctx.step("poll", step_fn("b")),  # checkpoint "poll#2"
            ctx.step("poll#2", step_fn("c")),  # a different step; observed: returns "b"
        ]

    spawned = app.spawn("numbered", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None
    assert (snapshot.result, calls) == (["a", "b", "c"], ["a", "b", "c"])
