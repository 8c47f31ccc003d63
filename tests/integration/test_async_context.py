"""``AsyncTaskContext`` through ``AsyncAbsurd`` (SPEC §4) against a real PostgreSQL.

ci/generate_sync.py turns test_async_context.py into its sync twin,
test_gen_sync_context.py, so every behaviour here is asserted on both APIs.

The database clock is moved, never waited for: ``absurd_sqla.testing.FakeClock``
sets ``absurd.fake_now`` on every connection the client's ``AsyncEngine`` checks out.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from asyncio import sleep as async_sleep
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from absurd_sqla import (
    AsyncAbsurd,
    CancelledTask,
    LeaseLost,
    NotSerializable,
    TimeoutError,
    get_current_context,
)
from absurd_sqla.context_async import AsyncTaskContext
from absurd_sqla.models import checkpoints, events, runs, tasks, waits
from absurd_sqla.testing import FakeClock
from tests.support import (
    AsyncBarrier,
    AsyncEvent,
    Order,
    async_app_for,
    async_concurrently,
    async_worker_task,
    run_async,
    run_states,
    task_state,
)

# -- helpers -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def clock_for(app: AsyncAbsurd) -> AsyncIterator[FakeClock]:
    """A ``FakeClock`` on the client's engine, started at the database's time."""
    async with app.engine.connect() as conn:
        start = await conn.scalar(text("SELECT clock_timestamp()"))
    with FakeClock(app.engine, start) as clock:
        yield clock


async def drain(app: AsyncAbsurd, *, claim_timeout: float = 120) -> int:
    """Run due work until nothing is claimable; return the runs processed."""
    total = 0
    for _ in range(1000):
        claimed = await app.work_batch(claim_timeout=claim_timeout, batch_size=10)
        if claimed == 0:
            return total
        total += claimed
    raise AssertionError("still busy after 1000 batches")


async def sweep_expired(app: AsyncAbsurd) -> int:
    """What another worker's sweep does: fail runs whose lease ran out."""
    return await app._executor.sweep_expired(app.queue_name)


async def result_of(app: AsyncAbsurd, task_id: Any) -> Any:
    snapshot = await app.fetch_task_result(task_id)
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


def add_order(email: str, amount: int = 1) -> Callable[[AsyncSession], Awaitable[int]]:
    """A transaction step's function: insert one Order, return its id."""

    async def write(session: AsyncSession) -> int:
        order = Order(email=email, amount=amount)
        session.add(order)
        await session.flush()
        return order.id

    return write


def value(result: Any) -> Callable[[], Awaitable[Any]]:
    async def fn() -> Any:
        return result

    return fn


# -- steps and replay ------------------------------------------------------------------


@run_async  # async only
async def test_step_runs_once_and_replays_its_value(database_url: str, clean_db: Engine) -> None:
    calls: Counter[str] = Counter()

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("replay")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            async def charge() -> dict[str, int]:
                calls["charge"] += 1
                return {"charged": params["amount"]}

            async def poll(i: int) -> int:
                calls[f"poll{i}"] += 1
                return i * 10

            first = await ctx.step("charge", charge)
            polls = [await ctx.step("poll", lambda i=i: poll(i)) for i in range(3)]  # type: ignore[misc]
            await ctx.sleep_for("pause", 60)
            calls["after-sleep"] += 1
            return {"first": first, "polls": polls}

        spawned = await app.spawn("replay", {"amount": 7})
        assert await drain(app) == 1
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        clock.advance(61)
        assert await drain(app) == 1  # replays charge and the polls from their checkpoints
        snapshot = await result_of(app, spawned.task_id)
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


@run_async  # async only
async def test_raising_step_stores_nothing_and_a_non_json_value_fails(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("bad-steps", max_attempts=1)
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            async def boom() -> int:
                return 1 // 0

            with contextlib.suppress(ZeroDivisionError):
                await ctx.step("raises", boom)
            return await ctx.step("not-json", value(object()))

        spawned = await app.spawn("bad-steps", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert checkpoint_states(clean_db, spawned.task_id) == {}
    assert snapshot.state == "failed" and snapshot.failure is not None
    assert snapshot.failure["name"] == NotSerializable.__name__
    assert "not-json" in snapshot.failure["message"]


@run_async  # async only
async def test_run_step_forms_and_begin_complete_step(database_url: str, clean_db: Engine) -> None:
    seen: list[Any] = []
    calls: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("forms")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            step = ctx.run_step

            @step
            async def bare() -> int:
                calls.append("bare")
                return 1

            @step()
            async def called() -> int:
                calls.append("called")
                return 2

            @step("named")
            async def anything() -> int:
                calls.append("named")
                return 3

            values = [await bare, await called, await anything]
            handle = await ctx.begin_step("manual")
            seen.append((handle.done, handle.state, handle.checkpoint_name))
            manual = handle.state if handle.done else await ctx.complete_step(handle, {"m": 4})
            # complete_step on a done handle returns the stored value, storing nothing
            again = await ctx.complete_step(await ctx.begin_step("manual"), {"m": "ignored"})
            await ctx.sleep_for("nap", 1)
            return [*values, manual, again]

        spawned = await app.spawn("forms", {})
        await drain(app)
        clock.advance(2)
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.result == [1, 2, 3, {"m": 4}, {"m": "ignored"}]
    assert calls == ["bare", "called", "named"]  # the replay called none of them
    assert seen == [(False, None, "manual"), (True, {"m": 4}, "manual")]
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert set(stored) == {"bare", "called", "named", "manual", "manual#2", "nap"}
    assert stored["manual"] == {"m": 4} and stored["manual#2"] == {"m": "ignored"}


# -- transaction_step --------------------------------------------------------------------


@run_async  # async only
async def test_transaction_step_commits_orm_writes_with_its_checkpoint(
    database_url: str, clean_db: Engine
) -> None:
    calls: list[int] = []
    sessions: list[Any] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("write-order")
        async def handler(params: Any, ctx: AsyncTaskContext) -> int:
            async def write(session: AsyncSession) -> int:
                calls.append(ctx.attempt)
                sessions.append(session)
                assert session.in_transaction()
                return await add_order("t@example.com", params["amount"])(session)

            order_id = await ctx.transaction_step("insert-order", write)
            await ctx.sleep_for("then", 10)  # the replay must not write again
            return order_id

        spawned = await app.spawn("write-order", {"amount": 3})
        await drain(app)
        assert count_orders(clean_db) == 1
        clock.advance(11)
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert isinstance(sessions[0], AsyncSession)
    assert calls == [1]
    with clean_db.connect() as conn:
        (order,) = conn.execute(select(Order.__table__)).all()
    assert (order.email, order.amount) == ("t@example.com", 3)
    assert snapshot.state == "completed" and snapshot.result == order.id
    assert checkpoint_states(clean_db, spawned.task_id)["insert-order"] == order.id


@run_async  # async only
async def test_transaction_step_is_exactly_once_when_fenced_mid_transaction(
    database_url: str, clean_db: Engine
) -> None:
    """Lease lost between the business write and the commit: the write rolls back,
    and the retry writes it once."""
    attempts: list[int] = []
    signals: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("fenced")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            async def write(session: AsyncSession) -> str:
                attempts.append(ctx.attempt)
                await add_order("once@example.com")(session)
                if ctx.attempt == 1:
                    clock.advance(11)  # the lease is gone ...
                    assert await sweep_expired(app) == 1  # ... and another worker noticed
                return "written"

            try:
                return await ctx.transaction_step("charge", write)
            except BaseException as exc:
                signals.append(type(exc).__name__)
                raise

        spawned = await app.spawn("fenced", {})
        assert await app.work_batch(claim_timeout=10) == 1
        assert signals == ["LeaseLost"]
        assert count_orders(clean_db) == 0  # rolled back with the refused checkpoint
        assert checkpoint_states(clean_db, spawned.task_id) == {}
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert count_orders(clean_db) == 1
    assert attempts == [1, 2]
    assert snapshot.state == "completed" and snapshot.result == "written"
    assert [(r.attempt, r.state) for r in runs_of(clean_db, spawned.task_id)] == [
        (1, "failed"),
        (2, "completed"),
    ]


@run_async  # async only
async def test_transaction_step_refused_after_cancel_rolls_back(
    database_url: str, clean_db: Engine
) -> None:
    signals: list[str] = []
    after: list[str] = []

    async with async_app_for(database_url) as app:

        @app.register_task("cancelled-write")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            async def write(session: AsyncSession) -> str:
                await add_order("no@example.com", 9)(session)
                assert await app.cancel_task(ctx.task_id) is True  # wins: fn holds no run lock
                return "nope"

            try:
                await ctx.transaction_step("write", write)
            except Exception:  # the signal is not an Exception
                after.append("swallowed")
            except BaseException as exc:
                signals.append(type(exc).__name__)
                raise
            after.append("went on")
            return "done"

        spawned = await app.spawn("cancelled-write", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert (signals, after) == (["CancelledTask"], [])
    assert count_orders(clean_db) == 0
    assert checkpoint_states(clean_db, spawned.task_id) == {}
    assert snapshot.state == "cancelled"


@run_async  # async only
async def test_transaction_step_function_raising_rolls_back_and_retries_once(
    database_url: str, clean_db: Engine
) -> None:
    """fn fails after its write (a crash inside the transaction): nothing is left,
    the retry writes once; a repeated name is checkpointed as ``name#2``."""

    async with async_app_for(database_url) as app:

        @app.register_task("crashy")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            async def write(session: AsyncSession) -> int:
                order_id = await add_order("crash@example.com", 2)(session)
                if ctx.attempt == 1:
                    raise RuntimeError("died mid-transaction")
                return order_id

            async def second(session: AsyncSession) -> str:
                return "second-step-same-name"

            first = await ctx.transaction_step("write", write)
            return [first, await ctx.transaction_step("write", second)]

        spawned = await app.spawn("crashy", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert count_orders(clean_db) == 1
    stored = checkpoint_states(clean_db, spawned.task_id)
    assert stored == {"write": snapshot.result[0], "write#2": "second-step-same-name"}
    assert [r.state for r in runs_of(clean_db, spawned.task_id)] == ["failed", "completed"]


@run_async  # async only
async def test_transaction_step_commit_inside_fn_fails_the_step(
    database_url: str, clean_db: Engine
) -> None:
    """Documented misuse: committing inside fn commits the writes early, without
    the checkpoint, and then fails the step."""
    async with async_app_for(database_url) as app:

        @app.register_task("commits", max_attempts=1)
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            async def write(session: AsyncSession) -> str:
                await add_order("early@example.com")(session)
                await session.commit()
                return "committed early"

            return await ctx.transaction_step("write", write)

        spawned = await app.spawn("commits", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "failed"
    assert count_orders(clean_db) == 1  # committed early, by the user
    assert checkpoint_states(clean_db, spawned.task_id) == {}


@run_async  # async only
async def test_transaction_step_non_json_value_rolls_back_and_fails(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("bad-value", max_attempts=1)
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            async def write(session: AsyncSession) -> Any:
                await add_order("bad@example.com")(session)
                return {1, 2}

            return await ctx.transaction_step("write", write)

        spawned = await app.spawn("bad-value", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "failed" and snapshot.failure is not None
    assert snapshot.failure["name"] == NotSerializable.__name__
    assert count_orders(clean_db) == 0
    assert checkpoint_states(clean_db, spawned.task_id) == {}


CRASH_SCRIPT = """
import signal, sys
sys.path.append(sys.argv[3])
from sqlalchemy import create_engine, text
from absurd_sqla import AsyncAbsurd
from tests.support import Order
from tests.support import run_async  # async only

url, mode = sys.argv[1], sys.argv[2]
effects = create_engine(url)


def record(step):
    with effects.begin() as conn:
        conn.execute(text("INSERT INTO tx_crash_effects (step) VALUES (:s)"), {"s": step})


@run_async  # async only
async def main():
    app = AsyncAbsurd(url)

    @app.register_task("crashy")
    async def crashy(params, ctx):
        async def write(session):
            session.add(Order(email="crash@example.com", amount=1))
            await session.flush()
            if mode == "before-commit":
                record("in-transaction")
                signal.pause()  # killed here, its transaction open
            return "written"

        await ctx.transaction_step("write", write)
        record("committed")
        signal.pause()  # killed here, after the commit

    await app.work_batch(claim_timeout=60)


main()
"""


def crash_effects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT step FROM tx_crash_effects ORDER BY id")))


@pytest.mark.parametrize(
    ("mode", "marker", "redone"),
    [("before-commit", "in-transaction", ["write"]), ("after-commit", "committed", [])],
)
@run_async  # async only
async def test_sigkilled_worker_transaction_step_is_exactly_once(
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

    async with async_app_for(database_url) as app:
        spawned = await app.spawn("crashy", {})
        worker = subprocess.Popen([sys.executable, str(script), database_url, mode, root])
        try:
            deadline = time.monotonic() + 30
            while marker not in crash_effects(clean_db):  # wait on a condition
                assert worker.poll() is None, "the worker exited early"
                assert time.monotonic() < deadline, f"the worker never reached {marker!r}"
                await async_sleep(0.01)  # polls the condition above
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        assert count_orders(clean_db) == (1 if mode == "after-commit" else 0)

        @app.register_task("crashy")
        async def crashy(params: Any, ctx: AsyncTaskContext) -> str:
            async def write(session: AsyncSession) -> str:
                calls.append("write")
                await add_order("crash@example.com")(session)
                return "rewritten"

            return await ctx.transaction_step("write", write)

        async with clock_for(app) as clock:
            clock.advance(61)  # the dead worker's 60 s lease runs out
            assert await sweep_expired(app) == 1
            await drain(app)
        snapshot = await result_of(app, spawned.task_id)
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


async def begin_and_complete(ctx: AsyncTaskContext, name: str) -> Any:
    return await ctx.complete_step(await ctx.begin_step(name), 1)


def _fenced_op(name: str) -> Callable[[AsyncTaskContext], Awaitable[Any]]:
    async def tx(session: AsyncSession) -> int:
        session.add(Order(email="fenced@example.com", amount=1))
        return 1

    ops: dict[str, Callable[[AsyncTaskContext], Awaitable[Any]]] = {
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
@run_async  # async only
async def test_a_worker_with_an_expired_lease_commits_nothing(
    database_url: str, clean_db: Engine, op: str
) -> None:
    raised: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("fenced", max_attempts=3)
        async def fenced(params: Any, ctx: AsyncTaskContext) -> Any:
            clock.advance(121)  # past the 120 s lease; nobody has swept yet
            try:
                await _fenced_op(op)(ctx)
            except LeaseLost:
                raised.append("LeaseLost")
                raise
            return "not fenced"

        spawned = await app.spawn("fenced", {})
        await app.work_batch(claim_timeout=120)
        assert raised == ["LeaseLost"]
        assert run_states(clean_db, spawned.task_id) == ["running"]  # left for the sweep
        assert checkpoint_states(clean_db, spawned.task_id) == {}
        assert count_orders(clean_db) == 0
        assert count_rows(clean_db, tasks) == 1
        assert count_rows(clean_db, events) == 0
        assert count_rows(clean_db, waits) == 0
        assert await sweep_expired(app) == 1
    assert run_states(clean_db, spawned.task_id) == ["failed", "pending"]


@run_async  # async only
async def test_heartbeat_and_checkpoints_extend_the_lease(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("beating")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            for _ in range(3):
                clock.advance(8)
                await ctx.heartbeat()
            clock.advance(8)
            await ctx.step("s", value(1))
            clock.advance(8)
            await ctx.heartbeat(30)
            clock.advance(25)
            return "alive"

        spawned = await app.spawn("beating", {})
        assert await app.work_batch(claim_timeout=10) == 1
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "alive"
    assert run_states(clean_db, spawned.task_id) == ["completed"]


@run_async  # async only
async def test_heartbeat_after_cancel_raises_cancelled_task(
    database_url: str, clean_db: Engine
) -> None:
    reached: list[str] = []

    async with async_app_for(database_url) as app:

        @app.register_task("long")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            await ctx.heartbeat()
            await app.cancel_task(ctx.task_id)
            try:
                await ctx.heartbeat()
            except CancelledTask:
                reached.append("CancelledTask")
                raise
            reached.append("after")
            return "finished"

        spawned = await app.spawn("long", {})
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert reached == ["CancelledTask"]
    assert snapshot.state == "cancelled"


# -- sleeping ----------------------------------------------------------------------------


@run_async  # async only
async def test_sleep_until_and_sleep_for_checkpoint_the_wake_time(
    database_url: str, clean_db: Engine
) -> None:
    entries: list[int] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:
        wake = clock.now() + timedelta(hours=5)

        @app.register_task("alarm")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            entries.append(1)
            await ctx.sleep_until("alarm", wake)
            await ctx.sleep_for("short", 30)
            return "rang"

        spawned = await app.spawn("alarm", {})
        await drain(app)
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.state == "sleeping" and run.available_at == wake
        clock.set(wake - timedelta(seconds=1))
        assert await drain(app) == 0  # not due yet
        clock.set(wake)
        assert await drain(app) == 1  # wakes, replays "alarm" (no sleep), sleeps 30 s
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.state == "sleeping" and run.available_at == wake + timedelta(seconds=30)
        stored = checkpoint_states(clean_db, spawned.task_id)
        assert set(stored) == {"alarm", "short"}
        assert datetime.fromisoformat(stored["alarm"]) == wake
        clock.advance(30)
        assert await drain(app) == 1
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "rang"
    assert len(entries) == 3


@run_async  # async only
async def test_sleep_in_the_past_does_not_suspend(database_url: str, clean_db: Engine) -> None:
    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("past")
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            await ctx.sleep_until("then", clock.now() - timedelta(seconds=1))
            await ctx.sleep_for("zero", 0)
            return "done"

        spawned = await app.spawn("past", {})
        assert await drain(app) == 1
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.result == "done"


# -- events ------------------------------------------------------------------------------


@run_async  # async only
async def test_event_emitted_before_the_await_is_delivered(
    database_url: str, clean_db: Engine
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("early")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            return await ctx.await_event("ready")

        assert await app.emit_event("ready", {"n": 1}) is True
        spawned = await app.spawn("early", {})
        assert await drain(app) == 1
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == {"n": 1}
    assert checkpoint_states(clean_db, spawned.task_id) == {"$await:ready": {"payload": {"n": 1}}}


@run_async  # async only
async def test_await_suspends_and_an_emit_wakes_it_with_the_payload(
    database_url: str, clean_db: Engine
) -> None:
    entered: list[int] = []

    async with async_app_for(database_url) as app:

        @app.register_task("waiter")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            entered.append(1)
            return await ctx.await_event("go", step_name="wait-go")

        spawned = await app.spawn("waiter", {})
        await drain(app)
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        with clean_db.connect() as conn:
            wait = conn.execute(select(waits)).one()
        assert (wait.event_name, wait.step_name, wait.timeout_at) == ("go", "wait-go", None)
        assert await drain(app) == 0  # nothing to do until the event
        assert await app.emit_event("go", {"v": 5}) is True
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == {"v": 5}
    assert len(entered) == 2
    assert count_rows(clean_db, waits) == 0


@run_async  # async only
async def test_await_timeout_is_checkpointed_and_replays_as_timeout(
    database_url: str, clean_db: Engine
) -> None:
    outcomes: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("patient")
        async def handler(params: Any, ctx: AsyncTaskContext) -> Any:
            try:
                await ctx.await_event("never", timeout=1.5)
                outcomes.append("payload")
            except TimeoutError:
                outcomes.append("timeout")
            await ctx.sleep_for("after", 10)
            return outcomes[-1]

        spawned = await app.spawn("patient", {})
        await drain(app)
        (run,) = runs_of(clean_db, spawned.task_id)
        assert run.available_at == clock.now() + timedelta(seconds=1.5)  # a float timeout
        clock.advance(1.5)
        await drain(app)  # the timeout fires, is checkpointed, then the task sleeps
        assert outcomes == ["timeout"]
        assert checkpoint_states(clean_db, spawned.task_id)["$await:never"] == {"timeout": True}
        # The event arrives late: the replay must raise again, not wait or return it.
        await app.emit_event("never", {"late": True})
        clock.advance(10)
        assert await drain(app) == 1
        snapshot = await result_of(app, spawned.task_id)
    assert outcomes == ["timeout", "timeout"]
    assert snapshot.state == "completed" and snapshot.result == "timeout"


@run_async  # async only
async def test_emit_event_from_a_task_wakes_a_waiting_task(
    database_url: str, clean_db: Engine
) -> None:
    emitted: list[bool] = []

    async with async_app_for(database_url) as app:

        @app.register_task("listener")
        async def listener(params: Any, ctx: AsyncTaskContext) -> Any:
            return await ctx.await_event("ping")

        @app.register_task("emitter")
        async def emitter(params: Any, ctx: AsyncTaskContext) -> str:
            emitted.append(await ctx.emit_event("ping", {"from": str(ctx.task_id)}))
            emitted.append(await ctx.emit_event("ping", "second"))  # the first emit wins
            return "sent"

        waiting = await app.spawn("listener", {})
        await drain(app)
        assert task_state(clean_db, waiting.task_id) == "sleeping"
        sender = await app.spawn("emitter", {})
        await drain(app)
        snapshot = await result_of(app, waiting.task_id)
    assert emitted == [True, False]
    assert snapshot.state == "completed"
    assert snapshot.result == {"from": str(sender.task_id)}


# -- child tasks -------------------------------------------------------------------------


@run_async  # async only
async def test_spawn_a_child_and_await_its_result(database_url: str, clean_db: Engine) -> None:
    parent_entries: list[int] = []
    child_headers: list[dict[str, Any]] = []

    async with async_app_for(database_url) as app:

        @app.register_task("double")
        async def double(params: Any, ctx: AsyncTaskContext) -> int:
            child_headers.append(dict(ctx.headers))
            return int(params["n"]) * 2

        @app.register_task("parent")
        async def parent(params: Any, ctx: AsyncTaskContext) -> Any:
            parent_entries.append(1)
            child = await ctx.spawn("double", {"n": 21})
            snapshot = await ctx.await_task_result(child.task_id)
            return {"child": str(child.task_id), "state": snapshot.state, "value": snapshot.result}

        spawned = await app.spawn("parent", {})
        assert await app.work_batch(batch_size=1) == 1  # the parent spawns, then suspends
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        assert count_rows(clean_db, tasks) == 2
        await drain(app)  # the child completes and wakes the parent, which finishes
        snapshot = await result_of(app, spawned.task_id)
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


@run_async  # async only
async def test_await_task_result_timeout_is_checkpointed(
    database_url: str, clean_db: Engine
) -> None:
    outcomes: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("slow-child")
        async def slow_child(params: Any, ctx: AsyncTaskContext) -> str:
            await ctx.sleep_for("long", 3600)
            return "late"

        @app.register_task("impatient")
        async def impatient(params: Any, ctx: AsyncTaskContext) -> str:
            child = await ctx.spawn("slow-child", {})
            try:
                await ctx.await_task_result(child.task_id, timeout=0.5)
                outcomes.append("result")
            except TimeoutError:
                outcomes.append("timeout")
            await ctx.sleep_for("after", 10)
            return outcomes[-1]

        spawned = await app.spawn("impatient", {})
        await drain(app)  # the parent waits, the child sleeps
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        clock.advance(0.5)
        await drain(app)
        assert outcomes == ["timeout"]
        clock.advance(3600)  # the child finishes now: the replay must still time out
        await drain(app)
        snapshot = await result_of(app, spawned.task_id)
    assert outcomes == ["timeout", "timeout"]
    assert snapshot.state == "completed" and snapshot.result == "timeout"


# -- identity, failure and retries ----------------------------------------------------------


@run_async  # async only
async def test_identity_headers_and_attempt_after_a_failure(
    database_url: str, clean_db: Engine
) -> None:
    seen: list[tuple[Any, ...]] = []

    async with async_app_for(database_url) as app:

        @app.register_task("flaky", max_attempts=2)
        async def flaky(params: Any, ctx: AsyncTaskContext) -> str:
            seen.append((ctx.task_id, ctx.run_id, ctx.attempt, dict(ctx.headers)))
            with pytest.raises(TypeError):
                ctx.headers["trace"] = "changed"  # type: ignore[index]
            if ctx.attempt == 1:
                raise RuntimeError("first try fails")
            return "second try"

        spawned = await app.spawn("flaky", {}, headers={"trace": "abc"})
        assert await drain(app) == 2  # the failure is retried at once
        snapshot = await result_of(app, spawned.task_id)
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


@run_async  # async only
async def test_control_flow_signals_are_not_swallowed_by_except_exception(
    database_url: str, clean_db: Engine
) -> None:
    swallowed: list[str] = []

    async with async_app_for(database_url) as app:

        @app.register_task("sleepy")
        async def sleepy(params: Any, ctx: AsyncTaskContext) -> str:
            try:
                await ctx.sleep_for("nap", 3600)
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "woke too early"

        @app.register_task("waiting")
        async def waiting(params: Any, ctx: AsyncTaskContext) -> str:
            try:
                await ctx.await_event("never")
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "no event"

        @app.register_task("cancelled")
        async def cancelled(params: Any, ctx: AsyncTaskContext) -> str:
            await app.cancel_task(ctx.task_id)
            try:
                await ctx.step("after-cancel", value(1))
            except Exception as exc:
                swallowed.append(type(exc).__name__)
            return "went on"

        ids = {name: (await app.spawn(name, {})).task_id for name in ("sleepy", "waiting")}
        ids["cancelled"] = (await app.spawn("cancelled", {})).task_id
        assert await drain(app) == 3
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


@run_async  # async only
async def test_current_context_is_the_handlers_inside_and_none_outside(
    database_url: str, clean_db: Engine
) -> None:
    seen: list[bool] = []

    async with async_app_for(database_url) as app:

        @app.register_task("who")
        async def who(params: Any, ctx: AsyncTaskContext) -> str:
            seen.append(get_current_context() is ctx)
            await ctx.step("a-round-trip", value(1))
            seen.append(get_current_context() is ctx)
            return helper_deep_inside()

        @app.register_task("fails", max_attempts=1)
        async def fails(params: Any, ctx: AsyncTaskContext) -> None:
            raise RuntimeError("boom")

        @app.register_task("sleeps")
        async def sleeps(params: Any, ctx: AsyncTaskContext) -> None:
            await ctx.sleep_for("nap", 3600)

        assert get_current_context() is None
        spawned = await app.spawn("who", {})
        await drain(app)
        assert get_current_context() is None  # reset after the handler
        await app.spawn("fails", {})
        await app.spawn("sleeps", {})
        assert await drain(app) == 2
        assert get_current_context() is None  # also after a failing or suspending one
        snapshot = await result_of(app, spawned.task_id)
    assert seen == [True, True]
    assert snapshot.result == str(spawned.task_id)


@run_async  # async only
async def test_concurrent_handlers_each_see_their_own_context(
    database_url: str, clean_db: Engine
) -> None:
    """Two handlers in flight at once (two tasks on one event loop, or two
    threads): each waits for the other to be in, and each still sees itself."""
    both_in = AsyncBarrier(2)
    results: dict[str, Any] = {}

    async with async_app_for(database_url) as app:

        @app.register_task("pair")
        async def pair(params: Any, ctx: AsyncTaskContext) -> str:
            before = get_current_context() is ctx
            await both_in.wait()  # the other handler runs now
            await ctx.step("round-trip", value(params["name"]))
            current = get_current_context()
            results[params["name"]] = (before, current is ctx, helper_deep_inside())
            return str(params["name"])

        a = await app.spawn("pair", {"name": "a"})
        b = await app.spawn("pair", {"name": "b"})
        claimed = await async_concurrently(
            lambda: app.work_batch("w1"), lambda: app.work_batch("w2")
        )
        assert sorted(claimed) == [1, 1]
    assert results == {"a": (True, True, str(a.task_id)), "b": (True, True, str(b.task_id))}
    assert get_current_context() is None


@run_async  # async only
async def test_concurrent_handlers_in_the_worker_see_their_own_context(
    database_url: str, clean_db: Engine
) -> None:
    both_in = AsyncBarrier(2)
    results: dict[str, Any] = {}
    done = AsyncEvent()

    async with async_app_for(database_url) as app:

        @app.register_task("pair")
        async def pair(params: Any, ctx: AsyncTaskContext) -> None:
            await both_in.wait()
            await ctx.heartbeat()
            results[params["name"]] = get_current_context() is ctx and helper_deep_inside()
            if len(results) == 2:
                done.set()

        a = await app.spawn("pair", {"name": "a"})
        b = await app.spawn("pair", {"name": "b"})
        async with async_worker_task(app, concurrency=2, poll_interval=0.05):
            await done.wait()
    assert results == {"a": str(a.task_id), "b": str(b.task_id)}


# -- max_duration --------------------------------------------------------------------------


LIMIT = 60  # seconds of max_duration in these tests


@pytest.mark.parametrize("checkpoint", ["step", "complete_step", "transaction_step", "heartbeat"])
@run_async  # async only
async def test_max_duration_is_enforced_at_a_checkpoint(
    database_url: str, clean_db: Engine, checkpoint: str
) -> None:
    reached: list[str] = []
    raised: list[str] = []

    async with async_app_for(database_url) as app, clock_for(app) as clock:

        async def write(session: AsyncSession) -> str:
            session.add(Order(email="late@example.com", amount=1))
            return "written"

        calls: dict[str, Callable[[AsyncTaskContext], Awaitable[Any]]] = {
            "step": lambda ctx: ctx.step("a", value(1)),
            "complete_step": lambda ctx: begin_and_complete(ctx, "a"),
            "transaction_step": lambda ctx: ctx.transaction_step("a", write),
            "heartbeat": lambda ctx: ctx.heartbeat(),
        }

        @app.register_task("bounded", max_attempts=1)
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            await ctx.step("in-time", value(0))
            clock.advance(LIMIT + 1)
            try:
                await calls[checkpoint](ctx)
            except CancelledTask:
                raised.append("CancelledTask")
                raise
            reached.append("after")
            return "too late"

        spawned = await app.spawn("bounded", {}, cancellation={"max_duration": LIMIT})
        assert await app.work_batch() == 1
        snapshot = await result_of(app, spawned.task_id)
    assert (raised, reached) == (["CancelledTask"], [])
    assert snapshot.state == "cancelled" and snapshot.result is None
    assert run_states(clean_db, spawned.task_id) == ["cancelled"]
    if checkpoint == "transaction_step":  # its writes and checkpoint stay together
        stored = checkpoint_states(clean_db, spawned.task_id)
        assert (count_orders(clean_db), "a" in stored) in ((0, False), (1, True))


@run_async  # async only
async def test_within_max_duration_nothing_is_cancelled(
    database_url: str, clean_db: Engine
) -> None:
    """The control for the test above: the same calls just inside the limit."""
    async with async_app_for(database_url) as app, clock_for(app) as clock:

        @app.register_task("prompt", max_attempts=1)
        async def handler(params: Any, ctx: AsyncTaskContext) -> str:
            clock.advance(LIMIT / 2)
            await ctx.heartbeat()
            clock.advance(LIMIT / 2 - 1)
            await ctx.transaction_step("write", add_order("ok@example.com", 2))
            await ctx.step("a", value(1))
            await ctx.heartbeat()
            return "finished"

        spawned = await app.spawn("prompt", {}, cancellation={"max_duration": LIMIT})
        assert await app.work_batch() == 1
        snapshot = await result_of(app, spawned.task_id)
    assert snapshot.state == "completed" and snapshot.result == "finished"
    assert count_orders(clean_db) == 1
