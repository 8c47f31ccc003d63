"""The long-running loop of ``Absurd.start_worker`` (``Worker.run``): it fails
and retries runs whose lease expired, on its own and while it keeps running,
and it warns at start when the engine's pool is too small for its concurrency.

``work_batch`` sweeps expired leases too, so these tests go through
``start_worker`` only, in a thread, stopped with ``stop_worker``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from absurd_sqla import Absurd, LeaseLost
from absurd_sqla.context import TaskContext
from absurd_sqla.models import runs
from absurd_sqla.testing import FakeClock
from tests.support import DEADLINE, run_states, task_state, wait_until, worker_thread

LEASE = 10  # seconds: the claim_timeout of these tests


class WorkerDied(BaseException):
    """Leaves ``work_batch`` the way a killed worker process does: no failure is
    recorded and the run stays ``running`` under a lease nobody renews."""


def attempts(engine: Engine, task_id: Any) -> list[tuple[int, str, str | None]]:
    """(attempt, state, failure name) of each run of a task."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(runs.c.attempt, runs.c.state, runs.c.failure_reason)
            .where(runs.c.task_id == task_id)
            .order_by(runs.c.attempt)
        )
        return [(r.attempt, r.state, (r.failure_reason or {}).get("name")) for r in rows]


def completed(engine: Engine, task_id: Any) -> bool:
    return task_state(engine, task_id) == "completed"


# -- expired leases ---------------------------------------------------------------


def test_a_worker_fails_and_retries_the_run_of_a_worker_that_died(
    app: Absurd, clock: FakeClock
) -> None:
    started: list[int] = []

    @app.register_task("orphaned")
    def handler(params: Any, ctx: TaskContext) -> int:
        started.append(ctx.attempt)
        if ctx.attempt == 1:
            raise WorkerDied
        return ctx.attempt

    spawned = app.spawn("orphaned", {})
    with pytest.raises(WorkerDied):
        app.work_batch(worker_id="died", claim_timeout=LEASE)
    assert run_states(app.engine, spawned.task_id) == ["running"]  # claimed, abandoned
    clock.advance(LEASE + 1)
    with worker_thread(app, claim_timeout=LEASE, poll_interval=0.05):
        wait_until(lambda: completed(app.engine, spawned.task_id), "the retry completed")
    assert started == [1, 2]
    assert attempts(app.engine, spawned.task_id) == [
        (1, "failed", "$ClaimTimeout"),
        (2, "completed", None),
    ]
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == 2


def test_a_running_worker_sweeps_a_lease_that_expires_while_it_runs(
    app: Absurd, clock: FakeClock
) -> None:
    """Attempt 1 hangs in one handler slot past its lease; the loop, still
    running, fails it and runs attempt 2 in the other slot. The hung handler is
    fenced when it resumes."""
    hung = threading.Event()
    release = threading.Event()
    fenced: list[str] = []

    @app.register_task("hangs")
    def handler(params: Any, ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            hung.set()
            assert release.wait(DEADLINE)
            try:
                ctx.step("late", lambda: 1)
            except LeaseLost:
                fenced.append("LeaseLost")
                raise
        return ctx.attempt

    spawned = app.spawn("hangs", {})
    try:
        with worker_thread(app, concurrency=2, claim_timeout=LEASE, poll_interval=0.05):
            assert hung.wait(DEADLINE), "attempt 1 never started"
            clock.advance(LEASE + 1)  # its lease runs out while the handler is busy
            wait_until(lambda: completed(app.engine, spawned.task_id), "attempt 2 completed")
            release.set()
    finally:
        release.set()  # a failed wait must not leave the worker waiting for the handler
    assert fenced == ["LeaseLost"]
    assert attempts(app.engine, spawned.task_id) == [
        (1, "failed", "$ClaimTimeout"),
        (2, "completed", None),
    ]


# -- pool size ----------------------------------------------------------------------


@pytest.fixture
def engine_with_pool(database_url: str) -> Iterator[Any]:
    """``engine_with_pool(pool_size, max_overflow)``: an engine disposed after the test."""
    engines: list[Engine] = []

    def make(pool_size: int, max_overflow: int) -> Engine:
        engine = create_engine(database_url, pool_size=pool_size, max_overflow=max_overflow)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def pool_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "absurd_sqla.worker"
        and record.levelno == logging.WARNING
        and "pool" in record.getMessage()
    ]


def run_one_task(app: Absurd, **worker: Any) -> None:
    """Start a worker, let it complete one task (so it is past its start-up
    checks), then stop it."""

    @app.register_task("noop")
    def noop(params: Any, ctx: TaskContext) -> str:
        return "ok"

    spawned = app.spawn("noop", {})
    with worker_thread(app, poll_interval=0.05, **worker):
        wait_until(lambda: completed(app.engine, spawned.task_id), "the worker ran a task")


def test_start_worker_warns_when_the_pool_is_smaller_than_the_concurrency(
    app: Absurd, engine_with_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="absurd_sqla.worker")
    small = Absurd(engine_with_pool(pool_size=2, max_overflow=1))  # 3 connections
    run_one_task(small, concurrency=4)
    (message,) = pool_warnings(caplog)
    assert "allows 3 connections" in message and "concurrency=4" in message


@pytest.mark.parametrize(
    ("pool_size", "max_overflow", "warns"),
    [(3, 2, True), (3, 3, False), (1, -1, False)],  # concurrency=4 needs 6
)
def test_the_pool_warning_follows_the_documented_rule(
    app: Absurd,
    engine_with_pool: Any,
    caplog: pytest.LogCaptureFixture,
    pool_size: int,
    max_overflow: int,
    warns: bool,
) -> None:
    """docs/howto/workers.md: at least ``concurrency + 2``; unlimited overflow is enough."""
    caplog.set_level(logging.WARNING, logger="absurd_sqla.worker")
    client = Absurd(engine_with_pool(pool_size=pool_size, max_overflow=max_overflow))
    run_one_task(client, concurrency=4)
    assert bool(pool_warnings(caplog)) is warns


def test_workers_sharing_a_client_add_their_needs_up(
    app: Absurd, engine_with_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="absurd_sqla.worker")
    client = Absurd(engine_with_pool(pool_size=6, max_overflow=0))  # enough for one c=4
    with worker_thread(client, concurrency=4, poll_interval=0.05):
        wait_until(lambda: client._workers.running(), "the first worker runs")
        with worker_thread(client, concurrency=1, poll_interval=0.05):  # needs 3 more
            wait_until(lambda: pool_warnings(caplog), "the second worker warns")
    (message,) = pool_warnings(caplog)
    assert "needs 9" in message and "other workers" in message
