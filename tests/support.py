"""Shared test helpers: a small business schema the tests write to next to
absurd's tables, database probes, and waiting on conditions with a deadline.

No sleep stands in for a condition: ``wait_until`` polls one (a database state,
usually) and fails the test with a message when its deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from absurd_sqla import Absurd, AsyncAbsurd
from absurd_sqla._run import ClaimedRun
from absurd_sqla.models import runs, tasks, waits

DEADLINE = 15.0  # seconds: generous upper bound for any awaited condition

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": "public"}  # noqa: RUF012 - SQLAlchemy reads the class attribute

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    amount: Mapped[int]
    status: Mapped[str] = mapped_column(default="new")


def create_business_tables(url: str) -> None:
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


def count_tasks(session_or_engine: Any, **where: Any) -> int:
    query = select(func.count()).select_from(tasks)
    for key, value in where.items():
        query = query.where(tasks.c[key] == value)
    if isinstance(session_or_engine, Session):
        return int(session_or_engine.scalar(query) or 0)
    with session_or_engine.connect() as conn:
        return int(conn.scalar(query) or 0)


def count_runs(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(runs)) or 0)


def run_states(engine: Engine, task_id: Any) -> list[str]:
    """The states of a task's runs, by attempt."""
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(runs.c.state).where(runs.c.task_id == task_id).order_by(runs.c.attempt)
            )
        )


def task_state(engine: Engine, task_id: Any) -> str | None:
    with engine.connect() as conn:
        return conn.scalar(select(tasks.c.state).where(tasks.c.task_id == task_id))


def wait_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(waits)) or 0)


CLAIMED_AT = datetime(2030, 1, 1, tzinfo=UTC)


def claimed_run(**fields: Any) -> ClaimedRun:
    """A first attempt as the claim statement returns it, claimed at CLAIMED_AT
    (for unit tests of run state: no database involved)."""
    run = ClaimedRun(
        run_id=uuid.uuid4(),
        task_id=uuid.uuid4(),
        queue_name="default",
        task_name="t",
        attempt=1,
        params={},
        headers={},
        retry_strategy=None,
        max_attempts=None,
        cancellation=None,
        enqueued_at=CLAIMED_AT,
        first_started_at=CLAIMED_AT,
        prev_first_started_at=None,
        prev_started_at=None,
        claimed_at=CLAIMED_AT,
        checkpoints={},
    )
    return dataclasses.replace(run, **fields)


# -- waiting -----------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], message: str, timeout: float = DEADLINE) -> Any:
    """Poll ``condition`` until it is truthy and return its value; fail the test
    with ``message`` once ``timeout`` seconds have passed. The poll only
    observes: it never stands in for the synchronisation it waits for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s: {message}")
        time.sleep(0.005)


@contextlib.contextmanager
def worker_thread(app: Absurd, **kwargs: Any) -> Iterator[threading.Thread]:
    """``app.start_worker(**kwargs)`` in a background thread, stopped and joined on exit."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            app.start_worker(**kwargs)
        except BaseException as exc:  # surfaced by the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-worker", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        # stop_worker() only reaches workers that have registered, so repeat it
        # until the thread is gone (it may not have registered yet).
        deadline = time.monotonic() + DEADLINE
        while thread.is_alive() and time.monotonic() < deadline:
            app.stop_worker()
            thread.join(timeout=0.05)
        assert not thread.is_alive(), "the worker thread did not stop"
    assert not errors, f"start_worker raised: {errors!r}"


# -- races --------------------------------------------------------------------------
#
# Races are made deterministic without sleeps: a transaction is held open (or a
# row lock is taken by a third connection) to stretch the window, the other side
# is started in a thread (``Outcome``), and ``pg_stat_activity`` is polled with a
# deadline until it waits on a lock; only then is the first transaction released.


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


def wait_for_lock_waiters(engine: Engine, count: int) -> None:
    wait_until(lambda: lock_waiters(engine) >= count, f"{count} backend(s) waiting on a lock")


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
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "thread still blocked"
        return self


# -- asyncio ---------------------------------------------------------------------------
#
# tests/integration/test_async_*.py are turned into sync test modules by
# ci/generate_sync.py, which renames each async helper below to its sync twin
# (``async_app_for`` -> ``app_for``, ``AsyncBarrier`` -> ``Barrier``, ...): the
# two forms of a helper take the same arguments and mean the same thing.


def run_async(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an ``async def`` test in a fresh event loop (``asyncio.run``); its
    fixtures are resolved as usual (the signature is the coroutine function's)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(test(*args, **kwargs))

    return run


@contextlib.asynccontextmanager
async def async_app_for(url: str, **kwargs: Any) -> AsyncIterator[AsyncAbsurd]:
    """An ``AsyncAbsurd`` on ``url`` with its default queue, closed at the end.

    Made inside the test's event loop: async connections belong to the loop
    that opened them, so a client is never shared between tests."""
    app = AsyncAbsurd(url, **kwargs)
    try:
        await app.create_queue()
        yield app
    finally:
        await app.close()


async def run_async_worker_until(
    app: AsyncAbsurd, done: Callable[[], bool], message: str, **kwargs: Any
) -> None:
    """``app.start_worker(**kwargs)`` in a task until ``done()`` (a database
    condition, polled), then stopped; fails if the worker stops first or
    ``done()`` is not reached within ``DEADLINE``."""
    worker = asyncio.create_task(app.start_worker(**kwargs))
    try:
        deadline = time.monotonic() + DEADLINE
        while not done():
            assert not worker.done(), "the worker stopped early"
            assert time.monotonic() < deadline, f"timed out: {message}"
            await asyncio.sleep(0.01)  # polling the database condition
    finally:
        app.stop_worker()
        await asyncio.wait_for(worker, DEADLINE)


@contextlib.contextmanager
def app_for(url: str, **kwargs: Any) -> Iterator[Absurd]:
    """An ``Absurd`` on ``url`` with its default queue, closed at the end (the
    sync twin of ``async_app_for``)."""
    app = Absurd(url, **kwargs)
    try:
        app.create_queue()
        yield app
    finally:
        app.close()


async def async_concurrently(*calls: Callable[[], Awaitable[T]]) -> list[T]:
    """Run the calls at once (tasks on this event loop); their results in order."""
    return list(await asyncio.gather(*(call() for call in calls)))


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run the calls at once (one thread each); their results in order. The
    first exception raised is raised here once every call has returned."""
    outcomes = [Outcome(call) for call in calls]
    for outcome in outcomes:
        outcome.join()
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [outcome.value for outcome in outcomes]


class AsyncBarrier:
    """``asyncio.Barrier`` whose ``wait`` fails the test after ``DEADLINE``."""

    def __init__(self, parties: int) -> None:
        self._barrier = asyncio.Barrier(parties)

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self._barrier.wait(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"timed out after {DEADLINE}s at a barrier")


class Barrier:
    """``threading.Barrier`` whose ``wait`` fails the test after ``DEADLINE``."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties, timeout=DEADLINE)

    def wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            pytest.fail(f"timed out after {DEADLINE}s at a barrier")


class AsyncEvent:
    """``asyncio.Event`` whose ``wait`` fails the test after ``DEADLINE``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"timed out after {DEADLINE}s waiting for an event")


class Event:
    """``threading.Event`` whose ``wait`` fails the test after ``DEADLINE``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self) -> None:
        if not self._event.wait(DEADLINE):
            pytest.fail(f"timed out after {DEADLINE}s waiting for an event")


@contextlib.asynccontextmanager
async def async_worker_task(app: AsyncAbsurd, **kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    """``app.start_worker(**kwargs)`` as a task on this event loop, stopped and
    awaited on exit (the async twin of ``worker_thread``)."""
    task = asyncio.create_task(app.start_worker(**kwargs))
    try:
        yield task
    finally:
        app.stop_worker()
        await asyncio.wait_for(task, DEADLINE)


# -- the dashboard served by the command line -------------------------------------


@dataclasses.dataclass
class Served:
    """``absurd-sqla dashboard`` in a subprocess: its URL, and once stopped its
    exit code and everything it printed."""

    url: str
    returncode: int | None = None
    output: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served_dashboard(database_url: str) -> Iterator[Served]:
    """``absurd-sqla dashboard`` on a free port, ready (it accepts connections);
    stopped with SIGTERM on exit."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "absurd_sqla", "dashboard", "--port", str(port)],
        env={**os.environ, "ABSURD_DATABASE_URL": database_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(f"http://127.0.0.1:{port}")
    try:

        def listening() -> bool:
            assert server.poll() is None, server.communicate()[0]
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "the dashboard listens")
        yield served
    finally:
        server.send_signal(signal.SIGTERM)
        served.output, _ = server.communicate(timeout=30)
        served.returncode = server.returncode
