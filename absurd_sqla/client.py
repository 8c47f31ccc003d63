"""``Absurd``: the synchronous client."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from . import _core, _sql
from ._app import AppCore, Hooks
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot
from ._engine import Bind, engine_and_sessions
from .errors import QueueNotFound, TaskNotFound, TimeoutError

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
        self.engine, self.session_factory = engine_and_sessions(bind)

    @property
    def queue_name(self) -> str:
        return self._app.queue_name

    # -- plumbing ------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, session: SessionLike | None) -> Iterator[Connection]:
        """The caller's transaction (never committed here) or a short one of our own."""
        if session is None:
            with self.engine.begin() as conn:
                yield conn
        elif isinstance(session, Session):
            yield session.connection()
        elif isinstance(session, Connection):
            yield session
        else:
            raise TypeError(f"session must be a Session or a Connection, not {session!r}")

    def close(self) -> None:
        """Dispose of the connection pool (only matters for a URL ``bind``)."""
        self.engine.dispose()

    # -- queues --------------------------------------------------------------

    def create_queue(self, name: str | None = None) -> None:
        with self._connection(None) as conn:
            conn.execute(_sql.create_queue, {"queue": self._app.queue(name)})

    def drop_queue(self, name: str | None = None) -> None:
        """Delete the queue with every task, run, checkpoint and event in it."""
        with self._connection(None) as conn:
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
        with self._connection(session) as conn:
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
        if row.previous_state is None:
            raise TaskNotFound(f"no task {params['task']} on queue {params['queue']!r}")
        return bool(row.cancelled)

    def fetch_task_result(
        self, task_id: uuid.UUID | str, queue_name: str | None = None
    ) -> TaskResultSnapshot | None:
        """The task's state now, or None if there is no such task."""
        with self._connection(None) as conn:
            row = conn.execute(
                _sql.fetch_task_result, self._app.task_params(task_id, queue_name)
            ).one_or_none()
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
