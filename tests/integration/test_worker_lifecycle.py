"""Worker lifecycle against a real PostgreSQL: child tasks, suspension signals,
failure reasons, graceful stop (stop_worker and signals), LISTEN/NOTIFY wake-up,
concurrency, batching and FIFO order, retention, headers and hooks.

No sleep stands in for a condition: threads synchronise on ``threading.Event`` /
``Barrier``, and database conditions are polled with a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text

from absurd_sqla import Absurd, Hooks, InvalidArgument, SpawnRequest, TaskNotFound
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla.models import checkpoints, events, runs, tasks
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import count_tasks, wait_until, worker_thread

DEADLINE = 15.0  # seconds: generous upper bound for any condition to become true


# -- helpers -------------------------------------------------------------------


def task_state(engine: Engine, task_id: uuid.UUID) -> str | None:
    with engine.connect() as conn:
        return conn.scalar(select(tasks.c.state).where(tasks.c.task_id == task_id))


def count_where(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


@pytest.fixture
def fake_clock(clean_db: Engine) -> Iterator[FakeClock]:
    clock = FakeClock(clean_db)
    yield clock
    clock.close()


# -- child tasks ---------------------------------------------------------------


def register_child(app: Absurd) -> None:
    @app.register_task("child")
    def child(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if params.get("fail"):
            raise RuntimeError(f"child {params['n']} failed")
        return {"doubled": params["n"] * 2}


def test_parent_suspends_until_child_completes(app: Absurd, clean_db: Engine) -> None:
    register_child(app)
    parent_runs: list[int] = []

    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        parent_runs.append(ctx.attempt)
        child = ctx.spawn("child", {"n": params["n"]})
        snapshot = ctx.await_task_result(child.task_id)
        return {"child": str(child.task_id), "state": snapshot.state, "result": snapshot.result}

    spawned = app.spawn("parent", {"n": 21})

    # 1. The parent spawns the child and suspends: its run is released, not held.
    assert app.work_batch(batch_size=1) == 1
    assert task_state(clean_db, spawned.task_id) == "sleeping"
    with clean_db.connect() as conn:
        child_row = conn.execute(
            select(tasks.c.task_id, tasks.c.state, tasks.c.headers).where(
                tasks.c.task_name == "child"
            )
        ).one()
        parent_run = conn.execute(
            select(runs.c.state, runs.c.claimed_by).where(runs.c.run_id == spawned.run_id)
        ).one()
    assert child_row.state == "pending"
    assert parent_run.state == "sleeping" and parent_run.claimed_by is None
    assert child_row.headers["absurd.parent_task_id"] == str(spawned.task_id)

    # 2. The child runs; finishing it wakes the parent in the same transaction.
    assert app.work_batch(batch_size=1) == 1
    assert task_state(clean_db, child_row.task_id) == "completed"
    assert task_state(clean_db, spawned.task_id) == "pending"

    # 3. The parent replays and returns the child's result.
    assert app.work_batch(batch_size=1) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == {
        "child": str(child_row.task_id),
        "state": "completed",
        "result": {"doubled": 42},
    }
    # Suspension is not a new attempt.
    assert parent_runs == [1, 1]
    assert count_where(clean_db, runs, runs.c.task_id == spawned.task_id) == 1


def test_child_failure_is_reported_to_the_parent(app: Absurd) -> None:
    register_child(app)

    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        child = ctx.spawn("child", {"n": 1, "fail": True}, max_attempts=1)
        snapshot = ctx.await_task_result(child.task_id)
        return {"state": snapshot.state, "failure": snapshot.failure, "result": snapshot.result}

    spawned = app.spawn("parent", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result["state"] == "failed"
    assert snapshot.result["result"] is None
    assert snapshot.result["failure"]["name"] == "RuntimeError"
    assert snapshot.result["failure"]["message"] == "child 1 failed"


def test_await_of_an_already_finished_child_returns_at_once(app: Absurd, clean_db: Engine) -> None:
    register_child(app)
    awaited: list[Any] = []

    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> Any:
        child = ctx.spawn("child", {"n": 5})
        ctx.await_event("go")  # the child finishes while the parent waits here
        snapshot = ctx.await_task_result(child.task_id)
        awaited.append(snapshot)
        return snapshot.result

    spawned = app.spawn("parent", {})
    assert app.work_batch(batch_size=1) == 1  # parent: spawn, then wait for "go"
    assert app.work_batch(batch_size=1) == 1  # child completes
    waiting = app.fetch_task_result(spawned.task_id)
    assert waiting is not None and waiting.state == "sleeping"
    assert app.work_batch() == 0  # the child's completion did not wake the parent
    app.emit_event("go")

    # One claim: the parent replays, finds the child finished and completes
    # without suspending again.
    assert app.work_batch(batch_size=1) == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == {"doubled": 10}
    assert len(awaited) == 1
    assert app.work_batch() == 0


def test_awaiting_a_task_that_is_not_a_child_fails_the_run(app: Absurd) -> None:
    @app.register_task("bystander")
    def bystander(params: Any, ctx: Any) -> str:
        return "not yours"

    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> Any:
        return ctx.await_task_result(params["other"]).result

    other = app.spawn("bystander", {})
    run_until_idle(app)
    spawned = app.spawn("parent", {"other": str(other.task_id)}, max_attempts=1)
    run_until_idle(app)

    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None
    assert snapshot.failure["name"] == InvalidArgument.__name__
    assert "not a child" in snapshot.failure["message"]


def test_awaiting_an_unknown_task_fails_the_run(app: Absurd) -> None:
    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> Any:
        return ctx.await_task_result(uuid.uuid4())

    spawned = app.spawn("parent", {}, max_attempts=1)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.failure is not None and snapshot.failure["name"] == TaskNotFound.__name__


def test_ctx_spawn_is_idempotent_across_replays(app: Absurd, clean_db: Engine) -> None:
    register_child(app)
    seen: list[tuple[int, uuid.UUID]] = []

    @app.register_task("parent")
    def parent(params: dict[str, Any], ctx: Any) -> str:
        child = ctx.spawn("child", {"n": 1})
        seen.append((ctx.attempt, child.task_id))
        ctx.await_event("go")  # replay 1: suspension and wake-up
        if ctx.attempt == 1:
            raise RuntimeError("crash after spawning")  # replay 2: a new attempt
        return str(child.task_id)

    spawned = app.spawn("parent", {}, max_attempts=2)
    assert app.work_batch(batch_size=1) == 1
    app.emit_event("go")
    run_until_idle(app)

    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed", snapshot
    assert [attempt for attempt, _ in seen] == [1, 1, 2]
    assert len({child for _, child in seen}) == 1
    assert snapshot.result == str(seen[0][1])
    assert count_tasks(clean_db, task_name="child") == 1


# -- suspension signals are not Exceptions --------------------------------------


@pytest.mark.parametrize("kind", ["sleep_for", "sleep_until", "await_event", "await_task_result"])
def test_except_exception_does_not_swallow_suspension(
    app: Absurd, clean_db: Engine, kind: str
) -> None:
    register_child(app)
    swallowed: list[str] = []

    @app.register_task("stubborn")
    def stubborn(params: dict[str, Any], ctx: Any) -> str:
        try:
            if kind == "sleep_for":
                ctx.sleep_for("nap", 3600)
            elif kind == "sleep_until":
                with clean_db.connect() as conn:
                    now = conn.scalar(text("SELECT absurd.now()"))
                ctx.sleep_until("nap", now + timedelta(hours=1))
            elif kind == "await_event":
                ctx.await_event("never-emitted")
            else:
                child = ctx.spawn("child", {"n": 1})
                ctx.await_task_result(child.task_id)
        except Exception as exc:
            swallowed.append(repr(exc))
            return "swallowed"
        return "resumed"

    spawned = app.spawn("stubborn", {})
    assert app.work_batch(batch_size=1) == 1
    assert swallowed == []
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "sleeping"


# -- failures --------------------------------------------------------------------


def test_failure_reason_has_name_message_and_traceback(app: Absurd, clean_db: Engine) -> None:
    @app.register_task("explode")
    def explode_handler(params: dict[str, Any], ctx: Any) -> None:
        raise ValueError(f"kaboom {params['n']}")

    spawned = app.spawn("explode", {"n": 42}, max_attempts=1)
    assert run_until_idle(app) == 1

    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "failed"
    assert snapshot.result is None
    failure = snapshot.failure
    assert failure is not None
    assert failure["name"] == "ValueError"
    assert failure["message"] == "kaboom 42"
    assert "explode_handler" in failure["traceback"]
    assert "ValueError: kaboom 42" in failure["traceback"]
    assert count_where(clean_db, runs, runs.c.task_id == spawned.task_id) == 1


# -- start_worker / stop_worker --------------------------------------------------


def test_stop_worker_lets_the_in_flight_task_finish_and_claims_nothing_new(
    app: Absurd, clean_db: Engine
) -> None:
    started = threading.Event()
    release = threading.Event()

    @app.register_task("blocking")
    def blocking(params: dict[str, Any], ctx: Any) -> str:
        started.set()
        if not release.wait(DEADLINE):
            raise RuntimeError("never released")
        return f"finished {params['n']}"

    first = app.spawn("blocking", {"n": 1})
    thread_errors: list[BaseException] = []

    def target() -> None:
        try:
            app.start_worker(concurrency=1, poll_interval=0.05)
        except BaseException as exc:
            thread_errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        assert started.wait(DEADLINE), "the first task never started"
        app.stop_worker()
        # Spawned after the stop: the only slot is busy now and the worker
        # claims nothing once stopping, so this one must stay pending.
        second = app.spawn("blocking", {"n": 2})
        assert thread.is_alive(), "start_worker returned with a task in flight"
        release.set()
        thread.join(DEADLINE)
        assert not thread.is_alive(), "start_worker did not return after stop_worker"
    finally:
        release.set()
        app.stop_worker()
        thread.join(DEADLINE)
    assert thread_errors == []

    done = app.fetch_task_result(first.task_id)
    assert done is not None and done.state == "completed" and done.result == "finished 1"
    with clean_db.connect() as conn:
        untouched = conn.execute(
            select(runs.c.state, runs.c.claimed_by, runs.c.started_at).where(
                runs.c.run_id == second.run_id
            )
        ).one()
    assert tuple(untouched) == ("pending", None, None)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_a_main_thread_worker_gracefully(app: Absurd, signum: signal.Signals) -> None:
    started = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    problems: list[str] = []

    @app.register_task("blocking")
    def blocking(params: dict[str, Any], ctx: Any) -> str:
        started.set()
        if not release.wait(DEADLINE):
            raise RuntimeError("never released")
        return "finished"

    spawned = app.spawn("blocking", {})
    sentinel_hits: list[int] = []

    def sentinel(sig: int, frame: object) -> None:  # must be restored, and not called
        sentinel_hits.append(sig)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, sentinel)

    def helper() -> None:
        if not started.wait(DEADLINE):
            problems.append("the task never started")
            app.stop_worker()
            return
        signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]
        # Release the task only once the worker has seen the signal, so the
        # task is in flight during shutdown. (_workers: the client's live workers.)
        deadline = time.monotonic() + DEADLINE
        while True:
            workers = app._workers.running()
            if workers and all(worker.stopping for worker in workers):
                break
            if sentinel_hits or time.monotonic() > deadline:
                problems.append("the worker did not react to the signal")
                break
            time.sleep(0.005)
        release.set()
        if not returned.wait(DEADLINE):
            problems.append("start_worker did not return after the signal")
            app.stop_worker()

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    try:
        app.start_worker(concurrency=1, poll_interval=0.05)
        returned.set()
        handlers_after = {sig: signal.getsignal(sig) for sig in previous}
    finally:
        returned.set()
        release.set()
        thread.join(DEADLINE)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    assert problems == []
    assert sentinel_hits == []
    assert handlers_after == {signal.SIGTERM: sentinel, signal.SIGINT: sentinel}
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == "finished"


@pytest.mark.parametrize("handle_signals", [True, False])
def test_handle_signals_false_leaves_the_hosts_handlers_alone(
    app: Absurd, handle_signals: bool
) -> None:
    """A host that owns SIGTERM/SIGINT (a web server) passes ``handle_signals=False``:
    while the worker runs in the main thread, the host's handlers stay in place."""
    seen: list[Any] = []

    @app.register_task("look")
    def look(params: dict[str, Any], ctx: Any) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))
        app.stop_worker()

    def host(sig: int, frame: object) -> None:
        pass

    app.spawn("look", {})
    previous = signal.signal(signal.SIGTERM, host)
    try:
        app.start_worker(poll_interval=0.05, handle_signals=handle_signals)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert after is host
    assert (seen[0] is host) is not handle_signals


@contextlib.contextmanager
def idle_listening_worker(app: Absurd, engine: Engine, **kwargs: Any) -> Iterator[list[int]]:
    """A worker thread with ``poll_interval=30`` that is idle and LISTENing.

    Yields the rows returned by each of its claims on the default queue, in
    order: ``[0, 0]`` at first (the first claim, and the one the listener
    triggers once connected, to catch anything committed before it listened).
    Once idle, its next claim can only come from a notification (or from a
    poll 30 s later).
    """
    claims: list[int] = []

    def record(conn: Any, cursor: Any, stmt: Any, params: Any, context: Any, many: Any) -> None:
        compiled = getattr(context, "compiled", None)
        is_claim = compiled is not None and compiled.statement is sqlw.claim
        if is_claim and params.get("queue") == app.queue_name:
            claims.append(cursor.rowcount)

    def listening() -> bool:
        with engine.connect() as conn:
            found = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query ILIKE 'LISTEN %absurd.' || :queue || '%'"
                ),
                {"queue": app.queue_name},
            )
        return bool(found)

    event.listen(engine, "after_cursor_execute", record)
    try:
        with worker_thread(app, poll_interval=30, **kwargs):
            wait_until(lambda: len(claims) >= 2 and listening(), "worker idle and listening")
            assert claims == [0, 0]
            yield claims
    finally:
        event.remove(engine, "after_cursor_execute", record)


def test_notify_wakes_an_idle_worker_without_waiting_for_a_poll(
    app: Absurd, clean_db: Engine
) -> None:
    @app.register_task("ping")
    def ping(params: Any, ctx: Any) -> str:
        return "pong"

    with idle_listening_worker(app, clean_db) as claims:
        spawned = app.spawn("ping", {})
        began = time.monotonic()
        snapshot = app.await_task_result(spawned.task_id, timeout=5)
        elapsed = time.monotonic() - began
        # The idle worker's very next claim found the task: the NOTIFY woke it,
        # not a poll (the next one was due 30 s later).
        assert claims[:3] == [0, 0, 1]
    assert snapshot.state == "completed" and snapshot.result == "pong"
    assert elapsed < 5


def test_listener_reconnects_after_its_connection_is_killed(app: Absurd, clean_db: Engine) -> None:
    @app.register_task("ping")
    def ping(params: Any, ctx: Any) -> str:
        return "pong"

    listen_pids = text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query ILIKE 'LISTEN %'"
    )
    with idle_listening_worker(app, clean_db):
        with clean_db.connect() as conn:
            (old_pid,) = conn.scalars(listen_pids).all()
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": old_pid})

        def relistening() -> bool:
            with clean_db.connect() as conn:
                return [*conn.scalars(listen_pids)] not in ([], [old_pid])

        wait_until(relistening, "the listener reconnected")
        spawned = app.spawn("ping", {})
        snapshot = app.await_task_result(spawned.task_id, timeout=5)  # poll_interval is 30 s
    assert snapshot.result == "pong"


def test_notify_wakes_a_parent_whose_child_ran_on_another_queue(
    app: Absurd, clean_db: Engine
) -> None:
    app.create_queue("other")
    register_child(app)

    @app.register_task("parent")
    def parent(params: Any, ctx: Any) -> Any:
        child = ctx.spawn("child", {"n": 4}, queue="other")
        return ctx.await_task_result(child.task_id).result

    with idle_listening_worker(app, clean_db) as claims:
        spawned = app.spawn("parent", {})
        # Claims: [0, 0] idle, [1] the parent (it suspends), then one empty claim
        # after its slot freed (two if the handler finished before the loop had
        # looked at its slot again: the freed slot's wake-up is then still pending).
        wait_until(
            lambda: claims[:3] == [0, 0, 1] and len(claims) >= 4 and not any(claims[3:]),
            "the parent ran and the worker is idle again",
        )
        assert task_state(clean_db, spawned.task_id) == "sleeping"
        assert app.work_batch(queue="other") == 1  # the child, inline, on its own queue
        # Woken in the database; the NOTIFY may already have had it claimed.
        assert task_state(clean_db, spawned.task_id) in ("pending", "running", "completed")
        snapshot = app.await_task_result(spawned.task_id, timeout=3)
    assert snapshot.state == "completed" and snapshot.result == {"doubled": 8}


# -- concurrency -------------------------------------------------------------------


def test_concurrency_runs_that_many_handlers_at_once(app: Absurd) -> None:
    barrier = threading.Barrier(4, timeout=10)

    @app.register_task("meet")
    def meet(params: dict[str, Any], ctx: Any) -> int:
        barrier.wait()  # only passes if all four handlers are running together
        return int(params["i"])

    spawned = app.spawn_many([SpawnRequest("meet", {"i": i}, max_attempts=1) for i in range(4)])
    with worker_thread(app, concurrency=4, poll_interval=0.05):
        snapshots = [app.await_task_result(s.task_id, timeout=DEADLINE) for s in spawned]
    assert [(s.state, s.result) for s in snapshots] == [("completed", i) for i in range(4)], [
        s.failure for s in snapshots
    ]


def test_two_workers_run_each_task_exactly_once(app: Absurd, clean_db: Engine) -> None:
    total = 200
    lock = threading.Lock()
    executions: collections.Counter[uuid.UUID] = collections.Counter()
    active: set[uuid.UUID] = set()
    overlaps: list[uuid.UUID] = []
    apps = [app, Absurd(clean_db)]

    for client in apps:

        @client.register_task("count")
        def count(params: dict[str, Any], ctx: Any) -> int:
            with lock:
                if ctx.task_id in active:
                    overlaps.append(ctx.task_id)
                active.add(ctx.task_id)
                executions[ctx.task_id] += 1
            try:
                return int(ctx.step("square", lambda: params["i"] ** 2))
            finally:
                with lock:
                    active.discard(ctx.task_id)

    spawned = app.spawn_many([SpawnRequest("count", {"i": i}) for i in range(total)])

    def completed() -> bool:
        return count_where(clean_db, tasks, tasks.c.state == "completed") == total

    with (
        worker_thread(apps[0], worker_id="w1", concurrency=4, poll_interval=0.05),
        worker_thread(apps[1], worker_id="w2", concurrency=4, poll_interval=0.05),
    ):
        wait_until(completed, f"all {total} tasks completed", timeout=60)

    assert overlaps == []
    assert len(executions) == total
    assert set(executions.values()) == {1}
    assert set(executions) == {s.task_id for s in spawned}
    with clean_db.connect() as conn:
        results = dict(conn.execute(select(tasks.c.params["i"].as_integer(), tasks.c.result)).all())
        run_count = conn.scalar(select(func.count()).select_from(runs))
    assert results == {i: i * i for i in range(total)}
    assert run_count == total  # no retries, no second attempts


# -- work_batch ------------------------------------------------------------------


def test_work_batch_honours_batch_size(app: Absurd, clean_db: Engine) -> None:
    ran: list[int] = []

    @app.register_task("noop")
    def noop(params: dict[str, Any], ctx: Any) -> None:
        ran.append(params["i"])

    app.spawn_many([SpawnRequest("noop", {"i": i}) for i in range(5)])
    assert app.work_batch(batch_size=2) == 2
    assert ran == [0, 1]
    assert count_tasks(clean_db, state="pending") == 3
    assert app.work_batch(batch_size=10) == 3
    assert app.work_batch(batch_size=10) == 0
    assert ran == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_work_batch_claims_fifo_by_availability(
    app: Absurd, clean_db: Engine, batch_size: int
) -> None:
    order: list[str] = []

    @app.register_task("record")
    def record(params: dict[str, Any], ctx: Any) -> None:
        order.append(params["name"])

    with clean_db.connect() as conn:
        now = conn.scalar(text("SELECT absurd.now()"))
    names = ["a", "b", "c", "d", "e"]
    # Spawned a..e, but available e first: each is a minute older than the one before.
    for minutes, name in enumerate(names, start=1):
        app.spawn("record", {"name": name}, run_after=now - timedelta(minutes=minutes))
    app.spawn("record", {"name": "later"}, run_after=now + timedelta(hours=1))

    while app.work_batch(batch_size=batch_size):
        pass
    assert order == list(reversed(names))


# -- cleanup ---------------------------------------------------------------------


def test_cleanup_deletes_old_finished_tasks_and_events_only(
    app: Absurd, clean_db: Engine, fake_clock: FakeClock
) -> None:
    @app.register_task("work")
    def work(params: dict[str, Any], ctx: Any) -> Any:
        if params.get("fail"):
            raise RuntimeError("no")
        if params.get("wait"):
            ctx.await_event("never-emitted")
        return ctx.step("one", lambda: params["label"])

    old_done = app.spawn("work", {"label": "old-done"})
    old_failed = app.spawn("work", {"label": "old-failed", "fail": True}, max_attempts=1)
    old_sleeping = app.spawn("work", {"label": "old-sleeping", "wait": True})
    old_cancelled = app.spawn("work", {"label": "old-cancelled"}, run_after=3600)
    old_pending = app.spawn("work", {"label": "old-pending"}, run_after=timedelta(days=365))
    app.cancel_task(old_cancelled.task_id)
    app.emit_event("old-event", {"n": 1})
    run_until_idle(app)
    assert task_state(clean_db, old_done.task_id) == "completed"
    assert task_state(clean_db, old_failed.task_id) == "failed"
    assert task_state(clean_db, old_sleeping.task_id) == "sleeping"

    fake_clock.advance(timedelta(days=8))
    new_done = app.spawn("work", {"label": "new-done"})
    run_until_idle(app)
    app.emit_event("new-event", {"n": 2})

    old_finished = [old_done.task_id, old_failed.task_id, old_cancelled.task_id]
    assert count_where(clean_db, runs, runs.c.task_id.in_(old_finished)) == 3
    assert count_where(clean_db, checkpoints, checkpoints.c.task_id == old_done.task_id) == 1

    # limit bounds each call; call again until both counts are below it.
    assert app.cleanup(older_than=timedelta(days=7), limit=2) == (2, 1)
    assert app.cleanup(older_than=7 * 86400, limit=2) == (1, 0)
    assert app.cleanup(older_than=7 * 86400, limit=2) == (0, 0)

    with clean_db.connect() as conn:
        left = set(conn.scalars(select(tasks.c.task_id)))
        left_events = set(conn.scalars(select(events.c.event_name)))
    assert left == {old_sleeping.task_id, old_pending.task_id, new_done.task_id}
    assert count_where(clean_db, runs, runs.c.task_id.in_(old_finished)) == 0
    assert count_where(clean_db, checkpoints, checkpoints.c.task_id.in_(old_finished)) == 0
    # Kept: the recent event, and the live waiter's placeholder row.
    assert left_events == {"new-event", "never-emitted"}
    snapshot = app.fetch_task_result(new_done.task_id)
    assert snapshot is not None and snapshot.result == "new-done"

    # Everything finished is old enough with a zero cutoff; live tasks still stay.
    fake_clock.advance(1)
    assert app.cleanup(older_than=0) == (1, 1)
    assert count_tasks(clean_db) == 2


def test_cleanup_keeps_the_children_of_a_live_parent(
    app: Absurd, clean_db: Engine, fake_clock: FakeClock
) -> None:
    register_child(app)

    @app.register_task("parent")
    def parent(params: Any, ctx: Any) -> Any:
        child = ctx.spawn("child", {"n": 3})
        ctx.sleep_for("a-long-nap", timedelta(days=8))
        return ctx.await_task_result(child.task_id).result

    spawned = app.spawn("parent", {}, max_attempts=1)
    run_until_idle(app)  # the parent sleeps; the child completes at once
    assert task_state(clean_db, spawned.task_id) == "sleeping"
    fake_clock.advance(timedelta(days=8))

    # The child finished 8 days ago, but its parent is live: the child and its
    # "$task:<id>" event stay, and nothing else is old enough.
    assert app.cleanup(older_than=timedelta(days=7)) == (0, 0)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None
    assert (snapshot.state, snapshot.result) == ("completed", {"doubled": 6}), snapshot.failure


# -- headers and hooks -------------------------------------------------------------


def test_ctx_headers_are_read_only_and_carry_spawn_headers(app: Absurd) -> None:
    @app.register_task("show")
    def show(params: Any, ctx: Any) -> dict[str, Any]:
        try:
            ctx.headers["injected"] = True
        except TypeError:
            writable = False
        else:
            writable = True
        return {"headers": dict(ctx.headers), "writable": writable}

    spawned = app.spawn("show", {}, headers={"trace_id": "t-1", "tenant": 7})
    bare = app.spawn("show", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == {
        "headers": {"trace_id": "t-1", "tenant": 7},
        "writable": False,
    }
    bare_snapshot = app.fetch_task_result(bare.task_id)
    assert bare_snapshot is not None and bare_snapshot.result == {"headers": {}, "writable": False}


def test_hooks_rewrite_spawns_and_wrap_handlers(app: Absurd, clean_db: Engine) -> None:
    wrapped: list[tuple[str, int]] = []

    def before_spawn(request: SpawnRequest) -> SpawnRequest:
        headers = {"trace_id": "trace-1", **(request.headers or {})}
        return dataclasses.replace(request, headers=headers)

    def wrap_task(ctx: Any, run: Callable[[], Any]) -> Any:
        wrapped.append((ctx.task_name, ctx.attempt))
        try:
            return {"wrapped": run()}
        except Exception as exc:  # must not see suspension signals
            return {"swallowed": repr(exc)}

    hooked = Absurd(clean_db, hooks=Hooks(before_spawn=before_spawn, wrap_task=wrap_task))

    @hooked.register_task("child")
    def child(params: Any, ctx: Any) -> dict[str, Any]:
        return dict(ctx.headers)

    @hooked.register_task("parent")
    def parent(params: Any, ctx: Any) -> dict[str, Any]:
        spawned_child = ctx.spawn("child", {})
        snapshot = ctx.await_task_result(spawned_child.task_id)
        return {"mine": dict(ctx.headers), "child": snapshot.result}

    spawned = hooked.spawn("parent", {}, headers={"tenant": 7})
    assert hooked.work_batch(batch_size=1) == 1
    assert task_state(clean_db, spawned.task_id) == "sleeping"  # the hook saw no signal
    run_until_idle(hooked)

    snapshot = hooked.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == {
        "wrapped": {
            "mine": {"trace_id": "trace-1", "tenant": 7},
            "child": {
                "wrapped": {
                    "trace_id": "trace-1",
                    "absurd.parent_task_id": str(spawned.task_id),
                }
            },
        }
    }
    assert wrapped == [("parent", 1), ("child", 1), ("parent", 1)]
