"""``Absurd``: the synchronous client."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Row
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

from . import _core, _sql
from . import _sql_worker as sqlw
from ._app import AppCore, Hooks
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot
from ._engine import Bind, engine_and_sessions
from .errors import InvalidArgument, QueueNotFound, TaskNotFound, TaskStateError, TimeoutError
from .worker import Worker, announce_done, default_worker_id, work_batch

F = TypeVar("F", bound=Callable[..., Any])
SessionLike = Session | Connection


class Absurd:
    """Durable tasks on PostgreSQL.

    ``bind`` is a URL, an :class:`~sqlalchemy.Engine` or a ``sessionmaker``;
    without one, ``ABSURD_DATABASE_URL``, then ``PGDATABASE``, then
    ``postgresql://localhost/absurd``.

    Every write takes ``session=``: a ``Session`` or ``Connection`` whose
    transaction the write joins without committing. Until the caller commits,
    the task or event is invisible and no worker is woken; after a rollback it
    never existed. Without ``session=`` the write commits on its own.
    """

    def __init__(
        self,
        bind: Bind = None,
        queue_name: str = "default",
        default_max_attempts: int | None = 5,
        hooks: Hooks | None = None,
    ) -> None:
        self._app = AppCore(queue_name, default_max_attempts, hooks)
        self.engine: Engine
        self.session_factory: sessionmaker[Session]
        # A URL bind gets a pool big enough for a worker with a few threads.
        self.engine, self.session_factory = engine_and_sessions(bind, pool_size=10, max_overflow=20)
        # Single statements are atomic alone: run them without BEGIN/COMMIT,
        # one round trip instead of three. Shares the engine's pool.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._workers: list[Worker] = []
        self._workers_lock = threading.Lock()
        self._stop_pending = False  # stop_worker() before start_worker() registered

    @property
    def queue_name(self) -> str:
        return self._app.queue_name

    # -- plumbing ------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(
        self, session: SessionLike | None, *, atomic: bool = True
    ) -> Iterator[Connection]:
        """The caller's transaction (never committed here), or our own: a short
        transaction, or autocommit for a single self-contained statement."""
        if session is None:
            with self._writer(atomic=atomic) as conn:
                yield conn
        elif isinstance(session, Session):
            yield session.connection()
        elif isinstance(session, Connection):
            yield session
        else:
            raise TypeError(f"session must be a Session or a Connection, not {session!r}")

    @contextlib.contextmanager
    def _writer(self, *, atomic: bool) -> Iterator[Connection]:
        """A connection for our own writes: a transaction when several statements
        must commit together, autocommit when there is a single statement."""
        if atomic:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._autocommit.connect() as conn:
                yield conn

    def _one(self, statement: Executable, params: Mapping[str, Any]) -> Row[Any]:
        """Run one self-contained statement in autocommit and return its single row."""
        with self._autocommit.connect() as conn:
            return conn.execute(statement, params).one()

    def close(self) -> None:
        """Dispose of the engine's connection pool (a passed Engine's too)."""
        self.engine.dispose()

    # -- queues --------------------------------------------------------------

    def create_queue(self, name: str | None = None, *, session: SessionLike | None = None) -> None:
        """Create the queue (a row; nothing happens if it exists)."""
        with self._connection(session) as conn:
            conn.execute(_sql.create_queue, {"queue": self._app.queue(name)})

    def drop_queue(self, name: str | None = None, *, session: SessionLike | None = None) -> None:
        """Delete the queue with every task, run, checkpoint and event in it."""
        with self._connection(session) as conn:
            conn.execute(_sql.drop_queue, {"queue": self._app.queue(name)})

    def list_queues(self) -> list[str]:
        with self._connection(None) as conn:
            return list(conn.scalars(_sql.list_queues))

    # -- tasks ---------------------------------------------------------------

    def register_task(
        self,
        name: str,
        *,
        queue: str | None = None,
        default_max_attempts: int | None = None,
        default_cancellation: Mapping[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Register ``handler(params, ctx)`` under ``name``."""

        def decorate(handler: F) -> F:
            self._app.register(name, handler, queue, default_max_attempts, default_cancellation)
            return handler

        return decorate

    def spawn(
        self,
        task_name: str,
        params: Any = None,
        *,
        session: SessionLike | None = None,
        max_attempts: int | None = None,
        retry_strategy: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        queue: str | None = None,
        cancellation: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        run_after: datetime | float | timedelta | None = None,
    ) -> SpawnResult:
        """Enqueue one task. With ``session=`` it commits (or not) with the caller."""
        request = SpawnRequest(
            task_name,
            params,
            max_attempts,
            retry_strategy,
            headers,
            queue,
            cancellation,
            idempotency_key,
            run_after,
        )
        return self.spawn_many([request], session=session)[0]

    def spawn_many(
        self, requests: Iterable[SpawnRequest], *, session: SessionLike | None = None
    ) -> list[SpawnResult]:
        """Enqueue many tasks: one statement per queue, results in request order."""
        batches = self._app.spawn_batches(requests)
        results: list[tuple[int, SpawnResult]] = []
        # One batch is one statement: atomic on its own (the key lookup only reads).
        with self._connection(session, atomic=len(batches) > 1) as conn:
            if len(batches) > 1:
                # One missing queue must fail the call before any batch is written.
                self._app.check_queues_exist(
                    batches,
                    conn.scalars(_sql.existing_queues, {"queues": [b.queue for b in batches]}),
                )
            for batch in batches:
                inserted = conn.execute(_sql.spawn, batch.params).all()
                existing: Sequence[Any] = ()
                if len(inserted) < len(batch.rows) and batch.keys:
                    existing = conn.execute(
                        _sql.existing_by_keys, {"queue": batch.queue, "keys": batch.keys}
                    ).all()
                results += self._app.spawn_results(batch, inserted, existing)
        return [result for _, result in sorted(results, key=lambda pair: pair[0])]

    def cancel_task(
        self,
        task_id: uuid.UUID | str,
        *,
        session: SessionLike | None = None,
        queue_name: str | None = None,
    ) -> bool:
        """Cancel the task and its live runs. False if it had already finished.

        Running code stops at its next checkpoint, heartbeat or wait.
        """
        params = self._app.task_params(task_id, queue_name)
        with self._connection(session) as conn:
            row = conn.execute(_sql.cancel_task, params).one()
            if row.cancelled:
                conn.execute(_sql.cancel_late_runs, params)
                announce_done(self, conn, params["task"], params["queue"], row.headers)
        if row.previous_state is None:
            raise TaskNotFound(f"no task {params['task']} on queue {params['queue']!r}")
        return bool(row.cancelled)

    def retry_task(
        self,
        task_id: uuid.UUID | str,
        *,
        max_attempts: int | None = None,
        spawn_new: bool = False,
        queue_name: str | None = None,
        session: SessionLike | None = None,
    ) -> SpawnResult:
        """Run a failed task again: a new attempt in place, or a new task (``spawn_new``).

        In place, checkpoints are kept, so finished steps are not redone.
        """
        params = self._app.task_params(task_id, queue_name)
        new_max = _core.check_max_attempts(max_attempts)
        with self._connection(session) as conn:
            if spawn_new:
                source = conn.execute(sqlw.task_for_respawn, params).one_or_none()
                self._check_failed(params, source.state if source else None)
                assert source is not None
                return self.spawn(
                    source.task_name,
                    source.params,
                    session=conn,
                    max_attempts=new_max or source.max_attempts,
                    retry_strategy=source.retry_strategy,
                    headers=source.headers,
                    queue=params["queue"],
                    cancellation=source.cancellation,
                )
            new_run = _core.uuid7()
            row = conn.execute(
                sqlw.retry_task,
                {
                    **params,
                    "new_run": new_run,
                    "max_attempts": new_max,
                    "channel": _sql.channel_for(params["queue"]),
                },
            ).one()
            self._check_failed(params, row.previous_state)
        return SpawnResult(params["task"], new_run, row.attempt, False)

    @staticmethod
    def _check_failed(params: dict[str, Any], state: str | None) -> None:
        if state is None:
            raise TaskNotFound(f"no task {params['task']} on queue {params['queue']!r}")
        if state != "failed":
            raise TaskStateError(
                f"only failed tasks can be retried; task {params['task']} is {state}"
            )

    def cleanup(
        self,
        queue: str | None = None,
        *,
        older_than: float | timedelta = 7 * 86400,
        limit: int = 1000,
        session: SessionLike | None = None,
    ) -> tuple[int, int]:
        """Delete up to ``limit`` finished tasks and emitted events older than
        ``older_than`` seconds. Returns (tasks, events) deleted; call again while
        either equals ``limit``.
        """
        older = _core.check_seconds("older_than", older_than, allow_none=False)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a whole number >= 1, got {limit!r}")
        with self._connection(session) as conn:
            row = conn.execute(
                sqlw.cleanup, {"queue": self._app.queue(queue), "older_than": older, "limit": limit}
            ).one()
        return int(row.tasks), int(row.events)

    def fetch_task_result(
        self, task_id: uuid.UUID | str, queue_name: str | None = None
    ) -> TaskResultSnapshot | None:
        """The task's state now, or None if there is no such task."""
        params = self._app.task_params(task_id, queue_name)
        with self._connection(None) as conn:
            return self._fetch_on(conn, params["task"], params["queue"])

    def _fetch_on(
        self, conn: Connection, task_id: uuid.UUID, queue: str
    ) -> TaskResultSnapshot | None:
        row = conn.execute(_sql.fetch_task_result, {"task": task_id, "queue": queue}).one_or_none()
        return self._app.snapshot(row)

    def await_task_result(
        self,
        task_id: uuid.UUID | str,
        timeout: float | None = None,
        queue_name: str | None = None,
    ) -> TaskResultSnapshot:
        """Wait until the task is completed, failed or cancelled."""
        limit = _core.check_seconds("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        next_delay = _core.poll_delays()
        while True:
            snapshot = self.fetch_task_result(task_id, queue_name)
            if snapshot is None:
                raise TaskNotFound(f"no task {task_id}")
            if snapshot.terminal:
                return snapshot
            delay = next_delay()
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"task {task_id} still {snapshot.state} after {timeout}s")
                delay = min(delay, remaining)
            time.sleep(delay)

    # -- events --------------------------------------------------------------

    def emit_event(
        self,
        event_name: str,
        payload: Any = None,
        *,
        session: SessionLike | None = None,
        queue_name: str | None = None,
    ) -> bool:
        """Emit an event; the first emit of a name wins. True if this one did.

        Every run waiting on the name is woken, in the same transaction.
        """
        params = self._app.emit_params(event_name, payload, queue_name)
        with self._connection(session) as conn:
            row = conn.execute(_sql.emit_event, params).one()
            if not row.queue_found:
                raise QueueNotFound(f"queue {params['queue']!r} does not exist")
            if not row.emitted:
                return False
            # A second statement: its fresh snapshot sees every waiter that
            # committed while we waited for the event row's lock.
            conn.execute(_sql.wake_waiters, params)
        return True

    # -- workers -------------------------------------------------------------

    def work_batch(
        self,
        worker_id: str = "worker",
        claim_timeout: float = 120,
        batch_size: int = 1,
        *,
        queue: str | None = None,
    ) -> int:
        """Claim up to ``batch_size`` runs, run each to completion or suspension
        in this thread, and return how many were claimed."""
        return work_batch(self, self._app.queue(queue), worker_id, claim_timeout, batch_size)

    def start_worker(
        self,
        worker_id: str | None = None,
        claim_timeout: float = 120,
        concurrency: int = 1,
        batch_size: int | None = None,
        poll_interval: float = 0.25,
        *,
        queue: str | None = None,
    ) -> None:
        """Run until :meth:`stop_worker`, SIGTERM or SIGINT; in-flight tasks finish.

        May run in a background thread (signal handlers are installed only
        from the main thread). ``concurrency`` handlers run at once, in threads.
        A :meth:`stop_worker` that came while no worker was running is not
        lost: this call then returns at once (the "start a thread, stop it"
        race).
        """
        worker = Worker(
            self,
            queue=self._app.queue(queue),
            worker_id=worker_id or default_worker_id(),
            claim_timeout=claim_timeout,
            concurrency=concurrency,
            batch_size=batch_size or concurrency,
            poll_interval=poll_interval,
        )
        with self._workers_lock:
            if self._stop_pending:
                self._stop_pending = False
                return
            self._workers.append(worker)
        try:
            worker.run()
        finally:
            with self._workers_lock:
                self._workers.remove(worker)

    def stop_worker(self) -> None:
        """Ask every worker of this client to stop (from any thread, without await).

        Each claims nothing more and returns once its in-flight handlers finish.
        With no worker running, the next :meth:`start_worker` returns at once.
        """
        with self._workers_lock:
            self._stop_pending = not self._workers
            for worker in self._workers:
                worker.stop()
