"""Shutdown has a bound. A stop lets in-flight handlers finish;
``stop_worker(now=True)``, a second SIGTERM/SIGINT, or ``shutdown_timeout``
after the first stop, stops now and releases unfinished runs:
claimable again at once, an attempt used only where the handler had started.
A worker whose every slot is busy still sweeps expired leases."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from absurd_sqla import Absurd, LeaseLost, TaskContext
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.internals import claim, executor
from tests.support import DEADLINE, wait_until


def runs(engine: Engine, task_id: Any) -> list[tuple[int, str, str | None, bool]]:
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


class Hung:
    """A handler that blocks until released, recording what it was told after."""

    def __init__(self, app: Absurd, name: str = "hung", **options: Any) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.after: list[BaseException] = []
        self.done = threading.Event()

        @app.register_task(name, **options)
        def hung(params: Any, ctx: TaskContext) -> str:
            self.started.set()
            self.release.wait(DEADLINE)
            try:
                ctx.step("after", lambda: 1)  # fenced once the run was given away
            except BaseException as exc:
                self.after.append(exc)
                raise
            finally:
                self.done.set()
            return "finished"


class WorkerThread:
    def __init__(self, app: Absurd, **kwargs: Any) -> None:
        self.app = app
        self.thread = threading.Thread(target=app.start_worker, kwargs=kwargs, daemon=True)
        self.thread.start()

    def stopped(self) -> bool:
        return not self.thread.is_alive()


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    hung: list[Any] = []
    yield hung
    for item in hung:  # no abandoned handler outlives its test
        item.release.set()
        if item.started.is_set():
            assert item.done.wait(DEADLINE)


def test_stop_now_releases_a_started_run_for_a_retry_at_once(
    app: Absurd, cleanup: list[Any]
) -> None:
    hung = Hung(app, max_attempts=3)
    cleanup.append(hung)
    spawned = app.spawn("hung", {})
    worker = WorkerThread(app, concurrency=1, poll_interval=0.05)
    assert hung.started.wait(DEADLINE)
    app.stop_worker()  # stage one: waits for the hung handler
    wait_until(lambda: all(w.stopping for w in app._workers.running()), "the worker is stopping")
    assert not worker.stopped()
    app.stop_worker()  # again: still graceful
    assert not worker.stopped()
    app.stop_worker(now=True)  # stage two
    wait_until(worker.stopped, "start_worker returned with the handler still hung")
    assert runs(app.engine, spawned.task_id) == [
        (1, "failed", "$WorkerShutdown", True),
        (2, "pending", None, True),  # claimable at once
    ]
    hung.release.set()  # the abandoned handler's next write is fenced
    wait_until(lambda: hung.after, "the abandoned handler wrote")
    assert isinstance(hung.after[0], LeaseLost)
    assert run_until_idle(app) == 1  # attempt 2 runs elsewhere
    assert [state for _, state, _, _ in runs(app.engine, spawned.task_id)] == [
        "failed",
        "completed",
    ]


def test_shutdown_timeout_stops_now_after_it_elapses(app: Absurd, cleanup: list[Any]) -> None:
    hung = Hung(app)
    cleanup.append(hung)
    spawned = app.spawn("hung", {})
    worker = WorkerThread(app, concurrency=1, poll_interval=0.05, shutdown_timeout=0.2)
    assert hung.started.wait(DEADLINE)
    app.stop_worker()  # once: the timeout does the rest
    wait_until(worker.stopped, "start_worker returned after shutdown_timeout")
    assert [r[:3] for r in runs(app.engine, spawned.task_id)] == [
        (1, "failed", "$WorkerShutdown"),
        (2, "pending", None),
    ]


def test_a_first_stop_still_lets_in_flight_handlers_finish(app: Absurd, cleanup: list[Any]) -> None:
    hung = Hung(app)
    cleanup.append(hung)
    spawned = app.spawn("hung", {})
    worker = WorkerThread(app, concurrency=1, poll_interval=0.05, shutdown_timeout=60)
    assert hung.started.wait(DEADLINE)
    app.stop_worker()
    wait_until(lambda: all(w.stopping for w in app._workers.running()), "the worker is stopping")
    hung.release.set()
    wait_until(worker.stopped, "start_worker returned once the handler finished")
    assert runs(app.engine, spawned.task_id) == [(1, "completed", None, True)]
    assert hung.after == []


def test_a_run_whose_handler_never_started_is_released_without_an_attempt(
    app: Absurd, clock: FakeClock
) -> None:
    spawned = app.spawn("anything", {}, max_attempts=1)
    (run,) = claim(app, "default", "w", 120, 1)
    clock.advance(5)
    executor(app).release(run, "w", 120, started=False)
    assert runs(app.engine, spawned.task_id) == [(1, "pending", None, True)]
    with app.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT t.state, t.first_started_at, r.started_at, r.claimed_by "
                "FROM absurd.tasks t JOIN absurd.runs r ON r.run_id = t.last_run_id "
                "WHERE t.task_id = :t"
            ),
            {"t": spawned.task_id},
        ).one()
    assert tuple(row) == ("pending", None, None, None)  # as if never claimed
    app.register_task("anything")(lambda params, ctx: "ran")
    assert run_until_idle(app) == 1  # max_attempts=1, yet it runs: no attempt was used
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "ran"


def test_a_busy_worker_still_sweeps_expired_leases(
    app: Absurd, clock: FakeClock, cleanup: list[Any]
) -> None:
    """One slot, taken by a hung handler: its lease expires and is swept anyway."""
    hung = Hung(app, max_attempts=2)
    cleanup.append(hung)
    spawned = app.spawn("hung", {})
    worker = WorkerThread(app, concurrency=1, poll_interval=0.05, claim_timeout=10)
    assert hung.started.wait(DEADLINE)
    clock.advance(11)
    wait_until(
        lambda: runs(app.engine, spawned.task_id)[0][:3] == (1, "failed", "$ClaimTimeout"),
        "the busy worker swept its own hung run",
    )
    app.stop_worker(now=True)
    wait_until(worker.stopped, "the worker stopped now")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_now(app: Absurd, cleanup: list[Any], signum: int) -> None:
    """The worker runs in the main thread; the signals come from a helper thread."""
    hung = Hung(app)
    cleanup.append(hung)
    spawned = app.spawn("hung", {})
    problems: list[str] = []

    def helper() -> None:
        if not hung.started.wait(DEADLINE):
            problems.append("the task never started")
            return
        main = threading.main_thread().ident
        assert main is not None
        signal.pthread_kill(main, signum)
        deadline = time.monotonic() + DEADLINE
        while not all(w.stopping for w in app._workers.running()):
            if time.monotonic() > deadline:
                problems.append("the first signal was not seen")
                return
            hung.started.wait(0.01)  # poll; the condition is the worker's state
        signal.pthread_kill(main, signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    try:
        app.start_worker(concurrency=1, poll_interval=0.05)  # returns after the second signal
    finally:
        thread.join(DEADLINE)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert problems == []
    assert {sig: signal.getsignal(sig) for sig in previous} == previous
    assert [r[:3] for r in runs(app.engine, spawned.task_id)] == [
        (1, "failed", "$WorkerShutdown"),
        (2, "pending", None),
    ]
