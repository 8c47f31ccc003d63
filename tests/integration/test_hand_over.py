"""A worker slot whose run completes claims its next run in the same statement
(``complete_and_claim``), for the thread worker and the asyncio one: the
completion records what it claimed, claims nothing when the run is no longer
ours, a stopping worker claims nothing more that way and hands back what such
a statement claimed as the stop arrived (waiting for it when stopping now),
and a claimed run whose thread cannot start is handed back. A lost answer is
in test_connection_errors.py."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, cast, select
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.orm import Session

from absurd_sqla import Absurd, _wire
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._execute import Executor
from absurd_sqla._execute_async import AsyncExecutor
from absurd_sqla.models import runs, tasks
from absurd_sqla.testing import FakeClock
from absurd_sqla.worker import Worker
from tests.support import (
    DEADLINE,
    async_app_for,
    count_tasks,
    run_async,
    run_async_worker_until,
    run_states,
    task_state,
    wait_for_lock_waiters,
    wait_until,
    worker_thread,
)

NAMES = {"claim": sqlw.claim, "complete_and_claim": sqlw.complete_and_claim}


def sql_of(statement: Any, engine: Any) -> str:
    prepared = _wire.prepared(statement, engine)
    assert prepared is not None
    return prepared.sql


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Counter[str]]:
    """``claims(engine)``: runs claimed so far, by the statement that claimed
    them (a plain claim, or a completion that claimed its slot's next run)."""
    seen: list[tuple[str, int]] = []
    rows = _wire.Prepared.rows

    def counting(self: _wire.Prepared, cursor: Any, fetched: Any) -> Any:
        result = rows(self, cursor, fetched)
        seen.append((self.sql, sum(1 for row in result if getattr(row, "run_id", None))))
        return result

    monkeypatch.setattr(_wire.Prepared, "rows", counting)

    def count(engine: Any) -> Counter[str]:
        by_sql = {sql_of(statement, engine): name for name, statement in NAMES.items()}
        counts: Counter[str] = Counter()
        for sql, claimed in seen:
            if sql in by_sql:
                counts[by_sql[sql]] += claimed
        return counts

    return count


def three_steps(params: Any, ctx: Any) -> int:
    a = ctx.step("one", lambda: 1)
    return int(ctx.step("two", lambda: a + 1))


async def three_steps_async(params: Any, ctx: Any) -> int:
    async def one() -> int:
        return 1

    return int(await ctx.step("one", one))


def claimed_ever(engine: Engine, task_id: Any) -> bool:
    with engine.connect() as conn:
        started = conn.scalars(select(runs.c.started_at).where(runs.c.task_id == task_id)).all()
    return any(when is not None for when in started)


# -- the thread worker --------------------------------------------------------------


def test_a_completion_claims_the_slots_next_run(
    app: Absurd, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    app.register_task("t")(three_steps)
    for i in range(4):
        app.spawn("t", {"i": i})
    with worker_thread(app, concurrency=1, poll_interval=30):
        wait_until(lambda: count_tasks(clean_db, state="completed") == 4, "all four completed")
    # The loop claimed the first; each completion claimed the next.
    assert claims(app.engine) == Counter({"claim": 1, "complete_and_claim": 3})
    # Each completion recorded the run it claimed (for a worker whose answer
    # is lost); the last claimed none.
    with clean_db.connect() as conn:
        rows = conn.execute(
            select(runs.c.run_id, runs.c.handed_over).order_by(runs.c.started_at)
        ).all()
    assert [row.handed_over["run_id"] if row.handed_over else None for row in rows] == [
        *(str(row.run_id) for row in rows[1:]),
        None,
    ]
    assert all(row.handed_over["prev_started_at"] is None for row in rows[:-1])


def test_a_completion_that_is_not_ours_claims_nothing(
    app: Absurd, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    """The run was cancelled under its handler: its completion changes nothing,
    and claims nothing either (the loop claims the next run)."""

    @app.register_task("cancelled")
    def cancelled(params: Any, ctx: Any) -> str:
        app.cancel_task(ctx.task_id)
        return "discarded"

    app.register_task("t")(three_steps)
    first = app.spawn("cancelled")
    second = app.spawn("t", {})
    with worker_thread(app, concurrency=1, poll_interval=30):
        wait_until(lambda: task_state(clean_db, second.task_id) == "completed", "the second ran")
    assert task_state(clean_db, first.task_id) == "cancelled"
    assert claims(app.engine) == Counter({"claim": 2})


def test_a_stopping_worker_claims_nothing_with_a_completion(
    app: Absurd, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    @app.register_task("stopper")
    def stopper(params: Any, ctx: Any) -> str:
        app.stop_worker()  # a graceful stop, before this run completes
        return "done"

    first = app.spawn("stopper")
    second = app.spawn("stopper")
    with worker_thread(app, concurrency=1, poll_interval=30) as thread:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert task_state(clean_db, first.task_id) == "completed"
    assert task_state(clean_db, second.task_id) == "pending"
    assert not claimed_ever(clean_db, second.task_id)
    assert claims(app.engine)["complete_and_claim"] == 0


def test_a_run_claimed_as_the_stop_arrived_is_handed_back(
    app: Absurd, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []

    @app.register_task("t")
    def handler(params: Any, ctx: Any) -> str:
        ran.append(params["name"])
        return "done"

    complete_and_claim = Executor._complete_and_claim

    def stop_meanwhile(self: Executor, *args: Any) -> Any:
        answer = complete_and_claim(self, *args)
        app.stop_worker()  # the stop lands while the statement claimed the next run
        return answer

    monkeypatch.setattr(Executor, "_complete_and_claim", stop_meanwhile)
    app.spawn("t", {"name": "first"})
    second = app.spawn("t", {"name": "second"})
    with worker_thread(app, concurrency=1, poll_interval=30) as thread:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert ran == ["first"]  # the second's handler never started ...
    assert task_state(clean_db, second.task_id) == "pending"  # ... and it is claimable again
    with clean_db.connect() as conn:
        attempts = conn.scalars(select(runs.c.attempt).where(runs.c.task_id == second.task_id))
        assert list(attempts) == [1]  # no attempt used


def test_a_completion_waiting_for_a_cancel_claims_nothing(
    app: Absurd, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    """A cancel holds the completing run's row when the completion comes, and
    commits while the completion waits for it: the completion reads the
    cancelled run, so it completes nothing and claims nothing either (a claim
    then would be recorded nowhere, and lost with a lost answer)."""
    holders: list[Connection] = []
    ready = threading.Event()

    @app.register_task("held")
    def held(params: Any, ctx: Any) -> str:
        holder = clean_db.connect()
        holders.append(holder)
        holder.execute(select(runs.c.run_id).where(runs.c.run_id == ctx.run_id).with_for_update())
        ready.set()
        return "discarded"

    app.register_task("t")(three_steps)
    first = app.spawn("held")
    second = app.spawn("t", {})
    try:
        with worker_thread(app, concurrency=1, poll_interval=30):
            assert ready.wait(DEADLINE)
            wait_for_lock_waiters(clean_db, 1)  # the completion waits for the holder
            app.cancel_task(first.task_id, session=Session(bind=holders[0]))
            holders[0].commit()
            wait_until(lambda: task_state(clean_db, second.task_id) == "completed", "second ran")
    finally:
        for holder in holders:
            holder.close()
    assert task_state(clean_db, first.task_id) == "cancelled"
    assert claims(app.engine) == Counter({"claim": 2})


def test_the_record_keeps_what_the_claim_overwrote(app: Absurd, clean_db: Engine) -> None:
    """The run a completion claims had started before (it slept): the record
    keeps its earlier start, which handing it back restores."""

    started, go = threading.Event(), threading.Event()

    @app.register_task("sleeper")
    def sleeper(params: Any, ctx: Any) -> str:
        ctx.sleep_for("nap", 60)
        return "woke"

    @app.register_task("blocked")
    def blocked(params: Any, ctx: Any) -> str:
        started.set()
        assert go.wait(DEADLINE)
        return "done"

    with FakeClock(app.engine) as clock:
        sleeping = app.spawn("sleeper")
        plain = app.spawn("blocked")
        with worker_thread(app, concurrency=1, poll_interval=30):
            assert started.wait(DEADLINE)  # the sleeper slept, the loop claimed this one
            assert run_states(clean_db, sleeping.task_id) == ["sleeping"]
            clock.advance(61)  # the sleeper is due: this completion claims it
            go.set()
            wait_until(lambda: count_tasks(clean_db, state="completed") == 2, "both completed")
    with clean_db.connect() as conn:
        record = conn.execute(
            select(
                cast(runs.c.handed_over["prev_started_at"].astext, TIMESTAMP(timezone=True)),
                cast(runs.c.handed_over["prev_first_started_at"].astext, TIMESTAMP(timezone=True)),
                runs.c.handed_over["run_id"].astext,
            ).where(runs.c.task_id == plain.task_id)
        ).one()
        slept = conn.execute(
            select(runs.c.run_id, runs.c.started_at).where(runs.c.task_id == sleeping.task_id)
        ).one()
        first_started = conn.scalar(
            select(tasks.c.first_started_at).where(tasks.c.task_id == sleeping.task_id)
        )
    assert record[2] == str(slept.run_id)  # the sleeper's second claim came with a completion
    assert record[0] == slept.started_at is not None
    assert record[1] == first_started is not None


def test_stopping_now_waits_for_a_completion_that_claims(
    app: Absurd, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop-now as a slot's completion is about to claim its next run: the
    worker neither releases that slot's run (it is completing) nor returns
    before the slot has handed back the run it claimed (a process exiting
    then would leave that run to its lease)."""
    joined = threading.Event()

    class Watched(threading.Thread):
        def join(self, timeout: float | None = None) -> None:
            if self.name.startswith("absurd-task-"):
                joined.set()
            super().join(timeout)

    monkeypatch.setattr(threading, "Thread", Watched)
    app.register_task("t")(three_steps)
    complete_and_claim = Executor._complete_and_claim

    def stop_now_meanwhile(self: Executor, *args: Any) -> Any:
        app.stop_worker(now=True)
        # The worker has released what it releases, and waits for this slot.
        assert joined.wait(DEADLINE), "the stopping worker did not wait for this slot"
        return complete_and_claim(self, *args)

    monkeypatch.setattr(Executor, "_complete_and_claim", stop_now_meanwhile)
    first = app.spawn("t", {})
    second = app.spawn("t", {})
    with worker_thread(app, concurrency=1, poll_interval=30) as thread:
        thread.join(DEADLINE)
        assert not thread.is_alive()
        # Decided when start_worker returned, not later:
        assert run_states(clean_db, first.task_id) == ["completed"]  # not released
        assert task_state(clean_db, second.task_id) == "pending"  # handed back
    assert not claimed_ever(clean_db, second.task_id)


def test_a_claimed_run_whose_thread_cannot_start_is_handed_back(
    app: Absurd, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread to be had for the run a completion claimed: it is handed
    back unstarted (no attempt used) and the slot is free to claim it again,
    not left counted as busy forever."""
    failures: list[str] = []
    start = threading.Thread.start

    def start_once_failing(self: threading.Thread) -> None:
        # The thread for the run the first completion claimed.
        first_done = count_tasks(clean_db, state="completed") == 1
        if self.name.startswith("absurd-task-") and not failures and first_done:
            failures.append(self.name)
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    app.register_task("t")(three_steps)
    app.spawn("t", {})
    second = app.spawn("t", {})
    with worker_thread(app, concurrency=1, poll_interval=30):
        wait_until(lambda: task_state(clean_db, second.task_id) == "completed", "the second ran")
    assert failures, "no thread start failed"
    assert run_states(clean_db, second.task_id) == ["completed"]  # no attempt used


def test_a_run_handed_back_unstarted_never_starts(
    app: Absurd, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop-now lands after a completion claimed the next run but before that
    run's thread starts: the worker hands it back as never started (no attempt
    used), and the thread, starting afterwards, does not run its handler."""
    ran: list[str] = []

    @app.register_task("t")
    def t(params: Any, ctx: Any) -> str:
        ran.append(params["name"])
        return "ok"

    app.spawn("t", {"name": "first"})
    second = app.spawn("t", {"name": "second"})
    launch = Worker._launch

    def stop_now_first(self: Worker, thread: threading.Thread, run: Any) -> None:
        if threading.current_thread().name.startswith("absurd-task-"):  # from a take-over
            app.stop_worker(now=True)
            wait_until(lambda: task_state(clean_db, second.task_id) == "pending", "handed back")
        launch(self, thread, run)

    monkeypatch.setattr(Worker, "_launch", stop_now_first)
    with worker_thread(app, concurrency=1, poll_interval=30) as thread:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    for task_thread in threading.enumerate():  # the late thread has done what it does
        if task_thread.name.startswith("absurd-task-"):
            task_thread.join(DEADLINE)
    assert ran == ["first"]
    assert task_state(clean_db, second.task_id) == "pending"
    assert run_states(clean_db, second.task_id) == ["pending"]  # no attempt used


# -- the asyncio worker -------------------------------------------------------------


@run_async
async def test_an_async_completion_claims_the_slots_next_run(
    database_url: str, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    async with async_app_for(database_url) as app:
        app.register_task("t")(three_steps_async)
        for i in range(4):
            await app.spawn("t", {"i": i})
        await run_async_worker_until(
            app,
            lambda: count_tasks(clean_db, state="completed") == 4,
            "all four completed",
            concurrency=1,
            poll_interval=30,
        )
        assert claims(app.engine) == Counter({"claim": 1, "complete_and_claim": 3})


@run_async
async def test_an_async_stopping_worker_claims_nothing_with_a_completion(
    database_url: str, clean_db: Engine, claims: Callable[[Any], Counter[str]]
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("stopper")
        async def stopper(params: Any, ctx: Any) -> str:
            app.stop_worker()
            return "done"

        first = await app.spawn("stopper")
        second = await app.spawn("stopper")
        await asyncio.wait_for(app.start_worker(concurrency=1, poll_interval=30), DEADLINE)
        assert run_states(clean_db, first.task_id) == ["completed"]  # not released
        assert task_state(clean_db, second.task_id) == "pending"  # handed back
        assert not claimed_ever(clean_db, second.task_id)
        assert claims(app.engine)["complete_and_claim"] == 0


@run_async
async def test_an_async_run_claimed_as_the_stop_arrived_is_handed_back(
    database_url: str, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    async with async_app_for(database_url) as app:

        @app.register_task("t")
        async def handler(params: Any, ctx: Any) -> str:
            ran.append(params["name"])
            return "done"

        complete_and_claim = AsyncExecutor._complete_and_claim

        async def stop_meanwhile(self: AsyncExecutor, *args: Any) -> Any:
            answer = await complete_and_claim(self, *args)
            app.stop_worker()
            return answer

        monkeypatch.setattr(AsyncExecutor, "_complete_and_claim", stop_meanwhile)
        await app.spawn("t", {"name": "first"})
        second = await app.spawn("t", {"name": "second"})
        await asyncio.wait_for(app.start_worker(concurrency=1, poll_interval=30), DEADLINE)
        assert ran == ["first"]
        assert task_state(clean_db, second.task_id) == "pending"
        with clean_db.connect() as conn:
            attempts = conn.scalars(select(runs.c.attempt).where(runs.c.task_id == second.task_id))
            assert list(attempts) == [1]


@run_async
async def test_an_async_worker_stopping_now_waits_for_a_completion_that_claims(
    database_url: str, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop-now while a slot's completion claims its next run: that slot is
    not cancelled (the claimed run would be lost with the answer) but waited
    for, and it hands the claimed run back unstarted."""
    from absurd_sqla.worker_async import AsyncWorker

    releasing = asyncio.Event()
    release_unfinished = AsyncWorker._release_unfinished

    async def mark_releasing(self: AsyncWorker) -> None:
        releasing.set()
        await release_unfinished(self)

    monkeypatch.setattr(AsyncWorker, "_release_unfinished", mark_releasing)
    async with async_app_for(database_url) as app:
        app.register_task("t")(three_steps_async)
        complete_and_claim = AsyncExecutor._complete_and_claim

        async def stop_now_meanwhile(self: AsyncExecutor, *args: Any) -> Any:
            app.stop_worker(now=True)
            # The loop releases now; a cancellation of this slot would land
            # here. (Not under wait_for: on Python 3.11 it can swallow one.)
            await releasing.wait()
            return await complete_and_claim(self, *args)

        monkeypatch.setattr(AsyncExecutor, "_complete_and_claim", stop_now_meanwhile)
        first = await app.spawn("t", {})
        second = await app.spawn("t", {})
        await asyncio.wait_for(app.start_worker(concurrency=1, poll_interval=30), DEADLINE)
        assert run_states(clean_db, first.task_id) == ["completed"]  # not released
        assert task_state(clean_db, second.task_id) == "pending"  # handed back
        assert not claimed_ever(clean_db, second.task_id)
