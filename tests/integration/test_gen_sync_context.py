# GENERATED from tests/integration/test_async_context.py by ci/generate_sync.py: do not edit.
# Change tests/integration/test_async_context.py and run `python ci/generate_sync.py`.
"""``TaskContext`` through ``Absurd`` (SPEC §4) against a real PostgreSQL.

ci/generate_sync.py turns test_async_context.py into its sync twin,
test_gen_sync_context.py, so every behaviour here is asserted on both APIs.

The database clock is moved, never waited for: ``absurd_sqla.testing.FakeClock``
sets ``absurd.fake_now`` on every connection the client's ``Engine`` checks out.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from time import sleep
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from absurd_sqla import (
    Absurd,
    CancelledTask,
    LeaseLost,
    NotSerializable,
    TimeoutError,
    get_current_context,
)
from absurd_sqla.context import TaskContext
from absurd_sqla.models import checkpoints, events, runs, tasks, waits
from absurd_sqla.testing import FakeClock
from tests.support import (
    Barrier,
    Event,
    Order,
    app_for,
    concurrently,
    run_states,
    task_state,
    worker_thread,
)

# -- helpers -------------------------------------------------------------------------


@contextlib.contextmanager
def clock_for(app: Absurd) -> Iterator[FakeClock]:
    """A ``FakeClock`` on the client's engine, started at the database's time."""
    with app.engine.connect() as conn:
        start = conn.scalar(text("SELECT clock_timestamp()"))
    with FakeClock(app.engine, start) as clock:
        yield clock


def drain(app: Absurd, *, claim_timeout: float = 120) -> int:
    """Run due work until nothing is claimable; return the runs processed."""
    total = 0
    for _ in range(1000):
        claimed = app.work_batch(claim_timeout=claim_timeout, batch_size=10)
        if claimed == 0:
            return total
        total += claimed
    raise AssertionError("still busy after 1000 batches")


def sweep_expired(app: Absurd) -> int:
    """What another worker's sweep does: fail runs whose lease ran out."""
    return app._executor.sweep_expired(app.queue_name)


def result_of(app: Absurd, task_id: Any) -> Any:
    snapshot = app.fetch_task_result(task_id)
    assert snapshot is not None
    return snapshot


def checkpoint_states(engine: Engine, task_id: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(checkpoints.c.checkpoint_name, checkpoints.c.state).where(
                checkpoints.c.task_id == task_id
            )
        )
        return {row.checkpoint_name: row.state for row in rows}


def runs_of(engine: Engine, task_id: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(runs).where(runs.c.task_id == task_id).order_by(runs.c.attempt))
        )


def count_orders(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Order)) or 0)


def count_rows(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def add_order(email: str, amount: int = 1) -> Callable[[Session], int]:
    """A transaction step's function: insert one Order, return its id."""

    def write(session: Session) -> int:
        order = Order(email=email, amount=amount)
        session.add(order)
        session.flush()
        return order.id

    return write


def value(result: Any) -> Callable[[], Any]:
    def fn() -> Any:
        return result

    return fn


# -- steps and replay ------------------------------------------------------------------


def test_step_runs_once_and_replays_its_value(database_url: str, clean_db: Engine) -> None:
    calls: Counter[str] = Counter()

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("replay")
        def handler(params: Any, ctx: TaskContext) -> Any:
            def charge() -> dict[str, int]:
                calls["charge"] += 1
                return {"charged": params["amount"]}

            def poll(i: int) -> int:
                calls[f"poll{i}"] += 1
                return i * 10

            first = ctx.step("charge", charge)
            polls = [ctx.step("poll", lambda i=i: poll(i)) for i in range(3)]  # type: ignore[misc]
            ctx.sleep_for("pause", 60)
            calls["after-sleep"] += 1
            return {"first": first, "polls": polls}

        spawned = app.spawn("replay", {"amount": 7})
        assert drain(app) == 1
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        clock.advance(61)
        assert drain(app) == 1  # replays charge and the polls from their checkpoints
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed"
    assert snapshot.result == {"first": {"charged": 7}, "polls": [0, 10, 20]}
    assert calls == {"charge": 1, "poll0": 1, "poll1": 1, "poll2": 1, "after-sleep": 1}
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert {k: v for k, v in stored.items() if k != "pause"} == {
        "charge": {"charged": 7},
        "poll": 0,
        "poll#2": 10,
        "poll#3": 20,
    }
    assert len(runs_of(clean_db, spawned.task_id)) == 1  # sleeping reuses the run


def test_raising_step_stores_nothing_and_a_non_json_value_fails(
    database_url: str, clean_db: Engine
) -> None:
    with app_for(database_url) as app:

        @app.register_task("bad-steps", max_attempts=1)
        def handler(params: Any, ctx: TaskContext) -> Any:
            def boom() -> int:
                return 1 // 0

            with contextlib.suppress(ZeroDivisionError):
                ctx.step("raises", boom)
            return ctx.step("not-json", value(object()))

        spawned = app.spawn("bad-steps", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert checkpoint_states(clean_db, spawned.task_id) == {}
    assert snapshot.state == "failed" and snapshot.failure is not None
    assert snapshot.failure["name"] == NotSerializable.__name__
    assert "not-json" in snapshot.failure["message"]


def test_run_step_forms_and_begin_complete_step(database_url: str, clean_db: Engine) -> None:
    seen: list[Any] = []
    calls: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("forms")
        def handler(params: Any, ctx: TaskContext) -> Any:
            step = ctx.run_step

            @step
            def bare() -> int:
                calls.append("bare")
                return 1

            @step()
            def called() -> int:
                calls.append("called")
                return 2

            @step("named")
            def anything() -> int:
                calls.append("named")
                return 3

            values = [bare, called, anything]
            handle = ctx.begin_step("manual")
            seen.append((handle.done, handle.state, handle.checkpoint_name))
            manual = handle.state if handle.done else ctx.complete_step(handle, {"m": 4})
            # complete_step on a done handle returns the stored value, storing nothing
            again = ctx.complete_step(ctx.begin_step("manual"), {"m": "ignored"})
            ctx.sleep_for("nap", 1)
            return [*values, manual, again]

        spawned = app.spawn("forms", {})
        drain(app)
        clock.advance(2)
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.result == [1, 2, 3, {"m": 4}, {"m": "ignored"}]
    assert calls == ["bare", "called", "named"]  # the replay called none of them
    assert seen == [(False, None, "manual"), (True, {"m": 4}, "manual")]
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert set(stored) == {"bare", "called", "named", "manual", "manual#2", "nap"}
    assert stored["manual"] == {"m": 4} and stored["manual#2"] == {"m": "ignored"}


# -- transaction_step --------------------------------------------------------------------


def test_transaction_step_commits_orm_writes_with_its_checkpoint(
    database_url: str, clean_db: Engine
) -> None:
    calls: list[int] = []
    sessions: list[Any] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("write-order")
        def handler(params: Any, ctx: TaskContext) -> int:
            def write(session: Session) -> int:
                calls.append(ctx.attempt)
                sessions.append(session)
                assert session.in_transaction()
                return add_order("t@example.com", params["amount"])(session)

            order_id = ctx.transaction_step("insert-order", write)
            ctx.sleep_for("then", 10)  # the replay must not write again
            return order_id

        spawned = app.spawn("write-order", {"amount": 3})
        drain(app)
        assert count_orders(clean_db) == 1
        clock.advance(11)
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert isinstance(sessions[0], Session)
    assert calls == [1]
    with clean_db.connect() as conn:
        (order,) = conn.execute(select(Order.__table__)).all()
    assert (order.email, order.amount) == ("t@example.com", 3)
    assert snapshot.state == "completed" and snapshot.result == order.id
    assert checkpoint_states(clean_db, spawned.task_id)["insert-order"] == order.id


def test_transaction_step_is_exactly_once_when_fenced_mid_transaction(
    database_url: str, clean_db: Engine
) -> None:
    """Lease lost between the business write and the commit: the write rolls back,
    and the retry writes it once."""
    attempts: list[int] = []
    signals: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("fenced")
        def handler(params: Any, ctx: TaskContext) -> str:
            def write(session: Session) -> str:
                attempts.append(ctx.attempt)
                add_order("once@example.com")(session)
                if ctx.attempt == 1:
                    clock.advance(11)  # the lease is gone ...
                    assert sweep_expired(app) == 1  # ... and another worker noticed
                return "written"

            try:
                return ctx.transaction_step("charge", write)
            except BaseException as exc:
                signals.append(type(exc).__name__)
                raise

        spawned = app.spawn("fenced", {})
        assert app.work_batch(claim_timeout=10) == 1
        assert signals == ["LeaseLost"]
        assert count_orders(clean_db) == 0  # rolled back with the refused checkpoint
        assert checkpoint_states(clean_db, spawned.task_id) == {}
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert count_orders(clean_db) == 1
    assert attempts == [1, 2]
    assert snapshot.state == "completed" and snapshot.result == "written"
    assert [(r.attempt, r.state) for r in runs_of(clean_db, spawned.task_id)] == [
        (1, "failed"),
        (2, "completed"),
    ]


def test_transaction_step_refused_after_cancel_rolls_back(
    database_url: str, clean_db: Engine
) -> None:
    signals: list[str] = []
    after: list[str] = []

    with app_for(database_url) as app:

        @app.register_task("cancelled-write")
        def handler(params: Any, ctx: TaskContext) -> str:
            def write(session: Session) -> str:
                add_order("no@example.com", 9)(session)
                assert app.cancel_task(ctx.task_id) is True  # wins: fn holds no run lock
                return "nope"

            try:
                ctx.transaction_step("write", write)
            except Exception:  # the signal is not an Exception
                after.append("swallowed")
            except BaseException as exc:
                signals.append(type(exc).__name__)
                raise
            after.append("went on")
            return "done"

        spawned = app.spawn("cancelled-write", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert (signals, after) == (["CancelledTask"], [])
    assert count_orders(clean_db) == 0
    assert checkpoint_states(clean_db, spawned.task_id) == {}
    assert snapshot.state == "cancelled"


def test_transaction_step_function_raising_rolls_back_and_retries_once(
    database_url: str, clean_db: Engine
) -> None:
    """fn fails after its write (a crash inside the transaction): nothing is left,
    the retry writes once; a repeated name is checkpointed as ``name#2``."""

    with app_for(database_url) as app:

        @app.register_task("crashy")
        def handler(params: Any, ctx: TaskContext) -> Any:
            def write(session: Session) -> int:
                order_id = add_order("crash@example.com", 2)(session)
                if ctx.attempt == 1:
                    raise RuntimeError("died mid-transaction")
                return order_id

            def second(session: Session) -> str:
                return "second-step-same-name"

            first = ctx.transaction_step("write", write)
            return [first, ctx.transaction_step("write", second)]

        spawned = app.spawn("crashy", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert count_orders(clean_db) == 1
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert stored == {"write": snapshot.result[0], "write#2": "second-step-same-name"}
    assert [r.state for r in runs_of(clean_db, spawned.task_id)] == ["failed", "completed"]


def test_transaction_step_commit_inside_fn_fails_the_step(
    database_url: str, clean_db: Engine
) -> None:
    """Documented misuse: committing inside fn commits the writes early, without
    the checkpoint, and then fails the step."""
    with app_for(database_url) as app:

        @app.register_task("commits", max_attempts=1)
        def handler(params: Any, ctx: TaskContext) -> str:
            def write(session: Session) -> str:
                add_order("early@example.com")(session)
                session.commit()
                return "committed early"

            return ctx.transaction_step("write", write)

        spawned = app.spawn("commits", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "failed"
    assert count_orders(clean_db) == 1  # committed early, by the user
    assert checkpoint_states(clean_db, spawned.task_id) == {}


def test_transaction_step_non_json_value_rolls_back_and_fails(
    database_url: str, clean_db: Engine
) -> None:
    with app_for(database_url) as app:

        @app.register_task("bad-value", max_attempts=1)
        def handler(params: Any, ctx: TaskContext) -> Any:
            def write(session: Session) -> Any:
                add_order("bad@example.com")(session)
                return {1, 2}

            return ctx.transaction_step("write", write)

        spawned = app.spawn("bad-value", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "failed" and snapshot.failure is not None
    assert snapshot.failure["name"] == NotSerializable.__name__
    assert count_orders(clean_db) == 0
    assert checkpoint_states(clean_db, spawned.task_id) == {}


CRASH_SCRIPT = """
import signal, sys
sys.path.append(sys.argv[3])
from sqlalchemy import create_engine, text
from absurd_sqla import Absurd
from tests.support import Order

url, mode = sys.argv[1], sys.argv[2]
effects = create_engine(url)


def record(step):
    with effects.begin() as conn:
        conn.execute(text("INSERT INTO tx_crash_effects (step) VALUES (:s)"), {"s": step})


def main():
    app = Absurd(url)

    @app.register_task("crashy")
    def crashy(params, ctx):
        def write(session):
            session.add(Order(email="crash@example.com", amount=1))
            session.flush()
            if mode == "before-commit":
                record("in-transaction")
                signal.pause()  # killed here, its transaction open
            return "written"

        ctx.transaction_step("write", write)
        record("committed")
        signal.pause()  # killed here, after the commit

    app.work_batch(claim_timeout=60)


main()
"""


def crash_effects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT step FROM tx_crash_effects ORDER BY id")))


@pytest.mark.parametrize(
    ("mode", "marker", "redone"),
    [("before-commit", "in-transaction", ["write"]), ("after-commit", "committed", [])],
)
def test_sigkilled_worker_transaction_step_is_exactly_once(
    database_url: str, clean_db: Engine, tmp_path: Path, mode: str, marker: str, redone: list[str]
) -> None:
    """A worker process SIGKILLed inside the step's transaction leaves no write
    (the retry writes once); killed right after the commit, the write and its
    checkpoint stay and the retry does not redo them."""
    with clean_db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS tx_crash_effects"))
        conn.execute(text("CREATE TABLE tx_crash_effects (id serial PRIMARY KEY, step text)"))
    script = tmp_path / "tx_crash_worker.py"
    script.write_text(CRASH_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    calls: list[str] = []

    with app_for(database_url) as app:
        spawned = app.spawn("crashy", {})
        worker = subprocess.Popen([sys.executable, str(script), database_url, mode, root])
        try:
            deadline = time.monotonic() + 30
            while marker not in crash_effects(clean_db):  # wait on a condition
                assert worker.poll() is None, "the worker exited early"
                assert time.monotonic() < deadline, f"the worker never reached {marker!r}"
                sleep(0.01)  # polls the condition above
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        assert count_orders(clean_db) == (1 if mode == "after-commit" else 0)

        @app.register_task("crashy")
        def crashy(params: Any, ctx: TaskContext) -> str:
            def write(session: Session) -> str:
                calls.append("write")
                add_order("crash@example.com")(session)
                return "rewritten"

            return ctx.transaction_step("write", write)

        with clock_for(app) as clock:
            clock.advance(61)  # the dead worker's 60 s lease runs out
            assert sweep_expired(app) == 1
            drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert calls == redone
    assert count_orders(clean_db) == 1
    assert snapshot.state == "completed"
    assert snapshot.result == ("rewritten" if redone else "written")
    with clean_db.connect() as conn:
        attempts = list(
            conn.execute(
                text(
                    "SELECT attempt, state, failure_reason->>'name' AS reason FROM absurd.runs "
                    "WHERE task_id = :t ORDER BY attempt"
                ),
                {"t": spawned.task_id},
            )
        )
    assert [(a.attempt, a.state, a.reason) for a in attempts] == [
        (1, "failed", "$ClaimTimeout"),
        (2, "completed", None),
    ]


# -- leases and fencing ------------------------------------------------------------------


def begin_and_complete(ctx: TaskContext, name: str) -> Any:
    return ctx.complete_step(ctx.begin_step(name), 1)


def _fenced_op(name: str) -> Callable[[TaskContext], Any]:
    def tx(session: Session) -> int:
        session.add(Order(email="fenced@example.com", amount=1))
        return 1

    ops: dict[str, Callable[[TaskContext], Any]] = {
        "step": lambda ctx: ctx.step("s", value(1)),
        "complete_step": lambda ctx: begin_and_complete(ctx, "h"),
        "transaction_step": lambda ctx: ctx.transaction_step("tx", tx),
        "spawn": lambda ctx: ctx.spawn("child", {}),
        "emit_event": lambda ctx: ctx.emit_event("ev", 1),
        "sleep_for": lambda ctx: ctx.sleep_for("nap", 5),
        "await_event": lambda ctx: ctx.await_event("ev2", timeout=5),
        "heartbeat": lambda ctx: ctx.heartbeat(),
    }
    return ops[name]


@pytest.mark.parametrize(
    "op",
    [
        "step",
        "complete_step",
        "transaction_step",
        "spawn",
        "emit_event",
        "sleep_for",
        "await_event",
        "heartbeat",
    ],
)
def test_a_worker_with_an_expired_lease_commits_nothing(
    database_url: str, clean_db: Engine, op: str
) -> None:
    raised: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("fenced", max_attempts=3)
        def fenced(params: Any, ctx: TaskContext) -> Any:
            clock.advance(121)  # past the 120 s lease; nobody has swept yet
            try:
                _fenced_op(op)(ctx)
            except LeaseLost:
                raised.append("LeaseLost")
                raise
            return "not fenced"

        spawned = app.spawn("fenced", {})
        app.work_batch(claim_timeout=120)
        assert raised == ["LeaseLost"]
        assert run_states(clean_db, spawned.task_id) == ["running"]  # left for the sweep
        assert checkpoint_states(clean_db, spawned.task_id) == {}
        assert count_orders(clean_db) == 0
        assert count_rows(clean_db, tasks) == 1
        assert count_rows(clean_db, events) == 0
        assert count_rows(clean_db, waits) == 0
        assert sweep_expired(app) == 1
    assert run_states(clean_db, spawned.task_id) == ["failed", "pending"]


def test_heartbeat_and_checkpoints_extend_the_lease(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("beating")
        def handler(params: Any, ctx: TaskContext) -> str:
            for _ in range(3):
                clock.advance(8)
                ctx.heartbeat()
            clock.advance(8)
            ctx.step("s", value(1))
            clock.advance(8)
            ctx.heartbeat(30)
            clock.advance(25)
            return "alive"

        spawned = app.spawn("beating", {})
        assert app.work_batch(claim_timeout=10) == 1
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "alive"
    assert run_states(clean_db, spawned.task_id) == ["completed"]


def test_heartbeat_after_cancel_raises_cancelled_task(database_url: str, clean_db: Engine) -> None:
    reached: list[str] = []

    with app_for(database_url) as app:

        @app.register_task("long")
        def handler(params: Any, ctx: TaskContext) -> str:
            ctx.heartbeat()
            app.cancel_task(ctx.task_id)
            try:
                ctx.heartbeat()
            except CancelledTask:
                reached.append("CancelledTask")
                raise
            reached.append("after")
            return "finished"

        spawned = app.spawn("long", {})
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert reached == ["CancelledTask"]
    assert snapshot.state == "cancelled"


# -- sleeping ----------------------------------------------------------------------------


def test_sleep_until_and_sleep_for_checkpoint_the_wake_time(
    database_url: str, clean_db: Engine
) -> None:
    entries: list[int] = []

    with app_for(database_url) as app, clock_for(app) as clock:
        wake = clock.now() + timedelta(hours=5)

        @app.register_task("alarm")
        def handler(params: Any, ctx: TaskContext) -> str:
            entries.append(1)
            ctx.sleep_until("alarm", wake)
            ctx.sleep_for("short", 30)
            return "rang"

        spawned = app.spawn("alarm", {})
        drain(app)
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.state == "sleeping" and run.available_at == wake
        clock.set(wake - timedelta(seconds=1))
        assert drain(app) == 0  # not due yet
        clock.set(wake)
        assert drain(app) == 1  # wakes, replays "alarm" (no sleep), sleeps 30 s
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.state == "sleeping" and run.available_at == wake + timedelta(seconds=30)
        stored = checkpoint_states(clean_db, spawned.task_id)
        assert set(stored) == {"alarm", "short"}
        assert datetime.fromisoformat(stored["alarm"]) == wake
        clock.advance(30)
        assert drain(app) == 1
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "rang"
    assert len(entries) == 3


def test_sleep_in_the_past_does_not_suspend(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("past")
        def handler(params: Any, ctx: TaskContext) -> str:
            ctx.sleep_until("then", clock.now() - timedelta(seconds=1))
            ctx.sleep_for("zero", 0)
            return "done"

        spawned = app.spawn("past", {})
        assert drain(app) == 1
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.result == "done"


# -- events ------------------------------------------------------------------------------


def test_event_emitted_before_the_await_is_delivered(database_url: str, clean_db: Engine) -> None:
    with app_for(database_url) as app:

        @app.register_task("early")
        def handler(params: Any, ctx: TaskContext) -> Any:
            return ctx.await_event("ready")

        assert app.emit_event("ready", {"n": 1}) is True
        spawned = app.spawn("early", {})
        assert drain(app) == 1
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == {"n": 1}
    assert checkpoint_states(clean_db, spawned.task_id) == {"$await:ready": {"payload": {"n": 1}}}


def test_await_suspends_and_an_emit_wakes_it_with_the_payload(
    database_url: str, clean_db: Engine
) -> None:
    entered: list[int] = []

    with app_for(database_url) as app:

        @app.register_task("waiter")
        def handler(params: Any, ctx: TaskContext) -> Any:
            entered.append(1)
            return ctx.await_event("go", step_name="wait-go")

        spawned = app.spawn("waiter", {})
        drain(app)
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        with clean_db.connect() as conn:
            wait = conn.execute(select(waits)).one()
        assert (wait.event_name, wait.step_name, wait.timeout_at) == ("go", "wait-go", None)
        assert drain(app) == 0  # nothing to do until the event
        assert app.emit_event("go", {"v": 5}) is True
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == {"v": 5}
    assert len(entered) == 2
    assert count_rows(clean_db, waits) == 0


def test_await_timeout_is_checkpointed_and_replays_as_timeout(
    database_url: str, clean_db: Engine
) -> None:
    outcomes: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

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
        drain(app)
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.available_at == clock.now() + timedelta(seconds=1.5)  # a float timeout
        clock.advance(1.5)
        drain(app)  # the timeout fires, is checkpointed, then the task sleeps
        assert outcomes == ["timeout"]
        assert checkpoint_states(clean_db, spawned.task_id)["$await:never"] == {"timeout": True}
        # The event arrives late: the replay must raise again, not wait or return it.
        app.emit_event("never", {"late": True})
        clock.advance(10)
        assert drain(app) == 1
        snapshot = result_of(app, spawned.task_id)
    assert outcomes == ["timeout", "timeout"]
    assert snapshot.state == "completed" and snapshot.result == "timeout"


def test_emit_event_from_a_task_wakes_a_waiting_task(database_url: str, clean_db: Engine) -> None:
    emitted: list[bool] = []

    with app_for(database_url) as app:

        @app.register_task("listener")
        def listener(params: Any, ctx: TaskContext) -> Any:
            return ctx.await_event("ping")

        @app.register_task("emitter")
        def emitter(params: Any, ctx: TaskContext) -> str:
            emitted.append(ctx.emit_event("ping", {"from": str(ctx.task_id)}))
            emitted.append(ctx.emit_event("ping", "second"))  # the first emit wins
            return "sent"

        waiting = app.spawn("listener", {})
        drain(app)
        assert task_state(clean_db, waiting.task_id) == "sleeping"
        sender = app.spawn("emitter", {})
        drain(app)
        snapshot = result_of(app, waiting.task_id)
    assert emitted == [True, False]
    assert snapshot.state == "completed"
    assert snapshot.result == {"from": str(sender.task_id)}


# -- child tasks -------------------------------------------------------------------------


def test_spawn_a_child_and_await_its_result(database_url: str, clean_db: Engine) -> None:
    parent_entries: list[int] = []
    child_headers: list[dict[str, Any]] = []

    with app_for(database_url) as app:

        @app.register_task("double")
        def double(params: Any, ctx: TaskContext) -> int:
            child_headers.append(dict(ctx.headers))
            return int(params["n"]) * 2

        @app.register_task("parent")
        def parent(params: Any, ctx: TaskContext) -> Any:
            parent_entries.append(1)
            child = ctx.spawn("double", {"n": 21})
            snapshot = ctx.await_task_result(child.task_id)
            return {"child": str(child.task_id), "state": snapshot.state, "value": snapshot.result}

        spawned = app.spawn("parent", {})
        assert app.work_batch(batch_size=1) == 1  # the parent spawns, then suspends
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        assert count_rows(clean_db, tasks) == 2
        drain(app)  # the child completes and wakes the parent, which finishes
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed"
    assert snapshot.result["state"] == "completed" and snapshot.result["value"] == 42
    assert len(parent_entries) == 2  # suspended once, resumed once
    assert count_rows(clean_db, tasks) == 2  # the replay did not spawn a second child
    assert child_headers == [{"absurd.parent_task_id": str(spawned.task_id)}]
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert stored["$spawn:double"]["task_id"] == snapshot.result["child"]
    with clean_db.connect() as conn:  # keyed by the parent's step: a replay finds it
        key = conn.scalar(
            select(tasks.c.idempotency_key).where(tasks.c.task_id == snapshot.result["child"])
        )
    assert key == f"{spawned.task_id}:$spawn:double"
    assert stored[f"$await-task:{snapshot.result['child']}"]["payload"]["result"] == 42


def test_await_task_result_timeout_is_checkpointed(database_url: str, clean_db: Engine) -> None:
    outcomes: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("slow-child")
        def slow_child(params: Any, ctx: TaskContext) -> str:
            ctx.sleep_for("long", 3600)
            return "late"

        @app.register_task("impatient")
        def impatient(params: Any, ctx: TaskContext) -> str:
            child = ctx.spawn("slow-child", {})
            try:
                ctx.await_task_result(child.task_id, timeout=0.5)
                outcomes.append("result")
            except TimeoutError:
                outcomes.append("timeout")
            ctx.sleep_for("after", 10)
            return outcomes[-1]

        spawned = app.spawn("impatient", {})
        drain(app)  # the parent waits, the child sleeps
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        clock.advance(0.5)
        drain(app)
        assert outcomes == ["timeout"]
        clock.advance(3600)  # the child finishes now: the replay must still time out
        drain(app)
        snapshot = result_of(app, spawned.task_id)
    assert outcomes == ["timeout", "timeout"]
    assert snapshot.state == "completed" and snapshot.result == "timeout"


# -- identity, failure and retries ----------------------------------------------------------


def test_identity_headers_and_attempt_after_a_failure(database_url: str, clean_db: Engine) -> None:
    seen: list[tuple[Any, ...]] = []

    with app_for(database_url) as app:

        @app.register_task("flaky", max_attempts=2)
        def flaky(params: Any, ctx: TaskContext) -> str:
            seen.append((ctx.task_id, ctx.run_id, ctx.attempt, dict(ctx.headers)))
            with pytest.raises(TypeError):
                ctx.headers["trace"] = "changed"  # type: ignore[index]
            if ctx.attempt == 1:
                raise RuntimeError("first try fails")
            return "second try"

        spawned = app.spawn("flaky", {}, headers={"trace": "abc"})
        assert drain(app) == 2  # the failure is retried at once
        snapshot = result_of(app, spawned.task_id)
    first, second = runs_of(clean_db, spawned.task_id)
    assert [(s[0], s[1], s[2], s[3]) for s in seen] == [
        (spawned.task_id, first.run_id, 1, {"trace": "abc"}),
        (spawned.task_id, second.run_id, 2, {"trace": "abc"}),
    ]
    assert first.run_id == spawned.run_id and first.run_id != second.run_id
    assert first.state == "failed" and second.state == "completed"
    reason = first.failure_reason
    assert (reason["name"], reason["message"]) == ("RuntimeError", "first try fails")
    assert "Traceback" in reason["traceback"] and "first try fails" in reason["traceback"]
    assert snapshot.state == "completed" and snapshot.result == "second try"


def test_control_flow_signals_are_not_swallowed_by_except_exception(
    database_url: str, clean_db: Engine
) -> None:
    swallowed: list[str] = []

    with app_for(database_url) as app:

        @app.register_task("sleepy")
        def sleepy(params: Any, ctx: TaskContext) -> str:
            try:
                ctx.sleep_for("nap", 3600)
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "woke too early"

        @app.register_task("waiting")
        def waiting(params: Any, ctx: TaskContext) -> str:
            try:
                ctx.await_event("never")
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "no event"

        @app.register_task("cancelled")
        def cancelled(params: Any, ctx: TaskContext) -> str:
            app.cancel_task(ctx.task_id)
            try:
                ctx.step("after-cancel", value(1))
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "went on"

        ids = {name: app.spawn(name, {}).task_id for name in ("sleepy", "waiting")}
        ids["cancelled"] = app.spawn("cancelled", {}).task_id
        assert drain(app) == 3
    assert swallowed == []
    assert task_state(clean_db, ids["sleepy"]) == "sleeping"
    assert task_state(clean_db, ids["waiting"]) == "sleeping"
    assert task_state(clean_db, ids["cancelled"]) == "cancelled"
    assert checkpoint_states(clean_db, ids["cancelled"]) == {}


# -- get_current_context -------------------------------------------------------------------


def helper_deep_inside() -> str:
    ctx = get_current_context()
    assert ctx is not None
    return str(ctx.task_id)


def test_current_context_is_the_handlers_inside_and_none_outside(
    database_url: str, clean_db: Engine
) -> None:
    seen: list[bool] = []

    with app_for(database_url) as app:

        @app.register_task("who")
        def who(params: Any, ctx: TaskContext) -> str:
            seen.append(get_current_context() is ctx)
            ctx.step("a-round-trip", value(1))
            seen.append(get_current_context() is ctx)
            return helper_deep_inside()

        @app.register_task("fails", max_attempts=1)
        def fails(params: Any, ctx: TaskContext) -> None:
            raise RuntimeError("boom")

        @app.register_task("sleeps")
        def sleeps(params: Any, ctx: TaskContext) -> None:
            ctx.sleep_for("nap", 3600)

        assert get_current_context() is None
        spawned = app.spawn("who", {})
        drain(app)
        assert get_current_context() is None  # reset after the handler
        app.spawn("fails", {})
        app.spawn("sleeps", {})
        assert drain(app) == 2
        assert get_current_context() is None  # also after a failing or suspending one
        snapshot = result_of(app, spawned.task_id)
    assert seen == [True, True]
    assert snapshot.result == str(spawned.task_id)


def test_concurrent_handlers_each_see_their_own_context(
    database_url: str, clean_db: Engine
) -> None:
    """Two handlers in flight at once (two tasks on one event loop, or two
    threads): each waits for the other to be in, and each still sees itself."""
    both_in = Barrier(2)
    results: dict[str, Any] = {}

    with app_for(database_url) as app:

        @app.register_task("pair")
        def pair(params: Any, ctx: TaskContext) -> str:
            before = get_current_context() is ctx
            both_in.wait()  # the other handler runs now
            ctx.step("round-trip", value(params["name"]))
            current = get_current_context()
            results[params["name"]] = (before, current is ctx, helper_deep_inside())
            return str(params["name"])

        a = app.spawn("pair", {"name": "a"})
        b = app.spawn("pair", {"name": "b"})
        claimed = concurrently(lambda: app.work_batch("w1"), lambda: app.work_batch("w2"))
        assert sorted(claimed) == [1, 1]
    assert results == {"a": (True, True, str(a.task_id)), "b": (True, True, str(b.task_id))}
    assert get_current_context() is None


def test_concurrent_handlers_in_the_worker_see_their_own_context(
    database_url: str, clean_db: Engine
) -> None:
    both_in = Barrier(2)
    results: dict[str, Any] = {}
    done = Event()

    with app_for(database_url) as app:

        @app.register_task("pair")
        def pair(params: Any, ctx: TaskContext) -> None:
            both_in.wait()
            ctx.heartbeat()
            results[params["name"]] = get_current_context() is ctx and helper_deep_inside()
            if len(results) == 2:
                done.set()

        a = app.spawn("pair", {"name": "a"})
        b = app.spawn("pair", {"name": "b"})
        with worker_thread(app, concurrency=2, poll_interval=0.05):
            done.wait()
    assert results == {"a": str(a.task_id), "b": str(b.task_id)}


# -- max_duration --------------------------------------------------------------------------


LIMIT = 60  # seconds of max_duration in these tests


@pytest.mark.parametrize("checkpoint", ["step", "complete_step", "transaction_step", "heartbeat"])
def test_max_duration_is_enforced_at_a_checkpoint(
    database_url: str, clean_db: Engine, checkpoint: str
) -> None:
    reached: list[str] = []
    raised: list[str] = []

    with app_for(database_url) as app, clock_for(app) as clock:

        def write(session: Session) -> str:
            session.add(Order(email="late@example.com", amount=1))
            return "written"

        calls: dict[str, Callable[[TaskContext], Any]] = {
            "step": lambda ctx: ctx.step("a", value(1)),
            "complete_step": lambda ctx: begin_and_complete(ctx, "a"),
            "transaction_step": lambda ctx: ctx.transaction_step("a", write),
            "heartbeat": lambda ctx: ctx.heartbeat(),
        }

        @app.register_task("bounded", max_attempts=1)
        def handler(params: Any, ctx: TaskContext) -> str:
            ctx.step("in-time", value(0))
            clock.advance(LIMIT + 1)
            try:
                calls[checkpoint](ctx)
            except CancelledTask:
                raised.append("CancelledTask")
                raise
            reached.append("after")
            return "too late"

        spawned = app.spawn("bounded", {}, cancellation={"max_duration": LIMIT})
        assert app.work_batch() == 1
        snapshot = result_of(app, spawned.task_id)
    assert (raised, reached) == (["CancelledTask"], [])
    assert snapshot.state == "cancelled" and snapshot.result is None
    assert run_states(clean_db, spawned.task_id) == ["cancelled"]
    if checkpoint == "transaction_step":  # its writes and checkpoint stay together
        stored = checkpoint_states(clean_db, spawned.task_id)
        assert (count_orders(clean_db), "a" in stored) in ((0, False), (1, True))


def test_within_max_duration_nothing_is_cancelled(database_url: str, clean_db: Engine) -> None:
    """The control for the test above: the same calls just inside the limit."""
    with app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("prompt", max_attempts=1)
        def handler(params: Any, ctx: TaskContext) -> str:
            clock.advance(LIMIT / 2)
            ctx.heartbeat()
            clock.advance(LIMIT / 2 - 1)
            ctx.transaction_step("write", add_order("ok@example.com", 2))
            ctx.step("a", value(1))
            ctx.heartbeat()
            return "finished"

        spawned = app.spawn("prompt", {}, cancellation={"max_duration": LIMIT})
        assert app.work_batch() == 1
        snapshot = result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "finished"
    assert count_orders(clean_db) == 1
