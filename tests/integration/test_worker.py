"""Worker and TaskContext semantics (SPEC §4-§5) against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from absurd_sqla import (
    Absurd,
    LeaseLost,
    NotSerializable,
    SpawnRequest,
    TaskStateError,
    TimeoutError,
)
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._run import ClaimedRun
from absurd_sqla.context import TaskContext
from absurd_sqla.models import checkpoints, events, runs, tasks, waits
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.internals import claim, execute, sweep_expired
from tests.support import (
    Order,
    Outcome,
    lock_waiters,
    run_states,
    task_state,
    wait_for_lock_waiters,
    wait_rows,
    wait_until,
)


def task_row(engine: Engine, task_id: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_id == task_id)).one()


def runs_of(engine: Engine, task_id: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(runs).where(runs.c.task_id == task_id).order_by(runs.c.attempt))
        )


def checkpoint_names(engine: Engine, task_id: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(checkpoints.c.checkpoint_name, checkpoints.c.state).where(
                checkpoints.c.task_id == task_id
            )
        )
        return {row.checkpoint_name: row.state for row in rows}


# -- steps and replay ------------------------------------------------------------


def test_finished_steps_never_run_again_after_suspension(app: Absurd, clock: FakeClock) -> None:
    calls: Counter[str] = Counter()

    @app.register_task("replay")
    def handler(params: Any, ctx: TaskContext) -> Any:
        def charge() -> dict[str, int]:
            calls["charge"] += 1
            return {"charged": params["amount"]}

        first = ctx.step("charge", charge)
        ctx.sleep_for("pause", 60)
        calls["after-sleep"] += 1
        return first

    spawned = app.spawn("replay", {"amount": 7})
    assert run_until_idle(app) == 1
    assert task_row(app.engine, spawned.task_id).state == "sleeping"
    clock.advance(59)
    assert run_until_idle(app) == 0  # not due yet
    clock.advance(2)
    assert run_until_idle(app) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == {"charged": 7}
    assert calls == {"charge": 1, "after-sleep": 1}
    assert len(runs_of(app.engine, spawned.task_id)) == 1  # sleeping reuses the run


def test_repeated_step_names_are_numbered(app: Absurd) -> None:
    @app.register_task("poller")
    def handler(params: Any, ctx: TaskContext) -> list[int]:
        return [ctx.step("poll", lambda i=i: i * 10) for i in range(3)]

    spawned = app.spawn("poller", {})
    run_until_idle(app)
    assert checkpoint_names(app.engine, spawned.task_id) == {"poll": 0, "poll#2": 10, "poll#3": 20}
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == [0, 10, 20]


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


def test_run_step_decorator_forms_and_begin_complete(app: Absurd) -> None:
    @app.register_task("forms")
    def handler(params: Any, ctx: TaskContext) -> Any:
        step = ctx.run_step

        @step
        def bare() -> int:
            return 1

        @step()
        def called() -> int:
            return 2

        @step("named")
        def anything() -> int:
            return 3

        handle = ctx.begin_step("manual")
        assert not handle.done
        manual = ctx.complete_step(handle, {"m": 4})
        return [bare, called, anything, manual]

    spawned = app.spawn("forms", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == [1, 2, 3, {"m": 4}]
    assert set(checkpoint_names(app.engine, spawned.task_id)) == {
        "bare",
        "called",
        "named",
        "manual",
    }


def test_begin_step_reports_done_on_replay(app: Absurd, clock: FakeClock) -> None:
    seen: list[Any] = []

    @app.register_task("decomposed")
    def handler(params: Any, ctx: TaskContext) -> Any:
        handle = ctx.begin_step("persist")
        seen.append((handle.done, handle.state, handle.checkpoint_name))
        value = handle.state if handle.done else ctx.complete_step(handle, {"turn": 1})
        ctx.sleep_for("nap", 1)
        return value

    spawned = app.spawn("decomposed", {})
    run_until_idle(app)
    clock.advance(2)
    run_until_idle(app)
    assert seen == [(False, None, "persist"), (True, {"turn": 1}, "persist")]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == {"turn": 1}


def test_raising_step_stores_nothing_and_bad_value_fails_the_run(app: Absurd) -> None:
    @app.register_task("bad-steps", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> Any:
        with contextlib.suppress(ZeroDivisionError):
            ctx.step("raises", lambda: 1 / 0)
        return ctx.step("not-json", lambda: object())

    spawned = app.spawn("bad-steps", {})
    run_until_idle(app)
    assert checkpoint_names(app.engine, spawned.task_id) == {}
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None
    assert snapshot.failure["name"] == NotSerializable.__name__
    assert "not-json" in snapshot.failure["message"]


def test_non_json_result_fails_the_run(app: Absurd) -> None:
    @app.register_task("bad-result", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> Any:
        return {1, 2}

    spawned = app.spawn("bad-result", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None and snapshot.failure["name"] == "NotSerializable"


# -- sleeping ---------------------------------------------------------------------


def test_sleep_until_and_checkpointed_wake_time(app: Absurd, clock: FakeClock) -> None:
    wake = clock.now() + timedelta(hours=5)
    entries: list[int] = []

    @app.register_task("alarm")
    def handler(params: Any, ctx: TaskContext) -> str:
        entries.append(1)
        ctx.sleep_until("alarm", wake)
        ctx.sleep_for("short", 30)
        return "rang"

    spawned = app.spawn("alarm", {})
    run_until_idle(app)
    (run,) = runs_of(app.engine, spawned.task_id)
    assert run.state == "sleeping" and run.available_at == wake
    clock.set(wake)
    run_until_idle(app)  # wakes, replays alarm (no sleep), then sleeps 30 s
    (run,) = runs_of(app.engine, spawned.task_id)
    assert run.state == "sleeping" and run.available_at == wake + timedelta(seconds=30)
    stored = checkpoint_names(app.engine, spawned.task_id)
    assert set(stored) == {"alarm", "short"}
    clock.advance(30)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "rang"
    assert len(entries) == 3


def test_sleep_in_the_past_does_not_suspend(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("past")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.sleep_until("then", clock.now() - timedelta(seconds=1))
        ctx.sleep_for("zero", 0)
        return "done"

    spawned = app.spawn("past", {})
    assert run_until_idle(app) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "done"


# -- events -----------------------------------------------------------------------


def test_event_emitted_before_await_is_delivered(app: Absurd) -> None:
    @app.register_task("early")
    def handler(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("ready")

    app.emit_event("ready", {"n": 1})
    spawned = app.spawn("early", {})
    assert run_until_idle(app) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == {"n": 1}


def test_await_suspends_and_emit_wakes_with_payload(app: Absurd) -> None:
    entered: list[int] = []

    @app.register_task("waiter")
    def handler(params: Any, ctx: TaskContext) -> Any:
        entered.append(1)
        return ctx.await_event("go", step_name="wait-go")

    spawned = app.spawn("waiter", {})
    run_until_idle(app)
    assert task_row(app.engine, spawned.task_id).state == "sleeping"
    with app.engine.connect() as conn:
        wait = conn.execute(select(waits)).one()
    assert (wait.event_name, wait.step_name, wait.timeout_at) == ("go", "wait-go", None)
    (waiting_run,) = runs_of(app.engine, spawned.task_id)  # readable: no 'infinity'
    assert waiting_run.state == "sleeping" and waiting_run.available_at is None
    assert app.emit_event("go", None) is True  # a null payload still counts
    assert checkpoint_names(app.engine, spawned.task_id) == {"wait-go": {"payload": None}}
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed" and snapshot.result is None
    with app.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(waits)) == 0
    assert len(entered) == 2


def test_emit_wakes_every_waiter_on_the_queue_only(app: Absurd) -> None:
    app.create_queue("other")

    @app.register_task("fan")
    def handler(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("broadcast")

    here = [app.spawn("fan", {"i": i}) for i in range(3)]
    there = app.spawn("fan", {}, queue="other")
    run_until_idle(app)
    run_until_idle(app, queue="other")
    app.emit_event("broadcast", "hello")
    run_until_idle(app)
    run_until_idle(app, queue="other")
    for spawned in here:
        snapshot = app.fetch_task_result(spawned.task_id)
        assert snapshot is not None and snapshot.result == "hello"
    other = app.fetch_task_result(there.task_id, queue_name="other")
    assert other is not None and other.state == "sleeping"


def test_await_timeout_is_checkpointed_and_replays_as_timeout(
    app: Absurd, clock: FakeClock
) -> None:
    outcomes: list[str] = []

    @app.register_task("patient")
    def handler(params: Any, ctx: TaskContext) -> Any:
        try:
            ctx.await_event("never", timeout=1.5)
            outcomes.append("payload")
        except TimeoutError:
            outcomes.append("timeout")
        ctx.sleep_for("after", 10)
        return outcomes[-1]

    spawned = app.spawn("patient", {})
    run_until_idle(app)
    (run,) = runs_of(app.engine, spawned.task_id)
    assert run.available_at == clock.now() + timedelta(seconds=1.5)  # float timeout
    clock.advance(1.5)
    run_until_idle(app)  # timeout fires, checkpointed, then sleeps
    assert outcomes == ["timeout"]
    assert checkpoint_names(app.engine, spawned.task_id)["$await:never"] == {"timeout": True}
    # The event arrives late: the replay must still see the timeout, not a payload.
    app.emit_event("never", {"late": True})
    clock.advance(10)
    run_until_idle(app)
    assert outcomes == ["timeout", "timeout"]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "timeout"


def test_event_before_timeout_wins(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("race-timeout")
    def handler(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("soon", timeout=60)

    spawned = app.spawn("race-timeout", {})
    run_until_idle(app)
    clock.advance(30)
    app.emit_event("soon", 42)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == 42


def _await_params(run_id: Any) -> dict[str, Any]:
    """Parameters of the await_event statement for event "e" on the default queue."""
    return {
        "run": run_id,
        "claim_timeout": 120,
        "step": "$await:e",
        "event": "e",
        "event_queue": "default",
        "timeout_seconds": None,
    }


def _claim_one(app: Absurd) -> Any:
    (run,) = claim(app, "default", "w1", 120, 1)
    return run


def test_emit_committing_while_waiter_suspends_is_not_lost(app: Absurd) -> None:
    """Waiter's suspend transaction is open; the emit must wait for it, then wake it."""
    spawned = app.spawn("suspender", {})
    run = _claim_one(app)
    params = _await_params(run.run_id)
    with app.engine.connect() as waiter:
        row = waiter.execute(sqlw.await_event, params).one()
        assert row.owned == 1 and row.suspended == 1  # suspended, not yet committed
        emitter = threading.Thread(target=app.emit_event, args=("e", {"v": 1}))
        emitter.start()
        wait_until(lambda: lock_waiters(app.engine) == 1, "the emit blocks on the waiter")
        waiter.commit()
        emitter.join(timeout=10)
        assert not emitter.is_alive()
    (run_row,) = runs_of(app.engine, spawned.task_id)
    assert run_row.state == "pending"  # woken
    assert checkpoint_names(app.engine, spawned.task_id) == {"$await:e": {"payload": {"v": 1}}}


def test_waiter_suspending_while_emit_uncommitted_sees_the_event(app: Absurd) -> None:
    """The emit's transaction is open; the waiter must wait, then see the event."""
    spawned = app.spawn("suspender", {})
    run = _claim_one(app)
    params = _await_params(run.run_id)
    results: list[Any] = []
    with Session(app.engine) as session:
        assert app.emit_event("e", {"v": 2}, session=session) is True

        def suspend() -> None:
            with app.engine.begin() as conn:
                results.append(conn.execute(sqlw.await_event, params).one())

        waiter = threading.Thread(target=suspend)
        waiter.start()
        wait_until(lambda: lock_waiters(app.engine) == 1, "the waiter blocks on the emit")
        session.commit()
        waiter.join(timeout=10)
    (row,) = results
    assert row.emitted and row.payload == {"v": 2} and row.suspended == 0
    assert runs_of(app.engine, spawned.task_id)[0].state == "running"


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
    assert checkpoint_names(app.engine, spawned.task_id) == {"$await:e": {"payload": {"v": 1}}}
    assert wait_rows(app.engine) == 0


# -- retries ----------------------------------------------------------------------


def test_fixed_retry_delay_then_success(app: Absurd, clock: FakeClock) -> None:
    attempts: list[int] = []

    @app.register_task("flaky")
    def handler(params: Any, ctx: TaskContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt}")
        return "ok"

    spawned = app.spawn("flaky", {}, retry_strategy={"kind": "fixed", "base_seconds": 60})
    run_until_idle(app)
    clock.advance(59)
    assert run_until_idle(app) == 0
    clock.advance(1)
    run_until_idle(app)
    clock.advance(60)
    run_until_idle(app)
    assert attempts == [1, 2, 3]
    history = runs_of(app.engine, spawned.task_id)
    assert [r.state for r in history] == ["failed", "failed", "completed"]
    assert history[0].failure_reason["name"] == "ConnectionError"
    assert history[0].failure_reason["message"] == "attempt 1"
    assert "ConnectionError" in history[0].failure_reason["traceback"]
    row = task_row(app.engine, spawned.task_id)
    assert (row.state, row.attempts, row.last_run_id) == ("completed", 3, history[2].run_id)


def test_exponential_delays_and_exhaustion(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("doomed")
    def handler(params: Any, ctx: TaskContext) -> None:
        raise ValueError(f"no {ctx.attempt}")

    strategy = {"kind": "exponential", "base_seconds": 10, "factor": 3, "max_seconds": 50}
    spawned = app.spawn("doomed", {}, max_attempts=4, retry_strategy=strategy)
    delays = []
    for _ in range(4):
        before = clock.now()
        run_until_idle(app)
        history = runs_of(app.engine, spawned.task_id)
        if history[-1].state == "pending":
            delays.append((history[-1].available_at - before).total_seconds())
            clock.set(history[-1].available_at)
    assert delays == [10, 30, 50]  # 10*3^0, 10*3^1, capped at 50
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None and snapshot.failure["message"] == "no 4"
    assert len(runs_of(app.engine, spawned.task_id)) == 4


def test_no_strategy_retries_at_once(app: Absurd) -> None:
    @app.register_task("twice")
    def handler(params: Any, ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first")
        return ctx.attempt

    spawned = app.spawn("twice", {})
    assert run_until_idle(app) == 2
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == 2


def test_retry_task_in_place_keeps_checkpoints_and_spawn_new(app: Absurd) -> None:
    calls: Counter[str] = Counter()
    fail = {"on": True}

    @app.register_task("fragile", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.step("expensive", lambda: calls.update(["expensive"]) or 1)
        if fail["on"]:
            raise RuntimeError("boom")
        return "fixed"

    spawned = app.spawn("fragile", {"x": 1})
    run_until_idle(app)
    assert task_row(app.engine, spawned.task_id).state == "failed"
    pending = app.spawn("fragile", {})
    with pytest.raises(TaskStateError, match="only failed"):
        app.retry_task(pending.task_id)
    app.cancel_task(pending.task_id)
    fail["on"] = False
    retried = app.retry_task(spawned.task_id)
    assert retried.task_id == spawned.task_id and retried.attempt == 2
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "fixed"
    assert calls["expensive"] == 1  # the checkpoint survived the retry
    assert [r.state for r in runs_of(app.engine, spawned.task_id)] == ["failed", "completed"]


def test_retry_task_spawn_new_copies_the_task(app: Absurd) -> None:
    @app.register_task("once", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> Any:
        if ctx.headers.get("fail"):
            raise RuntimeError("no")
        return params

    spawned = app.spawn("once", {"p": 1}, headers={"fail": True})
    run_until_idle(app)
    copy = app.retry_task(spawned.task_id, spawn_new=True, max_attempts=3)
    assert copy.task_id != spawned.task_id and copy.created
    row = task_row(app.engine, copy.task_id)
    assert (row.task_name, row.params, row.max_attempts) == ("once", {"p": 1}, 3)
    assert task_row(app.engine, spawned.task_id).state == "failed"


# -- cancellation -----------------------------------------------------------------


def test_cancel_sleeping_task_is_never_resumed(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("sleepy")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.sleep_for("nap", 10)
        return "woke"

    spawned = app.spawn("sleepy", {})
    run_until_idle(app)
    assert app.cancel_task(spawned.task_id) is True
    clock.advance(11)
    assert run_until_idle(app) == 0
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled"


def test_cancel_while_running_stops_at_next_checkpoint(app: Absurd) -> None:
    reached: list[str] = []

    @app.register_task("long")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.step("one", lambda: 1)
        app.cancel_task(ctx.task_id)  # as if from another process
        reached.append("before-two")
        ctx.step("two", lambda: 2)
        reached.append("after-two")
        return "finished"

    spawned = app.spawn("long", {})
    run_until_idle(app)
    assert reached == ["before-two"]
    assert set(checkpoint_names(app.engine, spawned.task_id)) == {"one"}
    assert [r.state for r in runs_of(app.engine, spawned.task_id)] == ["cancelled"]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled" and snapshot.result is None


def test_max_delay_cancels_a_task_not_started_in_time(app: Absurd, clock: FakeClock) -> None:
    ran: list[int] = []

    @app.register_task("timely")
    def handler(params: Any, ctx: TaskContext) -> None:
        ran.append(1)

    late = app.spawn("timely", {}, cancellation={"max_delay": 30})
    clock.advance(31)
    on_time = app.spawn("timely", {}, cancellation={"max_delay": 30})
    run_until_idle(app)
    late_snapshot = app.fetch_task_result(late.task_id)
    on_time_snapshot = app.fetch_task_result(on_time.task_id)
    assert late_snapshot is not None and late_snapshot.state == "cancelled"
    assert on_time_snapshot is not None and on_time_snapshot.state == "completed"
    assert ran == [1]


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


# -- unknown tasks ----------------------------------------------------------------


def test_unknown_task_is_deferred_not_failed(app: Absurd, clock: FakeClock) -> None:
    spawned = app.spawn("deployed-later", {"v": 1})
    assert run_until_idle(app) == 1
    (run,) = runs_of(app.engine, spawned.task_id)
    assert run.state == "pending" and run.failure_reason is None
    assert 15 <= (run.available_at - clock.now()).total_seconds() <= 30

    @app.register_task("deployed-later")
    def handler(params: Any, ctx: TaskContext) -> Any:
        return params

    assert run_until_idle(app) == 0
    clock.advance(30)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == {"v": 1}
    assert len(runs_of(app.engine, spawned.task_id)) == 1


# -- leases -----------------------------------------------------------------------


def test_expired_lease_fails_run_and_fences_old_worker(app: Absurd, clock: FakeClock) -> None:
    calls: Counter[str] = Counter()
    in_step = threading.Event()
    release = threading.Event()
    outcome: list[BaseException | str] = []

    def first_step() -> int:
        calls["first"] += 1
        return 1

    def blocking_step() -> int:
        calls["blocking"] += 1
        if calls["blocking"] == 1:
            in_step.set()
            assert release.wait(10)
        return 2

    @app.register_task("leased")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.step("first", first_step)
        try:
            ctx.step("second", blocking_step)
        except BaseException as exc:  # record the fencing signal, then let it through
            outcome.append(exc)
            raise
        return "done"

    spawned = app.spawn("leased", {})
    (old_run,) = claim(app, "default", "old-worker", 10, 1)
    old = threading.Thread(target=execute, args=(app, old_run, "old-worker", 10))
    old.start()
    assert in_step.wait(10)
    clock.advance(11)  # the old worker's lease runs out
    assert sweep_expired(app, "default") == 1
    first, second = runs_of(app.engine, spawned.task_id)
    assert first.state == "failed" and first.failure_reason["name"] == "$ClaimTimeout"
    assert second.state == "pending" and second.attempt == 2
    release.set()
    old.join(10)
    assert [type(exc).__name__ for exc in outcome] == ["LeaseLost"]  # fenced
    assert checkpoint_names(app.engine, spawned.task_id) == {"first": 1}
    run_until_idle(app)  # the new attempt resumes from committed checkpoints
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "done"
    assert calls == {"first": 1, "blocking": 2}


def test_worker_notices_its_own_expired_lease(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("overdue")
    def handler(params: Any, ctx: TaskContext) -> str:
        clock.advance(200)  # longer than the lease, no sweep has happened
        ctx.step("late", lambda: 1)
        return "should not complete"

    spawned = app.spawn("overdue", {})
    app.work_batch(claim_timeout=120)
    assert checkpoint_names(app.engine, spawned.task_id) == {}
    assert runs_of(app.engine, spawned.task_id)[0].state == "running"  # awaiting the sweep
    sweep_expired(app, "default")
    assert [r.state for r in runs_of(app.engine, spawned.task_id)] == ["failed", "pending"]


def test_heartbeat_and_checkpoints_extend_the_lease(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("beating")
    def handler(params: Any, ctx: TaskContext) -> str:
        for _ in range(3):
            clock.advance(8)
            ctx.heartbeat()
        clock.advance(8)
        ctx.step("s", lambda: 1)
        clock.advance(8)
        ctx.heartbeat(30)
        clock.advance(25)
        return "alive"

    spawned = app.spawn("beating", {})
    app.work_batch(claim_timeout=10)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "alive"


def test_no_expiry_with_non_positive_claim_timeout(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("forever")
    def handler(params: Any, ctx: TaskContext) -> str:
        clock.advance(10_000)
        ctx.step("s", lambda: 1)
        return "ok"

    spawned = app.spawn("forever", {})
    app.work_batch(claim_timeout=0)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "ok"


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
    assert checkpoint_names(app.engine, spawned.task_id) == {}
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM public.orders")) == 0
        assert conn.scalar(text("SELECT count(*) FROM absurd.tasks")) == 1
        assert conn.scalar(select(text("count(*)")).select_from(events)) == 0
        assert conn.scalar(select(text("count(*)")).select_from(waits)) == 0
    assert sweep_expired(app, "default") == 1
    assert run_states(app.engine, spawned.task_id) == ["failed", "pending"]


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


# -- transaction_step ---------------------------------------------------------------


def test_transaction_step_commits_writes_with_checkpoint(app: Absurd, clean_db: Engine) -> None:
    @app.register_task("write-order")
    def handler(params: Any, ctx: TaskContext) -> int:
        def write(session: Session) -> int:
            order = Order(email="t@example.com", amount=params["amount"])
            session.add(order)
            session.flush()
            return order.id

        return ctx.transaction_step("insert-order", write)

    spawned = app.spawn("write-order", {"amount": 3})
    run_until_idle(app)
    with Session(clean_db) as session:
        orders = session.scalars(select(Order)).all()
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == orders[0].id and len(orders) == 1


def test_transaction_step_is_exactly_once_when_fenced_mid_transaction(
    app: Absurd, clock: FakeClock, clean_db: Engine
) -> None:
    """Lease lost between the business write and the commit: the write rolls back,
    and the retry writes it once."""
    attempts: list[int] = []

    @app.register_task("fenced")
    def handler(params: Any, ctx: TaskContext) -> str:
        def write(session: Session) -> str:
            attempts.append(ctx.attempt)
            session.add(Order(email="once@example.com", amount=1))
            session.flush()
            if ctx.attempt == 1:
                clock.advance(11)  # lease gone ...
                assert sweep_expired(app, "default") == 1  # ... and another worker noticed
            return "written"

        return ctx.transaction_step("charge", write)

    spawned = app.spawn("fenced", {})
    app.work_batch(claim_timeout=10)
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 0  # rolled back
    run_until_idle(app)
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 1
    assert attempts == [1, 2]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "written"


def test_transaction_step_rolls_back_when_worker_crashes(app: Absurd, clean_db: Engine) -> None:
    """A crash after the write but before commit leaves nothing; the retry writes once."""
    crashed = {"done": False}

    @app.register_task("crashy")
    def handler(params: Any, ctx: TaskContext) -> str:
        def write(session: Session) -> str:
            session.add(Order(email="crash@example.com", amount=2))
            session.flush()
            if not crashed["done"]:
                crashed["done"] = True
                raise SystemError("worker died mid-transaction")
            return "ok"

        value = ctx.transaction_step("write", write)
        ctx.transaction_step("write", lambda s: "second-step-same-name")
        return value

    spawned = app.spawn("crashy", {})
    run_until_idle(app)
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 1
    assert set(checkpoint_names(app.engine, spawned.task_id)) == {"write", "write#2"}
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "ok"


def test_transaction_step_refused_after_cancel_rolls_back(app: Absurd, clean_db: Engine) -> None:
    @app.register_task("cancelled-write")
    def handler(params: Any, ctx: TaskContext) -> str:
        def write(session: Session) -> str:
            session.add(Order(email="no@example.com", amount=9))
            app.cancel_task(ctx.task_id)
            return "nope"

        return ctx.transaction_step("write", write)

    spawned = app.spawn("cancelled-write", {})
    run_until_idle(app)
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 0
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled"


# -- concurrency --------------------------------------------------------------------


def test_two_claimers_never_get_the_same_run(app: Absurd) -> None:
    app.spawn_many([SpawnRequest("x", {"i": i}) for i in range(60)])
    barrier = threading.Barrier(4)
    claimed: list[list[Any]] = [[] for _ in range(4)]

    def grab(slot: int) -> None:
        barrier.wait(10)
        while True:
            got = claim(app, "default", f"w{slot}", 120, 3)
            if not got:
                return
            claimed[slot] += [run.run_id for run in got]

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [run_id for batch in claimed for run_id in batch]
    assert len(every) == 60 and len(set(every)) == 60


def test_cancel_racing_complete_and_fail_never_deadlocks(app: Absurd) -> None:
    gates: list[threading.Barrier] = []

    @app.register_task("racer", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> str:
        gates[-1].wait()
        if params["fail"]:
            raise RuntimeError("fail")
        return "done"

    for round_ in range(20):
        gate = threading.Barrier(2, timeout=10)
        gates.append(gate)
        should_fail = round_ % 2 == 1
        spawned = app.spawn("racer", {"fail": should_fail})
        (run,) = claim(app, "default", "w", 120, 1)
        worker = threading.Thread(target=execute, args=(app, run, "w", 120))
        worker.start()
        gate.wait()
        cancelled = app.cancel_task(spawned.task_id)
        worker.join(10)
        assert not worker.is_alive()
        row = task_row(app.engine, spawned.task_id)
        (run_row,) = runs_of(app.engine, spawned.task_id)
        assert row.state == run_row.state  # task and run agree
        assert row.state in ("cancelled", "failed" if should_fail else "completed")
        # Whichever side won, cancel_task reported it truthfully.
        assert cancelled is (row.state == "cancelled")


def test_fractional_claim_timeout_still_expires(app: Absurd, clock: FakeClock) -> None:
    spawned = app.spawn("anything", {})
    (run,) = claim(app, "default", "w", 0.5, 1)
    (row,) = runs_of(app.engine, spawned.task_id)
    assert row.claim_expires_at == clock.now() + timedelta(seconds=0.5)
    assert run.run_id == row.run_id


def test_cleanup_removes_placeholders_nobody_waits_for(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("gives-up")
    def handler(params: Any, ctx: TaskContext) -> str:
        try:
            ctx.await_event(params["event"], timeout=5)
        except TimeoutError:
            return "gave up"
        return "got it"

    gave_up = app.spawn("gives-up", {"event": "never"})
    still_waiting = app.spawn("gives-up", {"event": "later"})
    run_until_idle(app)
    clock.advance(5)
    with app.engine.begin() as conn:  # keep the second waiter waiting
        conn.execute(
            text("UPDATE absurd.waits SET timeout_at = NULL WHERE task_id = :t"),
            {"t": still_waiting.task_id},
        )
        conn.execute(
            text("UPDATE absurd.runs SET available_at = NULL WHERE task_id = :t"),
            {"t": still_waiting.task_id},
        )
    run_until_idle(app)
    snapshot = app.fetch_task_result(gave_up.task_id)
    assert snapshot is not None and snapshot.result == "gave up"
    clock.advance(3600)
    assert app.cleanup(older_than=60) == (1, 1)  # the finished task and "never"'s placeholder
    with app.engine.connect() as conn:
        left = list(conn.scalars(text("SELECT event_name FROM absurd.events")))
    assert left == ["later"]  # a waiter still needs this one


def test_retry_task_joins_the_callers_transaction(app: Absurd, clean_db: Engine) -> None:
    @app.register_task("fails-once", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> None:
        raise RuntimeError("no")

    spawned = app.spawn("fails-once", {})
    run_until_idle(app)
    with Session(clean_db) as session:
        app.retry_task(spawned.task_id, session=session)
        session.rollback()
    assert task_row(app.engine, spawned.task_id).state == "failed"
    assert len(runs_of(app.engine, spawned.task_id)) == 1


def test_stop_before_the_worker_registers_is_not_lost(app: Absurd) -> None:
    app.stop_worker()  # e.g. the thread below had not reached start_worker yet
    worker = threading.Thread(target=app.start_worker, kwargs={"poll_interval": 30})
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    # The pending stop was used up: the next worker runs until stopped.
    again = threading.Thread(target=app.start_worker, kwargs={"poll_interval": 30})
    again.start()
    wait_until(app._workers.running, "the second worker registered")
    app.stop_worker()
    again.join(10)
    assert not again.is_alive()


def test_ctx_emit_event_is_fenced_after_cancel(app: Absurd) -> None:
    @app.register_task("emitter")
    def handler(params: Any, ctx: TaskContext) -> str:
        assert ctx.emit_event("first", 1) is True
        app.cancel_task(ctx.task_id)
        ctx.emit_event("second", 2)  # refused: the task is cancelled
        return "unreachable"

    spawned = app.spawn("emitter", {})
    run_until_idle(app)
    with app.engine.connect() as conn:
        names = set(conn.scalars(text("SELECT event_name FROM absurd.events")))
    assert names == {"first"}
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled"


def test_max_delay_counts_from_run_after(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("scheduled")
    def handler(params: Any, ctx: TaskContext) -> str:
        return "ran"

    prompt = app.spawn("scheduled", {}, run_after=120, cancellation={"max_delay": 60})
    late = app.spawn("scheduled", {}, run_after=120, cancellation={"max_delay": 60})
    clock.advance(150)  # due 30 s ago: within max_delay
    assert app.work_batch(batch_size=1) == 1
    clock.advance(31)  # the other is now 61 s past due
    run_until_idle(app)
    # Whichever was claimed first ran 30 s after it was due; the other, 61 s.
    states = sorted(task_row(app.engine, s.task_id).state for s in (prompt, late))
    assert states == ["cancelled", "completed"]


def test_cleanup_deletes_at_most_limit_events(app: Absurd, clock: FakeClock) -> None:
    for i in range(3):
        app.emit_event(f"old-{i}", i)
    with app.engine.begin() as conn:  # three abandoned placeholders too
        conn.execute(
            text(
                "INSERT INTO absurd.events (queue_name, event_name) "
                "SELECT 'default', 'waited-' || g FROM generate_series(1, 3) g"
            )
        )
    clock.advance(3600)
    assert app.cleanup(older_than=60, limit=2) == (0, 2)
    assert app.cleanup(older_than=60, limit=2) == (0, 2)
    assert app.cleanup(older_than=60, limit=2) == (0, 2)
    assert app.cleanup(older_than=60, limit=2) == (0, 0)
