# GENERATED from absurd_sqla/_ops_async.py by ci/generate_sync.py: do not edit.
# Change _ops_async.py and run `python ci/generate_sync.py`.
"""Operations that take more than one statement, on a connection the caller
supplies (its own transaction or ours): spawn, emit, cancel, read a result,
and announce a finished child. Shared by the client, the task context and the
executor, so each decision is made in one place.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, text

from . import _children, _inspect, _sql
from ._app import AppCore, SpawnBatch
from ._core import SpawnResult, TaskResultSnapshot
from ._db import Database
from .errors import QueueNotFound, TaskNotFound, TaskStateError
from .models import TERMINAL_STATES


def spawn_many(
    db: Database, conn: Connection, core: AppCore, batches: Sequence[SpawnBatch]
) -> list[SpawnResult]:
    """Spawn validated batches (``AppCore.spawn_batches``): one statement per
    queue; results in request order."""
    results: list[tuple[int, SpawnResult]] = []
    if len(batches) > 1:
        # One missing queue must fail the call before any batch is written.
        found = conn.scalars(_sql.existing_queues, {"queues": [b.queue for b in batches]})
        core.check_queues_exist(batches, found)
    for batch in batches:
        inserted = db.rows(_sql.spawn, batch.params, conn)
        existing: Sequence[Any] = ()
        if len(inserted) < len(batch.rows) and batch.keys:
            params = {"queue": batch.queue, "keys": batch.keys}
            existing = db.rows(_sql.existing_by_keys, params, conn)
        results += core.spawn_results(batch, inserted, existing)
    return [result for _, result in sorted(results, key=lambda pair: pair[0])]


def spawn_one(
    db: Database, conn: Connection | None, core: AppCore, batch: SpawnBatch
) -> SpawnResult:
    """Spawn a batch of one task: one statement on ``conn`` (or on its own, in
    autocommit), and a key lookup only when its idempotency key was taken."""
    inserted = db.rows(_sql.spawn_one, batch.one_params, conn)
    existing: list[Any] = []
    if not inserted and batch.keys:
        params = {"queue": batch.queue, "key": batch.keys[0]}
        existing = db.rows(_sql.existing_by_key, params, conn)
    return core.spawn_results(batch, inserted, existing)[0][1]


def emit(conn: Connection, params: Mapping[str, Any]) -> bool:
    """Emit an event (first emit wins) and wake its waiters. True if this emit won."""
    row = conn.execute(_sql.emit_event, params).one()
    if not row.queue_found:
        raise QueueNotFound(f"queue {params['queue']!r} does not exist", queue=params["queue"])
    if not row.emitted:
        return False
    # A second statement: its fresh snapshot sees every waiter that committed
    # while we waited for the event row's lock.
    conn.execute(_sql.wake_waiters, params)
    return True


CANCEL_ATTEMPTS = 50  # each retry follows a run another transaction created meanwhile


def cancel(conn: Connection, params: Mapping[str, Any], reason: str | None = None) -> bool:
    """Cancel a live task and its runs (``AppCore.task_params``), recording
    ``reason`` on the task. False if it had finished.

    Each attempt runs in a savepoint: an attempt whose snapshot missed the
    task's newest run (a retry created while it waited) cancels nothing but
    may hold the task row; rolling back to the savepoint releases it before
    the next attempt locks that run, so the lock order run -> task holds.
    """
    for _ in range(CANCEL_ATTEMPTS):
        with conn.begin_nested() as savepoint:
            row = conn.execute(_sql.cancel_task, {**params, "reason": reason}).one()
            AppCore.check_found(params, row.previous_state, row.task_queue)
            if row.cancelled:
                announce_done(conn, params["task"], row.task_queue, row.headers)
                return True
            if row.previous_state in TERMINAL_STATES:
                return False
            savepoint.rollback()
    raise TaskStateError(
        f"task {params['task']} kept changing while it was being cancelled; try again",
        task_id=params["task"],
    )


def fetch_result(conn: Connection, params: Mapping[str, Any]) -> TaskResultSnapshot | None:
    row = conn.execute(_sql.fetch_task_result, params).one_or_none()
    return AppCore.snapshot(params, row)


def announce_done(
    conn: Connection, task_id: uuid.UUID, queue: str, headers: Mapping[str, Any] | None
) -> None:
    """A finished child emits its done event in the transaction that finished it."""
    if not _children.is_child(headers):
        return
    snapshot = fetch_result(conn, {"task": task_id, "queue": None})
    if snapshot is None:
        return
    emit(
        conn,
        AppCore.emit_params_for(
            queue, _children.done_event(task_id), _children.done_payload(snapshot)
        ),
    )


# -- inspection (read-only) ----------------------------------------------------

_SNAPSHOT = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def _bound(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a statement built for ``params`` binds (filters not given
    are not in it)."""
    return {key: value for key, value in params.items() if value is not None}


def list_tasks(conn: Connection, params: Mapping[str, Any]) -> _inspect.TaskPage:
    """A page of ``_inspect.list_params``, newest first."""
    rows = conn.execute(_inspect.list_tasks(params), _bound(params)).all()
    return _inspect.page(rows, params)


def get_task(conn: Connection, task_id: uuid.UUID) -> _inspect.TaskDetail:
    """One task with its runs, checkpoints and children, from one snapshot
    (``conn`` is in a transaction of its own that has run nothing yet)."""
    conn.execute(_SNAPSHOT)
    params = {"task": task_id}
    row = conn.execute(_inspect.get_task, params).one_or_none()
    if row is None:
        raise TaskNotFound(f"task {task_id} not found", task_id=task_id)
    return _inspect.detail(
        row,
        conn.execute(_inspect.task_runs, params).all(),
        conn.execute(_inspect.task_checkpoints, params).all(),
        conn.execute(_inspect.task_children, params).all(),
    )


def queue_stats(conn: Connection, queue: str | None) -> list[_inspect.QueueStats]:
    """Per queue (one, or all): see ``_inspect.QueueStats``; one snapshot."""
    conn.execute(_SNAPSHOT)
    params = {"queue": queue}
    bound = _bound(params)
    return _inspect.stats(
        _queues(conn, queue),
        conn.execute(_inspect.state_counts(params), bound).all(),
        conn.execute(_inspect.oldest_due(params), bound).all(),
        conn.execute(_inspect.recent_finishes(params), bound).all(),
    )


def _queues(conn: Connection, queue: str | None) -> list[str]:
    """``[queue]`` if it exists (else ``QueueNotFound``), or every queue."""
    params = {"queue": queue}
    names = list(conn.scalars(_inspect.queue_names(params), _bound(params)))
    if queue is not None and not names:
        raise QueueNotFound(f"queue {queue!r} does not exist", queue=queue)
    return names


def list_events(
    conn: Connection, queue: str | None, limit: int, before: Any
) -> list[_inspect.EventInfo]:
    """Emitted events newest first: each queue's by its index, then merged."""
    found: list[_inspect.EventInfo] = []
    for name in _queues(conn, queue):
        params = {"queue": name, "limit": limit, "before": before}
        rows = conn.execute(_inspect.recent_events(params), _bound(params)).all()
        found += [_inspect.EventInfo(*row) for row in rows]
    found.sort(key=lambda event: event.emitted_at, reverse=True)
    return found[:limit]


def list_waits(conn: Connection, queue: str | None, limit: int) -> list[_inspect.WaitingTask]:
    if queue is not None:
        _queues(conn, queue)
    params = {"queue": queue, "limit": limit}
    rows = conn.execute(_inspect.waiting(params), _bound(params)).all()
    return [_inspect.WaitingTask(*row) for row in rows]


def queue_throughput(
    conn: Connection, queue: str | None, minutes: int
) -> list[_inspect.MinuteCount]:
    """Runs finished per minute, oldest minute first; every queue's summed
    unless ``queue`` is given. One indexed range per queue."""
    conn.execute(_SNAPSHOT)
    rows: list[Any] = []
    for name in _queues(conn, queue):
        params = {"queue": name, "minutes": minutes}
        rows += conn.execute(_inspect.finishes_per_minute(params), params).all()
    now = conn.execute(_inspect.db_now).scalar_one()
    return _inspect.minutes(rows, now, minutes)
