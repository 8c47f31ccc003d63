"""Connections that die: real connection loss against the real PostgreSQL.

Backends are killed with ``pg_terminate_backend`` from another connection and
the test waits until ``pg_stat_activity`` no longer lists them; no sleep stands
in for a condition.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, event, select, text
from sqlalchemy.exc import DBAPIError

from absurd_sqla import Absurd
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._retry import WRITE_RETRY_BUDGET, is_disconnect, reconnect_delay
from absurd_sqla.context import TaskContext
from absurd_sqla.errors import CancelledTask, LeaseLost, SuspendTask, TaskSignal
from absurd_sqla.models import runs
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import (
    Outcome,
    async_app_for,
    run_async,
    run_async_worker_until,
    run_states,
    task_state,
    wait_until,
    worker_thread,
)

# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def url_app(clean_db: Engine, database_url: str) -> Iterator[Absurd]:
    """An app built from a URL (so absurd_sqla makes its engine), whose backends
    carry an application_name of their own in ``pg_stat_activity``."""
    name = f"absurd-test-{uuid.uuid4().hex[:8]}"
    app = Absurd(f"{database_url}?application_name={name}")
    app.create_queue()
    yield app
    app.close()


def app_backends(observer: Engine, app: Absurd) -> list[int]:
    """The pids of the app's backends, as the server lists them."""
    name = app.engine.url.query["application_name"]
    with observer.connect() as conn:
        return list(
            conn.scalars(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": name},
            )
        )


def terminate(observer: Engine, pids: list[int]) -> None:
    """Kill the backends from another connection and wait until they are gone."""
    with observer.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def gone() -> bool:
        with observer.connect() as conn:
            alive = conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": pids},
            )
        return alive == 0

    wait_until(gone, f"backends {pids} terminated")


# -- A: an idle pooled connection that died --------------------------------------------


def test_an_idle_pooled_connection_that_died_costs_no_attempt(
    url_app: Absurd, clean_db: Engine
) -> None:
    """An engine absurd_sqla builds from a URL looks at a pooled connection
    before handing it out: one that died while idle is replaced, not handed to
    a task. ``transaction_step`` is not retried on a lost connection, so only
    that look can save this ``max_attempts=1`` task."""
    killed: list[int] = []

    @url_app.register_task("innocent", max_attempts=1)
    def innocent(params: Any, ctx: TaskContext) -> Any:
        # The claim has returned its connection: every pooled one is idle now.
        killed.extend(app_backends(clean_db, url_app))
        terminate(clean_db, killed)
        return ctx.transaction_step("write", lambda s: s.execute(text("SELECT 42")).scalar_one())

    spawned = url_app.spawn("innocent")
    assert run_until_idle(url_app) == 1
    assert killed, "the app's pool held no idle connection to kill"
    assert run_states(clean_db, spawned.task_id) == ["completed"]
    assert task_state(clean_db, spawned.task_id) == "completed"
    snapshot = url_app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == 42


# -- B: a write that loses its connection is retried -------------------------------------


class Fault:
    """Breaks the first execution of one statement on ``app``'s engine, and
    counts its executions: ``kill`` terminates the connection's backend just
    before the statement is sent; ``lose_answer`` lets the statement run (and
    commit: these run in autocommit) and then breaks the connection before
    its answer is read, as a connection dying at that moment would."""

    def __init__(
        self,
        app: Absurd,
        observer: Engine,
        statement: Any,
        *,
        kill: bool = False,
        lose_answer: bool = False,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        self.statement = statement
        self.observer = observer
        self.kill = kill
        self.lose_answer = lose_answer
        self.meanwhile = meanwhile
        self.calls = 0
        self.pids: list[int] = []
        event.listen(app.engine, "before_cursor_execute", self._before)
        event.listen(app.engine, "after_cursor_execute", self._after)

    def _ours(self, context: Any) -> bool:
        return context is not None and context.invoked_statement is self.statement

    def _before(self, conn: Connection, cursor: Any, stmt: str, *args: Any) -> None:
        context = args[-2]
        if not self._ours(context):
            return
        self.calls += 1
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        self.pids.append(pid)
        if self.kill and self.calls == 1:
            if self.meanwhile is not None:
                self.meanwhile()
            terminate(self.observer, [pid])

    def _after(self, conn: Connection, cursor: Any, stmt: str, *args: Any) -> None:
        context = args[-2]
        if not (self._ours(context) and self.lose_answer and self.calls == 1):
            return
        if self.meanwhile is not None:
            self.meanwhile()
        conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
        raise psycopg.OperationalError("server closed the connection unexpectedly")


def register_probe(app: Absurd, body: Callable[[TaskContext], Any], signals: list[Any]) -> None:
    """Task "probe" runs ``body``; ``signals`` gets the signal it stopped with, if any."""

    @app.register_task("probe", max_attempts=2)
    def probe(params: Any, ctx: TaskContext) -> Any:
        try:
            return body(ctx)
        except TaskSignal as signal_:
            signals.append(signal_)
            raise


def fail_first_attempt(ctx: TaskContext) -> str:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "second"


# statement -> (what the task does, its run states, its result)
KILLED: dict[str, tuple[Any, Callable[[TaskContext], Any], list[str], Any]] = {
    "complete_run": (sqlw.complete_run, lambda ctx: {"ok": True}, ["completed"], {"ok": True}),
    "fail_run": (sqlw.fail_run, fail_first_attempt, ["failed", "completed"], "second"),
    "write_checkpoint": (
        sqlw.write_checkpoint,
        lambda ctx: ctx.step("one", lambda: 1) + 1,
        ["completed"],
        2,
    ),
    "heartbeat": (sqlw.heartbeat, lambda ctx: ctx.heartbeat() or "beat", ["completed"], "beat"),
    "sleep": (sqlw.sleep, lambda ctx: ctx.sleep_for("nap", 0) or "woke", ["completed"], "woke"),
    "await_event": (
        sqlw.await_event,
        lambda ctx: ctx.await_event("go"),  # emitted before the task runs
        ["completed"],
        "payload",
    ),
}


@pytest.mark.parametrize("write", sorted(KILLED))
def test_a_write_whose_connection_is_killed_is_retried_in_the_same_attempt(
    url_app: Absurd, clean_db: Engine, write: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's backend is terminated just before the write is sent (a
    restart, a failover): the write is retried on a new connection, and the
    attempt goes on. No lease has to expire, no attempt is spent."""
    statement, body, states, result = KILLED[write]
    signals: list[Any] = []
    register_probe(url_app, body, signals)
    url_app.emit_event("go", "payload")
    fault = Fault(url_app, clean_db, statement, kill=True)
    spawned = url_app.spawn("probe")
    with caplog.at_level(logging.WARNING, logger="absurd_sqla"):
        run_until_idle(url_app)
    assert fault.calls == 2, "the write was not retried"
    assert fault.pids[1] != fault.pids[0], "the retry did not use a new connection"
    assert run_states(clean_db, spawned.task_id) == states
    snapshot = url_app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == result
    assert not signals
    with clean_db.connect() as conn:
        reasons = conn.scalars(
            select(runs.c.failure_reason["name"].astext).where(
                runs.c.task_id == spawned.task_id, runs.c.state == "failed"
            )
        ).all()
    assert "$ClaimTimeout" not in reasons
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_an_error_in_the_statement_is_not_retried(url_app: Absurd, clean_db: Engine) -> None:
    """Only a lost connection is retried. A statement cancelled by the server
    (SQLSTATE 57014, a sibling of the 57P shutdown codes) raises at once: the
    outcome write runs once."""
    holders: list[Connection] = []

    @url_app.register_task("locked", max_attempts=1)
    def locked(params: Any, ctx: TaskContext) -> str:
        # Hold the run's row lock, so that the completion waits for it.
        holder = clean_db.connect()
        holders.append(holder)
        holder.execute(select(runs.c.run_id).where(runs.c.run_id == ctx.run_id).with_for_update())
        return "done"

    fault = Fault(url_app, clean_db, sqlw.complete_run)
    spawned = url_app.spawn("locked")
    worker = Outcome(lambda: run_until_idle(url_app))
    try:
        pid = wait_until(lambda: waiting_on_lock(clean_db, fault.pids), "the completion waits")
        with clean_db.connect() as conn:
            conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
        worker.join()
    finally:
        for holder in holders:
            holder.close()
    assert isinstance(worker.error, DBAPIError)
    assert isinstance(worker.error.orig, psycopg.errors.QueryCanceled)
    assert not is_disconnect(worker.error)
    assert fault.calls == 1, "a cancelled statement was retried"
    assert run_states(clean_db, spawned.task_id) == ["running"]


def waiting_on_lock(observer: Engine, pids: list[int]) -> int | None:
    with observer.connect() as conn:
        result: int | None = conn.scalar(
            text(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids) "
                "AND wait_event_type = 'Lock'"
            ),
            {"pids": list(pids)},
        )
        return result


# -- B: a write that committed, but whose answer was lost ----------------------------------


def test_a_completion_that_committed_before_its_answer_was_lost_is_ours(
    url_app: Absurd, clean_db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The retried complete_run finds the run completed, with our result: that
    is our own first attempt, not a lost lease, and nothing is discarded."""
    register_probe(url_app, lambda ctx: {"ok": 1}, [])
    fault = Fault(url_app, clean_db, sqlw.complete_run, lose_answer=True)
    spawned = url_app.spawn("probe")
    with caplog.at_level(logging.WARNING, logger="absurd_sqla"):
        run_until_idle(url_app)
    assert fault.calls == 2
    assert not [r for r in caplog.records if "discarded" in r.getMessage()]
    assert run_states(clean_db, spawned.task_id) == ["completed"]


def test_a_failure_that_committed_before_its_answer_was_lost_is_ours(
    url_app: Absurd, clean_db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    register_probe(url_app, fail_first_attempt, [])
    fault = Fault(url_app, clean_db, sqlw.fail_run, lose_answer=True)
    spawned = url_app.spawn("probe")
    with caplog.at_level(logging.WARNING, logger="absurd_sqla"):
        run_until_idle(url_app)
    assert fault.calls == 2
    assert not [r for r in caplog.records if "could not record" in r.getMessage()]
    assert run_states(clean_db, spawned.task_id) == ["failed", "completed"]


@pytest.mark.parametrize(
    ("statement", "body"),
    [
        pytest.param(sqlw.sleep, lambda ctx: ctx.sleep_for("nap", 3600), id="sleep"),
        pytest.param(sqlw.await_event, lambda ctx: ctx.await_event("never"), id="await_event"),
    ],
)
def test_a_suspension_that_committed_before_its_answer_was_lost_is_ours(
    url_app: Absurd, clean_db: Engine, statement: Any, body: Callable[[TaskContext], Any]
) -> None:
    """The retried sleep/await finds the run already sleeping, as our first
    attempt left it: the handler suspends, it has not lost its lease."""
    signals: list[Any] = []
    register_probe(url_app, body, signals)
    fault = Fault(url_app, clean_db, statement, lose_answer=True)
    spawned = url_app.spawn("probe")
    run_until_idle(url_app)
    assert fault.calls == 2
    assert [type(s) for s in signals] == [SuspendTask]
    assert run_states(clean_db, spawned.task_id) == ["sleeping"]


def test_a_checkpoint_that_committed_before_its_answer_was_lost_is_ours(
    url_app: Absurd, clean_db: Engine
) -> None:
    """The checkpoint landed, then the task was cancelled before the retry: the
    step is done (its checkpoint is ours), and the cancellation stops the
    handler at its next write, not at the step that was recorded before it."""
    signals: list[Any] = []
    steps: list[int] = []

    def body(ctx: TaskContext) -> Any:
        steps.append(ctx.step("one", lambda: 1))
        ctx.heartbeat()
        return "unreachable"

    register_probe(url_app, body, signals)
    spawned = url_app.spawn("probe")
    Fault(
        url_app,
        clean_db,
        sqlw.write_checkpoint,
        lose_answer=True,
        meanwhile=lambda: url_app.cancel_task(spawned.task_id),
    )
    run_until_idle(url_app)
    assert steps == [1]
    assert [type(s) for s in signals] == [CancelledTask]
    assert task_state(clean_db, spawned.task_id) == "cancelled"


@pytest.mark.parametrize(
    ("statement", "body"),
    [
        pytest.param(sqlw.complete_run, lambda ctx: "result", id="complete_run"),
        pytest.param(sqlw.fail_run, fail_first_attempt, id="fail_run"),
        pytest.param(sqlw.write_checkpoint, lambda ctx: ctx.step("one", lambda: 1), id="step"),
        pytest.param(sqlw.sleep, lambda ctx: ctx.sleep_for("nap", 3600), id="sleep"),
        pytest.param(sqlw.await_event, lambda ctx: ctx.await_event("never"), id="await_event"),
    ],
)
def test_a_retry_that_finds_the_run_cancelled_does_not_take_it_for_its_own(
    url_app: Absurd,
    clean_db: Engine,
    statement: Any,
    body: Callable[[TaskContext], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first attempt never reached the server, and the task was cancelled
    before the retry: the retry is fenced, and that is reported as such."""
    signals: list[Any] = []
    register_probe(url_app, body, signals)
    spawned = url_app.spawn("probe")
    fault = Fault(
        url_app,
        clean_db,
        statement,
        kill=True,
        meanwhile=lambda: url_app.cancel_task(spawned.task_id),
    )
    with caplog.at_level(logging.WARNING, logger="absurd_sqla"):
        run_until_idle(url_app)
    assert fault.calls == 2
    assert task_state(clean_db, spawned.task_id) == "cancelled"
    if statement is sqlw.complete_run or statement is sqlw.fail_run:
        assert [r for r in caplog.records if "it is cancelled" in r.getMessage()]
    else:
        assert [type(s) for s in signals] == [CancelledTask]


def test_a_replayed_sleep_whose_retry_finds_the_run_cancelled_is_not_taken_for_its_own(
    url_app: Absurd, clean_db: Engine
) -> None:
    """On a replay the sleep's checkpoint is already ours (the same run slept
    before): only the run sleeping until that wake time is our own sleep."""
    signals: list[Any] = []
    register_probe(url_app, lambda ctx: ctx.sleep_for("nap", 60) or "woke", signals)
    spawned = url_app.spawn("probe")
    with FakeClock(url_app.engine) as clock:
        run_until_idle(url_app)
        assert [type(s) for s in signals] == [SuspendTask]
        fault = Fault(
            url_app,
            clean_db,
            sqlw.sleep,
            kill=True,
            meanwhile=lambda: url_app.cancel_task(spawned.task_id),
        )
        clock.advance(61)
        run_until_idle(url_app)
    assert fault.calls == 2
    assert [type(s) for s in signals] == [SuspendTask, CancelledTask]
    assert task_state(clean_db, spawned.task_id) == "cancelled"


# -- B: a completion that claimed the slot's next run, whose answer was lost ---------------


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "never-sent"])
def test_a_run_claimed_by_a_completion_whose_answer_was_lost_is_taken_over(
    url_app: Absurd, clean_db: Engine, committed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's completion also claims its slot's next run. When it
    committed and its answer was lost, the retry only completes, and the run
    the first attempt claimed is found where the completion recorded it and
    run at once: not left to its lease, which would then charge this
    ``max_attempts=1`` task an attempt it never used. When the first attempt
    never reached the server, the retry completes and nothing is taken over."""
    ran: list[int] = []

    @url_app.register_task("t", max_attempts=1)
    def t(params: Any, ctx: TaskContext) -> int:
        ran.append(params["i"])
        return int(params["i"])

    first = url_app.spawn("t", {"i": 1})
    second = url_app.spawn("t", {"i": 2})
    fault = Fault(
        url_app, clean_db, sqlw.complete_and_claim, lose_answer=committed, kill=not committed
    )
    with (
        caplog.at_level(logging.INFO, logger="absurd_sqla"),
        worker_thread(url_app, concurrency=1, poll_interval=30),
    ):
        wait_until(
            lambda: task_state(clean_db, second.task_id) == "completed", "the second completed"
        )
    # The first's completion and the second's; the first's retry only completed.
    assert fault.calls == 2, "a retried completion claimed again"
    assert ran == [1, 2]
    assert run_states(clean_db, first.task_id) == ["completed"]
    assert run_states(clean_db, second.task_id) == ["completed"]  # one run: no attempt lost
    took_over = [r for r in caplog.records if "took over run" in r.getMessage()]
    assert len(took_over) == (1 if committed else 0)


@run_async
async def test_an_async_worker_takes_over_the_run_its_lost_completion_claimed(
    database_url: str, clean_db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for the asyncio worker: the taken-over run starts in the slot."""
    async with async_app_for(database_url) as app:
        ran: list[int] = []

        @app.register_task("t", max_attempts=1)
        async def t(params: Any, ctx: Any) -> int:
            ran.append(params["i"])
            return int(params["i"])

        await app.spawn("t", {"i": 1})
        second = await app.spawn("t", {"i": 2})
        engine = SimpleNamespace(engine=app.engine.sync_engine)
        fault = Fault(engine, clean_db, sqlw.complete_and_claim, lose_answer=True)  # type: ignore[arg-type]
        with caplog.at_level(logging.INFO, logger="absurd_sqla"):
            await run_async_worker_until(
                app,
                lambda: task_state(clean_db, second.task_id) == "completed",
                "the second completed",
                concurrency=1,
                poll_interval=30,
            )
        assert fault.calls == 2
        assert ran == [1, 2]
        assert run_states(clean_db, second.task_id) == ["completed"]
        assert [r for r in caplog.records if "took over run" in r.getMessage()]


# -- B: the retry decision, without I/O ---------------------------------------------------


def lost() -> psycopg.OperationalError:
    return psycopg.OperationalError("server closed the connection unexpectedly")


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.QueryCanceled("canceling statement due to user request"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.errors.SerializationFailure("could not serialize"),
        RuntimeError("not a database error"),
        LeaseLost("lost"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_only_a_lost_connection_is_retried(error: BaseException) -> None:
    assert reconnect_delay(error, 0, 0.0, 0.5) is None
    assert reconnect_delay(lost(), 0, 0.0, 0.5) is not None
    assert reconnect_delay(psycopg.errors.AdminShutdown("terminating"), 0, 0.0, 0.5) is not None


def test_retry_delays_grow_with_jitter_within_the_budget() -> None:
    first = [reconnect_delay(lost(), 0, 0.0, j) for j in (0.0, 0.999)]
    assert all(d is not None and d > 0 for d in first)
    assert first[0] != first[1], "no jitter"
    delays = [reconnect_delay(lost(), n, 0.0, 1.0) for n in range(6)]
    assert all(d is not None for d in delays)
    assert delays == sorted(delays) and delays[-1] > delays[0]
    # Nothing past the budget, and never a wait that would overshoot it.
    assert reconnect_delay(lost(), 3, WRITE_RETRY_BUDGET, 0.5) is None
    near_end = reconnect_delay(lost(), 20, WRITE_RETRY_BUDGET - 0.1, 1.0)
    assert near_end is not None and near_end <= 0.1 + 1e-9
    # Retrying at the largest delay until the budget is spent stays within it.
    waited, retries = 0.0, 0
    while (delay := reconnect_delay(lost(), retries, waited, 1.0)) is not None:
        waited += delay
        retries += 1
    assert waited <= WRITE_RETRY_BUDGET
    assert 3 <= retries <= 20
