"""The asyncio worker runtime (``AsyncAbsurd.start_worker``) against a real
PostgreSQL: slots refilled one by one, LISTEN/NOTIFY through psycopg's async
connection (reconnecting after it is killed), graceful and two-stage shutdown
(``stop_worker`` from a thread or a coroutine, cancelling the task, SIGTERM and
SIGINT in the main thread's loop, ``shutdown_timeout``), the lease watchdog
that cancels a handler whose run is no longer the worker's, and an outage.

No sleep stands in for a condition: coroutines synchronise on ``asyncio.Event``,
and database conditions are polled with a deadline (``eventually``). Every test
ends with no task of its loop and no thread of its own left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from absurd_sqla import AsyncAbsurd, Hooks, migrate, worker_async
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla.context_async import AsyncTaskContext
from tests.support import DEADLINE, async_app_for, run_async, task_state

APP_NAME = "absurd-async-worker-test"  # set through connect_args: proves the engine's are used


# -- helpers -----------------------------------------------------------------------


def async_test(test: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
    """``run_async``, and fail the test if it leaves a task of its loop running."""

    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> None:
        await test(*args, **kwargs)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == [], f"tasks left running: {left}"

    return run_async(checked)


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == [], f"threads left running: {left}"


async def eventually(condition: Callable[[], Any], message: str, timeout: float = DEADLINE) -> Any:
    """Poll ``condition`` (a quick probe) until truthy, yielding to the loop in
    between; fail the test with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(0.005)


async def within(awaitable: Awaitable[Any], message: str, timeout: float = DEADLINE) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s: {message}")


def start(app: AsyncAbsurd, **kwargs: Any) -> asyncio.Task[None]:
    return asyncio.create_task(app.start_worker(**kwargs), name="test-start-worker")


async def stop(app: AsyncAbsurd, worker: asyncio.Task[None]) -> None:
    """Stop the worker, however far it got, and wait for it (``stop_worker`` only
    reaches a worker that has registered, so it is repeated)."""
    deadline = time.monotonic() + DEADLINE
    while not worker.done() and time.monotonic() < deadline:
        app.stop_worker()
        await asyncio.wait([worker], timeout=0.05)
    assert worker.done(), "the worker did not stop"
    if not worker.cancelled():
        worker.result()  # raises what start_worker raised


@contextlib.asynccontextmanager
async def running_worker(app: AsyncAbsurd, **kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    worker = start(app, **kwargs)
    try:
        yield worker
    finally:
        await stop(app, worker)


@contextlib.asynccontextmanager
async def app_on_engine(database_url: str) -> AsyncIterator[AsyncAbsurd]:
    """An ``AsyncAbsurd`` on an ``AsyncEngine`` with ``connect_args`` of its own."""
    engine = create_async_engine(database_url, connect_args={"application_name": APP_NAME})
    app = AsyncAbsurd(engine)
    try:
        await app.create_queue()
        yield app
    finally:
        await app.close()


def stopping(app: AsyncAbsurd) -> bool:
    workers = app._workers.running()  # the client's live workers
    return bool(workers) and all(w.stopping for w in workers)


def attempts(engine: Engine, task_id: Any) -> list[tuple[int, str, str | None, bool]]:
    """(attempt, state, failure name, due now) of each run of the task."""
    with engine.connect() as conn:
        return [
            tuple(row)  # type: ignore[misc]
            for row in conn.execute(
                text(
                    "SELECT attempt, state, failure_reason->>'name', "
                    "available_at <= absurd.now() FROM absurd.runs WHERE task_id = :t "
                    "ORDER BY attempt"
                ),
                {"t": task_id},
            )
        ]


def listen_backends(engine: Engine) -> list[tuple[int, str]]:
    """(pid, application_name) of the sessions LISTENing in this database."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid, application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
            )
        )
        return [(row.pid, row.application_name) for row in rows]


class Blocking:
    """An async handler that waits until released, recording how it ended."""

    def __init__(self, app: AsyncAbsurd, name: str = "blocking", **options: Any) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.calls: list[int] = []

        @app.register_task(name, **options)
        async def blocking(params: Any, ctx: AsyncTaskContext) -> str:
            self.calls.append(ctx.attempt)
            if ctx.attempt > 1:
                return f"attempt {ctx.attempt}"
            self.started.set()
            try:
                await asyncio.wait_for(self.release.wait(), DEADLINE)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            await ctx.step("after", self.after)
            return "finished"

    async def after(self) -> int:
        return 1


@contextlib.contextmanager
def recorded_claims(app: AsyncAbsurd) -> Iterator[list[int]]:
    """The number of rows each claim of the app's default queue returned, in order."""
    claims: list[int] = []
    engine = app.engine.sync_engine

    def record(conn: Any, cursor: Any, stmt: Any, params: Any, context: Any, many: Any) -> None:
        compiled = getattr(context, "compiled", None)
        if compiled is not None and compiled.statement is sqlw.claim:
            claims.append(cursor.rowcount)

    event.listen(engine, "after_cursor_execute", record)
    try:
        yield claims
    finally:
        event.remove(engine, "after_cursor_execute", record)


# -- slots -------------------------------------------------------------------------


@async_test
async def test_a_slow_handler_never_holds_back_claims(clean_db: Engine, database_url: str) -> None:
    """concurrency=2, one slot held by a slow handler: the other slot is refilled
    the moment each fast task finishes, so all of them complete meanwhile."""
    async with async_app_for(database_url) as app:
        slow = Blocking(app, "slow")

        @app.register_task("fast")
        async def fast(params: Any, ctx: AsyncTaskContext) -> int:
            return int(params["i"])

        slow_spawn = await app.spawn("slow", {})
        async with running_worker(app, concurrency=2, poll_interval=0.05):
            await within(slow.started.wait(), "the slow handler started")
            spawned = [await app.spawn("fast", {"i": i}) for i in range(20)]
            for i, fast_spawn in enumerate(spawned):
                snapshot = await app.await_task_result(fast_spawn.task_id, timeout=DEADLINE)
                assert snapshot.result == i
            assert task_state(clean_db, slow_spawn.task_id) == "running"
            slow.release.set()
            snapshot = await app.await_task_result(slow_spawn.task_id, timeout=DEADLINE)
    assert snapshot.result == "finished"


# -- LISTEN / NOTIFY ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def idle_listening_worker(
    app: AsyncAbsurd, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[int]]:
    """A worker with ``poll_interval=30`` that is idle and LISTENing, and no lease
    sweep due for an hour: its next claim can only come from a notification.

    Yields its claims' row counts: ``[0, 0]`` at first (the first claim, and the
    one the listener triggers once connected, for anything committed before)."""
    monkeypatch.setattr(worker_async, "SWEEP_INTERVAL", 3600.0)
    with recorded_claims(app) as claims:
        async with running_worker(app, poll_interval=30):
            await eventually(
                lambda: len(claims) >= 2 and listen_backends(engine), "worker idle and listening"
            )
            assert claims == [0, 0]
            yield claims


@async_test
async def test_notify_wakes_an_idle_worker_without_waiting_for_a_poll(
    clean_db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("ping")
        async def ping(params: Any, ctx: AsyncTaskContext) -> str:
            return "pong"

        async with idle_listening_worker(app, clean_db, monkeypatch) as claims:
            spawned = await app.spawn("ping", {})
            snapshot = await app.await_task_result(spawned.task_id, timeout=5)
            assert claims[:3] == [0, 0, 1]  # the very next claim, woken by the NOTIFY
    assert snapshot.result == "pong"


@async_test
async def test_the_listener_uses_the_engine_and_reconnects_after_it_is_killed(
    clean_db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LISTEN session comes from the app's AsyncEngine (its connect_args
    apply); killed with pg_terminate_backend, it comes back and NOTIFY works again."""
    async with app_on_engine(database_url) as app:

        @app.register_task("ping")
        async def ping(params: Any, ctx: AsyncTaskContext) -> str:
            return "pong"

        async with idle_listening_worker(app, clean_db, monkeypatch):
            ((old_pid, name),) = listen_backends(clean_db)
            assert name == APP_NAME
            with clean_db.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": old_pid})
            relistening = await eventually(
                lambda: [b for b in listen_backends(clean_db) if b[0] != old_pid],
                "the listener reconnected",
            )
            assert [name for _, name in relistening] == [APP_NAME]
            spawned = await app.spawn("ping", {})
            snapshot = await app.await_task_result(spawned.task_id, timeout=5)  # poll: 30 s
    assert snapshot.result == "pong"


# -- graceful stop -------------------------------------------------------------------


@pytest.mark.parametrize("caller", ["thread", "coroutine"])
@async_test
async def test_stop_worker_lets_the_in_flight_handler_finish_and_claims_nothing_new(
    clean_db: Engine, database_url: str, caller: str
) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app)
        first = await app.spawn("blocking", {})
        worker = start(app, concurrency=1, poll_interval=0.05)
        try:
            await within(blocking.started.wait(), "the handler started")
            if caller == "thread":
                await asyncio.to_thread(app.stop_worker)
            else:
                app.stop_worker()
            await eventually(lambda: stopping(app), "the worker is stopping")
            second = await app.spawn("blocking", {})  # must stay pending
            assert not worker.done(), "start_worker returned with a handler in flight"
            blocking.release.set()
            await within(worker, "start_worker returned once the handler finished")
        finally:
            blocking.release.set()
            await stop(app, worker)
    assert attempts(clean_db, first.task_id) == [(1, "completed", None, True)]
    assert attempts(clean_db, second.task_id) == [(1, "pending", None, True)]
    assert blocking.calls == [1] and not blocking.cancelled.is_set()


@async_test
async def test_cancelling_the_worker_task_stops_it_gracefully_then_propagates(
    clean_db: Engine, database_url: str
) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app)
        first = await app.spawn("blocking", {})
        worker = start(app, concurrency=1, poll_interval=0.05)
        try:
            await within(blocking.started.wait(), "the handler started")
            worker.cancel()
            await eventually(lambda: stopping(app), "the cancelled worker is stopping")
            second = await app.spawn("blocking", {})
            assert not worker.done(), "the cancellation did not wait for the handler"
            blocking.release.set()
            with pytest.raises(asyncio.CancelledError):
                await within(asyncio.shield(worker), "start_worker ended")
            assert worker.cancelled()
        finally:
            blocking.release.set()
            await stop(app, worker)
    assert attempts(clean_db, first.task_id) == [(1, "completed", None, True)]
    assert attempts(clean_db, second.task_id) == [(1, "pending", None, True)]
    assert not blocking.cancelled.is_set()


@async_test
async def test_a_second_cancellation_stops_now(clean_db: Engine, database_url: str) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app)
        spawned = await app.spawn("blocking", {})
        worker = start(app, concurrency=1, poll_interval=0.05)
        try:
            await within(blocking.started.wait(), "the handler started")
            worker.cancel()
            await eventually(lambda: stopping(app), "the cancelled worker is stopping")
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await within(asyncio.shield(worker), "start_worker ended")
        finally:
            blocking.release.set()
            await stop(app, worker)
    assert blocking.cancelled.is_set()
    assert attempts(clean_db, spawned.task_id) == [
        (1, "failed", "$WorkerShutdown", True),
        (2, "pending", None, True),
    ]


# -- signals (the worker runs in the main thread's loop) ------------------------------


@contextlib.contextmanager
def sentinel_handlers() -> Iterator[list[int]]:
    """SIGTERM/SIGINT handlers that record their calls; restored afterwards."""
    hits: list[int] = []

    def sentinel(signum: int, frame: object) -> None:
        hits.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, sentinel)
    try:
        yield hits
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_scenario(database_url: str, signum: int, times: int) -> dict[str, Any]:
    """``asyncio.run`` in the main thread: a worker with one blocked handler,
    sent ``signum`` ``times`` times from a helper thread (each once the worker
    reacted to the one before); the handler is released only after a single
    signal. Returns what the test checks."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    async def scenario() -> dict[str, Any]:
        async with async_app_for(database_url) as app:
            blocking = Blocking(app)
            spawned = await app.spawn("blocking", {})

            async def drive() -> None:
                try:
                    await within(blocking.started.wait(), "the handler started")
                    await asyncio.to_thread(signal.pthread_kill, main, signum)
                    await eventually(lambda: stopping(app), "the worker saw the signal")
                    if times == 1:
                        assert not blocking.cancelled.is_set()
                        blocking.release.set()
                        return
                    await asyncio.to_thread(signal.pthread_kill, main, signum)
                except BaseException:
                    app.stop_worker(now=True)  # never leave the main thread hanging
                    raise

            driver = asyncio.create_task(drive())
            try:
                await app.start_worker(concurrency=1, poll_interval=0.05)
                handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            finally:
                blocking.release.set()
                await driver
            return {
                "handlers": handlers,
                "attempts": attempts_of(database_url, spawned.task_id),
                "cancelled": blocking.cancelled.is_set(),
            }

    return asyncio.run(scenario())


def attempts_of(url: str, task_id: Any) -> list[tuple[int, str, str | None, bool]]:
    engine = create_engine(url)
    try:
        return attempts(engine, task_id)
    finally:
        engine.dispose()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_main_thread_worker_gracefully(
    clean_db: Engine, database_url: str, signum: int
) -> None:
    with sentinel_handlers() as hits:
        sentinel = signal.getsignal(signal.SIGTERM)
        seen = signal_scenario(database_url, signum, times=1)
    assert hits == []  # the worker's handler took the signal, not the sentinel
    assert seen["handlers"] == {signal.SIGTERM: sentinel, signal.SIGINT: sentinel}  # restored
    assert seen["attempts"] == [(1, "completed", None, True)]
    assert not seen["cancelled"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_now(clean_db: Engine, database_url: str, signum: int) -> None:
    with sentinel_handlers() as hits:
        sentinel = signal.getsignal(signal.SIGTERM)
        seen = signal_scenario(database_url, signum, times=2)
    assert hits == []
    assert seen["handlers"] == {signal.SIGTERM: sentinel, signal.SIGINT: sentinel}
    assert seen["cancelled"]  # the handler was stopped, not abandoned
    assert seen["attempts"] == [
        (1, "failed", "$WorkerShutdown", True),
        (2, "pending", None, True),  # claimable at once
    ]


@pytest.mark.parametrize("handle_signals", [True, False])
@async_test
async def test_handle_signals_false_leaves_the_hosts_handlers_alone(
    clean_db: Engine, database_url: str, handle_signals: bool
) -> None:
    """In the main thread's loop, ``handle_signals=False`` installs nothing: the
    host (uvicorn, say) keeps SIGTERM/SIGINT and calls ``stop_worker`` itself."""
    seen: list[Any] = []
    with sentinel_handlers():
        host = signal.getsignal(signal.SIGTERM)
        async with async_app_for(database_url) as app:

            @app.register_task("look")
            async def look(params: Any, ctx: Any) -> None:
                seen.append(signal.getsignal(signal.SIGTERM))
                app.stop_worker()

            await app.spawn("look", {})
            await within(
                app.start_worker(poll_interval=0.05, handle_signals=handle_signals),
                "the worker stopped",
            )
            after = signal.getsignal(signal.SIGTERM)
    assert after is host
    assert (seen[0] is host) is not handle_signals


# -- stopping now ----------------------------------------------------------------------


@async_test
async def test_stop_now_cancels_a_started_handler_and_releases_its_run_for_a_retry(
    clean_db: Engine, database_url: str
) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app, max_attempts=3)
        spawned = await app.spawn("blocking", {})
        worker = start(app, concurrency=1, poll_interval=0.05)
        try:
            await within(blocking.started.wait(), "the handler started")
            app.stop_worker()  # stage one: waits for the handler
            await eventually(lambda: stopping(app), "the worker is stopping")
            app.stop_worker()  # again: still graceful
            assert not worker.done() and not blocking.cancelled.is_set()
            await asyncio.to_thread(app.stop_worker, now=True)  # stage two
            await within(worker, "start_worker returned after stop_worker(now=True)")
        finally:
            blocking.release.set()
            await stop(app, worker)
        assert blocking.cancelled.is_set()
        assert attempts(clean_db, spawned.task_id) == [
            (1, "failed", "$WorkerShutdown", True),
            (2, "pending", None, True),
        ]
        assert await app.work_batch() == 1  # attempt 2 runs elsewhere
    assert [state for _, state, _, _ in attempts(clean_db, spawned.task_id)] == [
        "failed",
        "completed",
    ]
    assert blocking.calls == [1, 2]


@async_test
async def test_a_run_whose_handler_never_started_is_released_without_an_attempt(
    clean_db: Engine, database_url: str
) -> None:
    """The stop comes while the claim is on the wire: the claimed run's handler
    never starts, and it goes back to pending as if never claimed."""
    async with async_app_for(database_url) as app:
        blocking = Blocking(app, max_attempts=1)
        spawned = await app.spawn("blocking", {})
        with recorded_claims(app) as claims:
            engine = app.engine.sync_engine

            def stop_on_claim(
                conn: Any, cursor: Any, stmt: Any, params: Any, context: Any, many: Any
            ) -> None:
                compiled = getattr(context, "compiled", None)
                if compiled is not None and compiled.statement is sqlw.claim and cursor.rowcount:
                    app.stop_worker(now=True)

            event.listen(engine, "after_cursor_execute", stop_on_claim)
            try:
                async with running_worker(app, concurrency=1, poll_interval=0.05) as worker:
                    await within(asyncio.shield(worker), "start_worker returned")
            finally:
                event.remove(engine, "after_cursor_execute", stop_on_claim)
        assert 1 in claims and blocking.calls == []
        assert attempts(clean_db, spawned.task_id) == [(1, "pending", None, True)]
        with clean_db.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT t.first_started_at, r.started_at, r.claimed_by FROM absurd.tasks t "
                    "JOIN absurd.runs r ON r.run_id = t.last_run_id WHERE t.task_id = :t"
                ),
                {"t": spawned.task_id},
            ).one()
        assert tuple(row) == (None, None, None)
        blocking.release.set()
        assert await app.work_batch() == 1  # max_attempts=1, yet it runs: none was used
    assert attempts(clean_db, spawned.task_id) == [(1, "completed", None, True)]


@async_test
async def test_shutdown_timeout_stops_now_after_it_elapses(
    clean_db: Engine, database_url: str
) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app)
        spawned = await app.spawn("blocking", {})
        worker = start(app, concurrency=1, poll_interval=0.05, shutdown_timeout=0.2)
        try:
            await within(blocking.started.wait(), "the handler started")
            app.stop_worker()  # once: the timeout does the rest
            await within(worker, "start_worker returned after shutdown_timeout")
        finally:
            blocking.release.set()
            await stop(app, worker)
    assert blocking.cancelled.is_set()
    assert [a[:3] for a in attempts(clean_db, spawned.task_id)] == [
        (1, "failed", "$WorkerShutdown"),
        (2, "pending", None),
    ]


# -- the lease watchdog -------------------------------------------------------------------


@async_test
async def test_a_handler_whose_lease_lapses_is_cancelled_and_its_run_retried(
    clean_db: Engine, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One slot, held by a handler that awaits past its 1 s lease without renewing
    it: the busy worker sweeps the run, cancels the handler (which never reaches
    its next write) and runs attempt 2 in the freed slot."""
    caplog.set_level(logging.WARNING, logger="absurd_sqla.worker")
    async with async_app_for(database_url) as app:
        blocking = Blocking(app, max_attempts=2)
        spawned = await app.spawn("blocking", {})
        async with running_worker(app, concurrency=1, claim_timeout=1, poll_interval=0.05):
            await within(blocking.started.wait(), "attempt 1 started")
            await within(blocking.cancelled.wait(), "the watchdog cancelled attempt 1")
            snapshot = await app.await_task_result(spawned.task_id, timeout=DEADLINE)
    assert snapshot.state == "completed" and snapshot.result == "attempt 2"
    assert blocking.calls == [1, 2]
    assert [a[:3] for a in attempts(clean_db, spawned.task_id)] == [
        (1, "failed", "$ClaimTimeout"),
        (2, "completed", None),
    ]
    with clean_db.connect() as conn:  # attempt 1 never got to its step
        stored = conn.scalar(text("SELECT count(*) FROM absurd.checkpoints"))
    assert stored == 0
    assert any("no longer this worker's" in r.getMessage() for r in caplog.records)


@async_test
async def test_cancelling_a_task_cancels_its_running_handler(
    clean_db: Engine, database_url: str
) -> None:
    async with async_app_for(database_url) as app:
        blocking = Blocking(app)

        @app.register_task("ping")
        async def ping(params: Any, ctx: AsyncTaskContext) -> str:
            return "pong"

        spawned = await app.spawn("blocking", {})
        async with running_worker(app, concurrency=1, poll_interval=0.05):
            await within(blocking.started.wait(), "the handler started")
            assert await app.cancel_task(spawned.task_id)
            await within(blocking.cancelled.wait(), "the watchdog cancelled the handler")
            after = await app.spawn("ping", {})  # the slot is free again
            snapshot = await app.await_task_result(after.task_id, timeout=DEADLINE)
    assert snapshot.result == "pong"
    assert attempts(clean_db, spawned.task_id) == [(1, "cancelled", None, True)]
    assert blocking.calls == [1]


@async_test
async def test_the_watchdog_leaves_alone_a_handler_that_released_its_run_itself(
    clean_db: Engine, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run no longer ``running`` because its own handler suspended it is not
    lost: a ``wrap_task`` hook still busy after the suspension is not cancelled,
    however many lease checks pass meanwhile."""
    caplog.set_level(logging.WARNING, logger="absurd_sqla.worker")
    gate = asyncio.Event()
    cancelled: list[str] = []

    async def wrap(ctx: Any, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        finally:
            try:
                await asyncio.wait_for(gate.wait(), DEADLINE)  # e.g. flushing a trace
            except asyncio.CancelledError:
                cancelled.append("wrap")
                raise

    async with async_app_for(database_url, hooks=Hooks(wrap_task=wrap)) as app:

        @app.register_task("waits")
        async def waits(params: Any, ctx: AsyncTaskContext) -> Any:
            return await ctx.await_event("never")

        spawned = await app.spawn("waits", {})
        checks: list[int] = []

        def record(conn: Any, cursor: Any, stmt: Any, params: Any, context: Any, many: Any) -> None:
            compiled = getattr(context, "compiled", None)
            if compiled is not None and compiled.statement is worker_async._lost_runs:
                checks.append(cursor.rowcount)

        event.listen(app.engine.sync_engine, "after_cursor_execute", record)
        try:
            async with running_worker(app, concurrency=1, poll_interval=0.05):
                await eventually(
                    lambda: task_state(clean_db, spawned.task_id) == "sleeping", "it suspended"
                )
                seen = len(checks)
                await eventually(
                    lambda: len(checks) >= seen + 2 or cancelled, "two lease checks since"
                )
                gate.set()
        finally:
            gate.set()
            event.remove(app.engine.sync_engine, "after_cursor_execute", record)
    assert cancelled == []
    assert not [r for r in caplog.records if "no longer this worker's" in r.getMessage()]
    assert [a[:2] for a in attempts(clean_db, spawned.task_id)] == [(1, "sleeping")]


# -- an outage ----------------------------------------------------------------------------


@pytest.fixture
def set_reachable(fresh_database: str) -> Iterator[Callable[[bool], None]]:
    """``set_reachable(bool)`` for a migrated database of its own."""
    migrate.upgrade(fresh_database)
    url = make_url(fresh_database)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def set_reachable(reachable: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS {str(reachable).lower()}'
            )
            if not reachable:  # and drop every session it has, the worker's included
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": url.database},
                )

    try:
        yield set_reachable
    finally:
        set_reachable(True)
        admin.dispose()


def records(caplog: pytest.LogCaptureFixture, level: int, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("absurd_sqla") and r.levelno == level and words in r.getMessage()
    ]


@async_test
async def test_an_outage_logs_once_backs_off_and_recovers(
    fresh_database: str,
    set_reachable: Callable[[bool], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="absurd_sqla")
    async with async_app_for(fresh_database) as app:

        @app.register_task("ping")
        async def ping(params: Any, ctx: AsyncTaskContext) -> str:
            return "pong"

        async with running_worker(app, poll_interval=0.01):
            first = await app.spawn("ping", {})
            assert (await app.await_task_result(first.task_id, timeout=DEADLINE)).result == "pong"
            set_reachable(False)
            await eventually(
                lambda: len(records(caplog, logging.DEBUG, "still failing")) >= 6, "6 retries"
            )
            set_reachable(True)
            back = await eventually(
                lambda: records(caplog, logging.WARNING, "database is back"), "the worker is back"
            )
            second = await app.spawn("ping", {})
            assert (await app.await_task_result(second.task_id, timeout=DEADLINE)).result == "pong"
    assert len(records(caplog, logging.WARNING, "database unreachable")) == 1
    assert len(back) == 1
    assert len(records(caplog, logging.WARNING, "LISTEN")) <= 2  # failed once, back once
    ours = [r for r in caplog.records if r.name.startswith("absurd_sqla")]
    assert [r.getMessage() for r in ours if r.levelno >= logging.ERROR] == []
    # The loop backed off: far fewer attempts than 10 ms polls over the outage.
    assert len(records(caplog, logging.DEBUG, "still failing")) + 1 <= 12
