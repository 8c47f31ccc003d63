# GENERATED from absurd_sqla/client_async.py by ci/generate_sync.py: do not edit.
# Change client_async.py and run `python ci/generate_sync.py`.
"""``Absurd``: the client."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from time import sleep
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from . import _core, _inspect, _ops, _sql
from ._app import AppCore, Hooks, WorkerSettings, check_sync_handler
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot
from ._db import Database, SessionLike
from ._engine import Bind
from ._execute import Executor
from ._inspect import (
    EventInfo,
    MinuteCount,
    QueueStats,
    TaskDetail,
    TaskPage,
    WaitingTask,
)
from ._runtime import default_worker_id
from .errors import InvalidArgument, TaskNotFound, TimeoutError
from .worker import Worker, Workers

F = TypeVar("F", bound=Callable[..., Any])


class Absurd:
    """Durable tasks on PostgreSQL.

    ``bind`` is a URL, an engine (``Engine``) or a session factory
    (``sessionmaker``);
    without one, ``ABSURD_DATABASE_URL``, then ``PGDATABASE``, then
    ``postgresql://localhost/absurd``.

    Every write takes ``session=``: a session or connection (``Session``,
    ``Connection``) whose
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
        self._core = AppCore(queue_name, default_max_attempts, hooks)
        self._db = Database(bind)
        self._executor = Executor(self._db, self._core)
        self._workers = Workers()

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self._db.session_factory

    @property
    def queue_name(self) -> str:
        return self._core.queue_name

    def close(self) -> None:
        """Dispose of the engine's connection pool (a passed Engine's too)."""
        self._db.close()

    # -- queues --------------------------------------------------------------

    def create_queue(self, name: str | None = None, *, session: SessionLike | None = None) -> None:
        """Create the queue (a row; nothing happens if it exists)."""
        with self._db.joined(session) as conn:
            conn.execute(_sql.create_queue, {"queue": self._core.queue(name)})

    def drop_queue(self, name: str | None = None, *, session: SessionLike | None = None) -> None:
        """Delete the queue with every task, run, checkpoint and event in it."""
        with self._db.joined(session) as conn:
            conn.execute(_sql.drop_queue, {"queue": self._core.queue(name)})

    def list_queues(self) -> list[str]:
        with self._db.joined(None, atomic=False) as conn:
            return list(conn.scalars(_sql.list_queues))

    # -- tasks ---------------------------------------------------------------

    def register_task(
        self,
        name: str,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        retry_strategy: Mapping[str, Any] | None = None,
        cancellation: Mapping[str, Any] | None = None,
        default_max_attempts: int | None = None,
        default_cancellation: Mapping[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Register ``handler(params, ctx)`` under ``name``.

        ``queue``, ``max_attempts``, ``retry_strategy`` and ``cancellation`` are
        the task's defaults: every spawn of it uses them unless the spawn passes
        its own. ``default_max_attempts`` / ``default_cancellation`` are the
        original SDK's names for two of them. A name registered twice raises
        :class:`~absurd_sqla.TaskAlreadyRegistered`.
        """
        max_attempts = _pick("max_attempts", max_attempts, default_max_attempts)
        cancellation = _pick("cancellation", cancellation, default_cancellation)

        def decorate(handler: F) -> F:
            self._core.register(
                name,
                check_sync_handler(name, handler),
                queue=queue,
                max_attempts=max_attempts,
                retry_strategy=retry_strategy,
                cancellation=cancellation,
            )
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
        """Enqueue many tasks: one statement per queue, results in request order.

        Every request is checked before anything is written. With ``session=``
        the tasks are invisible until the caller commits and gone on rollback.
        """
        batches = self._core.spawn_batches(requests)
        if len(batches) == 1 and len(batches[0].rows) == 1:
            if session is None:
                return [_ops.spawn_one(self._db, None, self._core, batches[0])]
            with self._db.joined(session) as conn:
                return [_ops.spawn_one(self._db, conn, self._core, batches[0])]
        # One queue is one statement: atomic on its own (the key lookup only reads).
        with self._db.joined(session, atomic=len(batches) > 1) as conn:
            return _ops.spawn_many(self._db, conn, self._core, batches)

    def cancel_task(
        self,
        task_id: uuid.UUID | str,
        reason: str | None = None,
        *,
        session: SessionLike | None = None,
        queue_name: str | None = None,
    ) -> bool:
        """Cancel the task and its live runs. False if it had already finished.

        Running code stops at its next checkpoint, heartbeat or wait. ``reason``
        is kept with the task (:meth:`get_task` shows it). With ``session=`` the
        cancel is invisible until the caller commits.
        """
        params = self._core.task_params(task_id, queue_name)
        why = None if reason is None else _core.check_name("reason", reason, max_length=2000)
        with self._db.joined(session) as conn:
            return _ops.cancel(conn, params, why)

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
        params = self._core.task_params(task_id, queue_name)
        new_max = _core.check_max_attempts(max_attempts)
        with self._db.joined(session) as conn:
            if spawn_new:
                source = conn.execute(_sql.task_for_respawn, params).one_or_none()
                self._core.check_retryable(
                    params,
                    source.state if source else None,
                    source.queue_name if source else None,
                )
                assert source is not None
                return self.spawn(
                    source.task_name,
                    source.params,
                    session=conn,
                    max_attempts=new_max or source.max_attempts,
                    retry_strategy=source.retry_strategy,
                    headers=source.headers,
                    queue=source.queue_name,
                    cancellation=source.cancellation,
                )
            new_run = _core.uuid7()
            row = (
                conn.execute(
                    _sql.retry_task, {**params, "new_run": new_run, "max_attempts": new_max}
                )
            ).one()
            self._core.check_retryable(params, row.previous_state, row.task_queue)
        return SpawnResult(params["task"], new_run, row.attempt, False)

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
        with self._db.joined(session) as conn:
            params = {"queue": self._core.queue(queue), "older_than": older, "limit": limit}
            row = conn.execute(_sql.cleanup, params).one()
        return int(row.tasks), int(row.events)

    def fetch_task_result(
        self, task_id: uuid.UUID | str, queue_name: str | None = None
    ) -> TaskResultSnapshot | None:
        """The task's state now, or None if there is no such task."""
        params = self._core.task_params(task_id, queue_name)
        with self._db.joined(None, atomic=False) as conn:
            return _ops.fetch_result(conn, params)

    def await_task_result(
        self,
        task_id: uuid.UUID | str,
        timeout: float | None = None,
        queue_name: str | None = None,
    ) -> TaskResultSnapshot:
        """Wait until the task is completed, failed or cancelled."""
        task = _core.check_task_id(task_id)
        limit = _core.check_seconds("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        next_delay = _core.poll_delays()
        while True:
            snapshot = self.fetch_task_result(task, queue_name)
            if snapshot is None:
                raise TaskNotFound(f"task {task} not found", task_id=task)
            if snapshot.terminal:
                return snapshot
            delay = next_delay()
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"task {task} still {snapshot.state} after {timeout}s",
                        task_id=task,
                        state=snapshot.state,
                    )
                delay = min(delay, remaining)
            sleep(delay)

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
        params = self._core.emit_params(event_name, payload, queue_name)
        with self._db.joined(session) as conn:
            return _ops.emit(conn, params)

    # -- inspection ----------------------------------------------------------

    def list_tasks(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        task_name: str | None = None,
        since: datetime | timedelta | None = None,
        limit: int = 50,
        after: uuid.UUID | str | None = None,
    ) -> TaskPage:
        """Tasks newest first, of every queue unless ``queue`` is given.

        ``since``: created at or after (a datetime, or a timedelta before now).
        A page holds at most ``limit`` (up to 1000) tasks; pass its
        ``next_cursor`` as ``after`` for the next one. Read-only.
        """
        params = _inspect.list_params(
            queue=queue, state=state, task_name=task_name, since=since, limit=limit, after=after
        )
        with self._db.joined(None, atomic=False) as conn:
            return _ops.list_tasks(conn, params)

    def get_task(self, task_id: uuid.UUID | str) -> TaskDetail:
        """Everything about one task: params, headers, result or failure, every
        run, every checkpoint, the current wait, its parent and children.
        Raises ``TaskNotFound``. Read-only, from one snapshot."""
        task = _core.check_task_id(task_id)
        with self._db.joined(None) as conn:
            return _ops.get_task(conn, task)

    def queue_stats(self, queue: str | None = None) -> list[QueueStats]:
        """Per queue (every queue unless ``queue`` is given): tasks per state,
        the age of the oldest due run not yet claimed, and runs completed and
        failed in the last minute and hour. Read-only, from one snapshot."""
        name = None if queue is None else _core.check_queue_name(queue)
        with self._db.joined(None) as conn:
            return _ops.queue_stats(conn, name)

    def list_events(
        self,
        *,
        queue: str | None = None,
        limit: int = 50,
        before: datetime | None = None,
    ) -> list[EventInfo]:
        """Emitted events, newest first (every queue unless ``queue``); for the
        next page pass the last one's ``emitted_at`` as ``before``. Read-only."""
        name = None if queue is None else _core.check_queue_name(queue)
        page = _inspect.check_limit(limit)
        cursor = None if before is None else _core.check_aware("before", before)
        with self._db.joined(None) as conn:
            return _ops.list_events(conn, name, page, cursor)

    def list_waits(self, *, queue: str | None = None, limit: int = 50) -> list[WaitingTask]:
        """Runs suspended until an event (a parent awaiting a child too), the
        newest wait first: who waits on what. Read-only."""
        name = None if queue is None else _core.check_queue_name(queue)
        page = _inspect.check_limit(limit)
        with self._db.joined(None) as conn:
            return _ops.list_waits(conn, name, page)

    def queue_throughput(self, queue: str | None = None, *, minutes: int = 60) -> list[MinuteCount]:
        """Runs completed and failed per minute over the last ``minutes`` (1 to
        1440), oldest first, every minute present. Read-only."""
        name = None if queue is None else _core.check_queue_name(queue)
        span = _inspect.check_minutes(minutes)
        with self._db.joined(None) as conn:
            return _ops.queue_throughput(conn, name, span)

    # -- workers -------------------------------------------------------------

    def work_batch(
        self,
        worker_id: str = "worker",
        claim_timeout: float = 120,
        batch_size: int = 1,
        *,
        queue: str | None = None,
    ) -> int:
        """Claim up to ``batch_size`` runs, run them one after another to
        completion or suspension, and return how many were claimed."""
        settings = WorkerSettings.checked(
            self._core.queue(queue), worker_id, claim_timeout, batch_size
        )
        return self._executor.work_batch(settings)

    def start_worker(
        self,
        worker_id: str | None = None,
        claim_timeout: float = 120,
        concurrency: int = 1,
        batch_size: int | None = None,
        poll_interval: float = 0.25,
        *,
        queue: str | None = None,
        shutdown_timeout: float | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Run until :meth:`stop_worker`, SIGTERM or SIGINT; in-flight tasks finish.

        Shutdown has two stages: a stop (:meth:`stop_worker`, SIGTERM, SIGINT)
        claims nothing more and waits for in-flight handlers;
        ``stop_worker(now=True)``, a second signal, or ``shutdown_timeout``
        seconds after the first stop, stops now and releases the unfinished
        runs (claimable again at once; a run whose handler never started costs
        no attempt, one that started fails as ``$WorkerShutdown`` and is
        retried at once).

        ``concurrency`` handlers run at once (threads for ``Absurd``, asyncio
        tasks for ``Absurd``); a finished one frees its slot at once.
        SIGTERM and SIGINT handlers are installed only from the main thread,
        and only with ``handle_signals=True``: pass False when the host (a
        web server running the worker in its lifespan, say) owns the signals
        and calls :meth:`stop_worker` itself. The previous handlers come back
        when the worker returns. A :meth:`stop_worker` that came while no
        worker was running is not lost: this call then returns at once (the
        "start a worker, stop it" race).
        """
        settings = WorkerSettings.checked(
            self._core.queue(queue),
            worker_id if worker_id is not None else default_worker_id(),
            claim_timeout,
            batch_size if batch_size is not None else concurrency,
            concurrency,
            poll_interval,
            shutdown_timeout,
            handle_signals,
        )
        self._workers.run(Worker(self._executor, settings))

    def stop_worker(self, *, now: bool = False) -> None:
        """Ask every worker of this client to stop (from any thread, without await).

        Each claims nothing more and returns once its in-flight handlers finish;
        with ``now=True`` it releases them at once instead (see
        :meth:`start_worker`). With no worker running, the next
        :meth:`start_worker` returns at once.
        """
        self._workers.stop(now=now)


def _pick(name: str, value: Any, original_name_value: Any) -> Any:
    """A register_task option given by its name or by the original SDK's ``default_`` name."""
    if value is not None and original_name_value is not None:
        raise InvalidArgument(f"pass {name}= or default_{name}=, not both")
    return value if value is not None else original_name_value
