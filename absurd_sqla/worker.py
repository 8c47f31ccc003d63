"""The sync worker: claim runs, execute handlers, record outcomes.

A worker claims with one ``FOR UPDATE SKIP LOCKED`` statement, runs up to
``concurrency`` handlers in threads, refills free slots as they finish, wakes on
``LISTEN``/``NOTIFY`` (polling stays as the fallback) and on shutdown claims
nothing new while in-flight handlers finish.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Connection, Engine, Row
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql import Executable

from . import _sql_worker as sqlw
from ._run import (
    CLAIM_TIMEOUT_REASON,
    PARENT_HEADER,
    ClaimedRun,
    RunState,
    fail_params,
    failure_reason,
    snapshot_payload,
    task_done_event,
)
from ._sql import channel_for
from .context import TaskContext
from .errors import InvalidArgument, NotSerializable, TaskSignal

if TYPE_CHECKING:
    from .client import Absurd

log = logging.getLogger("absurd_sqla.worker")

SWEEP_INTERVAL = 1.0  # seconds between expired-lease sweeps of a running worker
LISTEN_RETRY_MIN, LISTEN_RETRY_MAX = 0.5, 30.0  # reconnect backoff of the listener, seconds
SIGNAL_CHECK_INTERVAL = 0.1  # longest an idle worker takes to notice SIGTERM/SIGINT


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(
    app: Absurd, queue: str, worker_id: str, claim_timeout: float, batch_size: int
) -> list[ClaimedRun]:
    with app._writer(atomic=False) as conn:
        rows = conn.execute(
            sqlw.claim,
            {
                "queue": queue,
                "worker": worker_id,
                "claim_timeout": claim_timeout,
                "batch_size": batch_size,
            },
        ).all()
    return [ClaimedRun.from_row(row) for row in rows]


def sweep_expired(app: Absurd, queue: str) -> int:
    """Fail runs whose lease expired as ``$ClaimTimeout`` (retrying per their task)."""
    with app.engine.begin() as conn:
        expired = conn.execute(sqlw.expired_runs, {"queue": queue}).all()
        for row in expired:
            params = fail_params(
                row.run_id,
                row.queue_name,
                row.attempt,
                row.max_attempts,
                row.retry_strategy,
                CLAIM_TIMEOUT_REASON,
                require_lease=False,
            )
            result = conn.execute(sqlw.fail_run, params).one()
            if not result.retried:
                announce_done(app, conn, row.task_id, row.queue_name, row.headers)
    if expired:
        log.warning("failed %d run(s) whose lease expired on queue %r", len(expired), queue)
    return len(expired)


def announce_done(app: Absurd, conn: Connection, task_id: Any, queue: str, headers: Any) -> None:
    """A finished child emits ``$task:<id>`` so an awaiting parent wakes up."""
    if not is_child(headers):
        return
    snapshot = app._fetch_on(conn, task_id, queue)
    if snapshot is None:
        return
    payload = snapshot_payload(snapshot.state, snapshot.result, snapshot.failure)
    app.emit_event(task_done_event(task_id), payload, session=conn, queue_name=queue)


def is_child(headers: Any) -> bool:
    """Spawned by ``ctx.spawn``: finishing must also emit the parent's wake-up event."""
    return bool((headers or {}).get(PARENT_HEADER))


def execute(app: Absurd, run: ClaimedRun, worker_id: str, claim_timeout: float) -> None:
    """Run one claimed run to completion, failure or suspension."""
    registration = app._app.registry.get(run.task_name)
    if registration is None:
        # Unknown here (e.g. mid-deploy): hand it back for a worker that knows it.
        log.warning("no handler for task %r; deferring run %s", run.task_name, run.run_id)
        app._one(sqlw.defer_run, run.defer_params())
        return
    violation = run.policy_violation()
    if violation is not None:
        log.info("cancelling task %s: %s", run.task_id, violation)
        app.cancel_task(run.task_id, queue_name=run.queue_name)
        return
    state = RunState(run, worker_id, claim_timeout)
    ctx = TaskContext(app, state)
    wrap = app._app.hooks.wrap_task

    def call() -> Any:
        return registration.handler(run.params, ctx)

    try:
        result = wrap(ctx, call) if wrap is not None else call()
    except TaskSignal as signal_:
        log.debug("run %s stopped: %r", run.run_id, signal_)
        return
    except Exception as exc:
        _fail(app, state, exc)
        return
    try:
        params = state.complete_params(result)
    except NotSerializable as exc:
        _fail(app, state, exc)
        return
    row = _record_outcome(app, run, sqlw.complete_run, params, lambda row: bool(row.owned))
    if not row.owned:
        log.warning(
            "discarded the result of run %s: it is %s and no longer held by this worker "
            "(cancelled, failed, or its lease expired)",
            run.run_id,
            row.run_state,
        )


def _record_outcome(
    app: Absurd,
    run: ClaimedRun,
    statement: Executable,
    params: dict[str, Any],
    finished: Callable[[Row[Any]], bool],
) -> Row[Any]:
    """Write a run's outcome; a child that ``finished`` also wakes its parent, in
    the same transaction (otherwise the single statement runs in autocommit)."""
    with app._writer(atomic=is_child(run.headers)) as conn:
        row = conn.execute(statement, params).one()
        if finished(row):
            announce_done(app, conn, run.task_id, run.queue_name, run.headers)
    return row


def _fail(app: Absurd, state: RunState, exc: BaseException) -> None:
    run = state.run
    row = _record_outcome(
        app,
        run,
        sqlw.fail_run,
        state.fail_params(failure_reason(exc)),
        lambda row: bool(row.owned and not row.retried),
    )
    if not row.owned:
        log.warning("could not record the failure of run %s: it is %s", run.run_id, row.run_state)
    else:
        log.info(
            "run %s of task %s failed (attempt %d): %r", run.run_id, run.task_id, run.attempt, exc
        )


def work_batch(
    app: Absurd, queue: str, worker_id: str, claim_timeout: float, batch_size: int
) -> int:
    sweep_expired(app, queue)
    claimed = claim(app, queue, worker_id, claim_timeout, batch_size)
    for position, run in enumerate(claimed):
        # Runs wait their turn here: renew each lease before starting it, and
        # skip a run whose lease ran out meanwhile (the sweep retries it).
        if position and not still_held(app, run, claim_timeout):
            log.warning("run %s lost its lease before it started; skipped", run.run_id)
            continue
        execute(app, run, worker_id, claim_timeout)
    return len(claimed)


def still_held(app: Absurd, run: ClaimedRun, claim_timeout: float) -> bool:
    row = app._one(sqlw.heartbeat, {"run": run.run_id, "claim_timeout": claim_timeout})
    return bool(row.owned)


class Listener:
    """``LISTEN`` on the queue's channel in a thread; each notification sets ``wake``.

    The connection comes from the app's engine (so its connect arguments and
    events apply), detached from the pool. If it breaks, the listener
    reconnects with backoff; the worker keeps polling meanwhile, and a wake-up
    after each (re)connect covers notifications missed in between.
    """

    def __init__(self, engine: Engine, channel: str, wake: threading.Event) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="absurd-listen", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = LISTEN_RETRY_MIN
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception:
                if self.connected.is_set():  # it had worked: start the backoff afresh
                    backoff = LISTEN_RETRY_MIN
                log.warning(
                    "LISTEN on %s failed; polling until it reconnects in %.1fs",
                    self._channel,
                    backoff,
                    exc_info=True,
                )
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        conn = raw.driver_connection  # read before detach(), which clears it
        raw.detach()  # a LISTENing session must never serve anyone else
        try:
            if not isinstance(conn, psycopg.Connection):
                raise TypeError(f"LISTEN needs a psycopg 3 connection, got {type(conn)!r}")
            conn.rollback()
            conn.autocommit = True
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel)))
            self.connected.set()
            self._wake.set()  # anything committed while we were not listening
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.5, stop_after=1):
                    self._wake.set()
        finally:
            raw.close()


class Worker:
    """A long-running worker for one queue. Use ``Absurd.start_worker``."""

    def __init__(
        self,
        app: Absurd,
        *,
        queue: str,
        worker_id: str,
        claim_timeout: float,
        concurrency: int,
        batch_size: int,
        poll_interval: float,
    ) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, got {concurrency}")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        self.app = app
        self.queue = queue
        self.worker_id = worker_id
        self.claim_timeout = claim_timeout
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._stopping = threading.Event()
        self._signalled: int | None = None  # set by a signal handler: no locks there
        self._wake = threading.Event()
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Claim nothing more; in-flight handlers finish. Safe from any thread."""
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set() or self._signalled is not None

    def _on_signal(self, signum: int) -> None:
        # Runs in the main thread between bytecodes, maybe while this thread holds
        # an Event's lock: only a plain assignment is safe here.
        self._signalled = signum

    def _idle(self) -> None:
        """Wait for a wake-up (NOTIFY, a free slot, stop) or the poll interval.

        In slices, so a signal noticed via ``_signalled`` stops us promptly.
        """
        deadline = time.monotonic() + self.poll_interval
        while not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake.wait(min(remaining, SIGNAL_CHECK_INTERVAL)):
                break
        self._wake.clear()

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(future)
        exc = future.exception()
        if exc is not None:
            log.error("worker slot crashed", exc_info=exc)
        self._wake.set()

    def _check_pool(self) -> None:
        """Each handler thread holds a connection per step, plus the claim loop's own."""
        pool = self.app.engine.pool
        if isinstance(pool, QueuePool):
            capacity = pool.size() + max(pool._max_overflow, 0)  # no public getter
            if capacity < self.concurrency + 1:
                log.warning(
                    "the engine's pool allows %d connections but concurrency=%d needs %d; "
                    "handlers will wait for connections (raise pool_size/max_overflow)",
                    capacity,
                    self.concurrency,
                    self.concurrency + 1,
                )

    def run(self) -> None:
        self._check_pool()
        listener = Listener(self.app.engine, channel_for(self.queue), self._wake)
        listener.start()
        restore = _install_signal_handlers(self._on_signal)
        last_sweep = 0.0
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="absurd-task") as pool:
                while not self.stopping:
                    with self._lock:
                        free = self.concurrency - len(self._inflight)
                    claimed: list[ClaimedRun] = []
                    if free > 0:
                        now = time.monotonic()
                        if now - last_sweep >= SWEEP_INTERVAL:
                            last_sweep = now
                            self._guard(sweep_expired, self.app, self.queue)
                        wanted = min(free, self.batch_size)
                        claimed = (
                            self._guard(
                                claim,
                                self.app,
                                self.queue,
                                self.worker_id,
                                self.claim_timeout,
                                wanted,
                            )
                            or []
                        )
                        for run in claimed:
                            future = pool.submit(
                                execute, self.app, run, self.worker_id, self.claim_timeout
                            )
                            with self._lock:
                                self._inflight.add(future)
                            future.add_done_callback(self._done)
                        if len(claimed) == wanted:
                            continue  # there may be more ready right now
                    self._idle()
                if self._signalled is not None:
                    log.info("signal %d: stopping after in-flight tasks finish", self._signalled)
                # Leaving the `with` waits for in-flight handlers to finish.
        finally:
            restore()
            listener.stop()

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a database hiccup must not kill the worker loop
            log.exception("worker %s: database error; retrying after poll interval", self.worker_id)
            return None


def _install_signal_handlers(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT stop the worker gracefully; only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(signum: int, frame: object) -> None:
        on_signal(signum)

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
