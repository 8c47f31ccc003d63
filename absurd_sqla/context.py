# GENERATED from absurd_sqla/context_async.py by ci/generate_sync.py: do not edit.
# Change context_async.py and run `python ci/generate_sync.py`.
"""``TaskContext``: what a task handler uses to checkpoint, sleep and wait."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar, overload

from sqlalchemy.orm import Session

from . import _children, _core, _ops, _sql
from . import _sql_worker as sqlw
from ._app import AppCore
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot
from ._db import Database
from ._run import RunState, StepHandle, wake_time
from .errors import CancelledTask, TaskNotFound

T = TypeVar("T")


class TaskContext:
    """Handed to every handler as ``ctx``. Steps are checkpointed: on a
    retry or after a suspension the handler runs again from the top, and every
    step that already finished returns its stored value instead of running.
    """

    def __init__(self, db: Database, core: AppCore, state: RunState) -> None:
        self._db = db
        self._core = core
        self._state = state

    # -- identity ------------------------------------------------------------

    @property
    def task_id(self) -> uuid.UUID:
        return self._state.run.task_id

    @property
    def run_id(self) -> uuid.UUID:
        return self._state.run.run_id

    @property
    def attempt(self) -> int:
        return self._state.run.attempt

    @property
    def task_name(self) -> str:
        return self._state.run.task_name

    @property
    def queue_name(self) -> str:
        return self._state.run.queue_name

    @property
    def headers(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self._state.run.headers))

    # -- steps ---------------------------------------------------------------

    def step(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` once and checkpoint its JSON value; on replay return the value."""
        handle = self._state.begin(name)
        if handle.done:
            return handle.state  # type: ignore[no-any-return]
        return self.complete_step(handle, self._run_step_function(name, fn))

    @overload
    def run_step(self, name_or_fn: Callable[[], T]) -> T: ...
    @overload
    def run_step(self, name_or_fn: str | None = None) -> Callable[[Callable[[], T]], T]: ...

    def run_step(self, name_or_fn: Any = None) -> Any:
        """Decorator form of :meth:`step`; the function is replaced by its value.

        ``@ctx.run_step``, ``@ctx.run_step()`` (name = function name) and
        ``@ctx.run_step("name")``.
        """
        if callable(name_or_fn):
            return self.step(name_or_fn.__name__, name_or_fn)

        def decorate(fn: Callable[[], T]) -> T:
            return self.step(name_or_fn or fn.__name__, fn)

        return decorate

    def begin_step(self, name: str) -> StepHandle:
        """First half of a step: ``handle.done`` tells whether ``handle.state`` is stored.

        It does no I/O: the run's checkpoints were loaded with the run."""
        return self._state.begin(name)

    def complete_step(self, handle: StepHandle, value: T) -> T:
        """Checkpoint ``value`` for a step begun with :meth:`begin_step`."""
        if handle.done:
            return handle.state  # type: ignore[no-any-return]
        params = self._state.checkpoint_params(handle, value)
        row = self._db.checkpoints.write(params)
        self._enforce_max_duration(row.now)
        return self._state.after_checkpoint(handle, value, row)  # type: ignore[no-any-return]

    def transaction_step(self, name: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` and checkpoint its value in ONE transaction.

        The session comes from the app's Session factory. Its writes commit
        together with the checkpoint, or not at all: if this worker lost its
        lease or the task was cancelled, the checkpoint is refused and the
        whole transaction, ``fn``'s writes included, rolls back. A database side
        effect inside a transaction step therefore happens exactly once.
        """
        handle = self._state.begin(name)
        if handle.done:
            return handle.state  # type: ignore[no-any-return]
        with self._db.session() as session, session.begin():
            value = self._run_step_function(name, lambda: fn(session))
            session.flush()
            params = self._state.checkpoint_params(handle, value)
            row = (session.connection().execute(sqlw.write_checkpoint, params)).one()
            self._state.check_owned(row)  # raises -> rollback of fn's writes too
        self._enforce_max_duration(row.now)
        return self._state.after_checkpoint(handle, value, row)  # type: ignore[no-any-return]

    # -- time ----------------------------------------------------------------

    def sleep_for(self, step_name: str, seconds: float | timedelta) -> None:
        """Suspend the run for ``seconds`` (database time); the wake time is checkpointed."""
        self._sleep(step_name, seconds)

    def sleep_until(self, step_name: str, when: datetime) -> None:
        """Suspend the run until ``when`` (timezone-aware)."""
        self._sleep(step_name, when)

    def _sleep(self, step_name: str, when: datetime | timedelta | float) -> None:
        wake_at, seconds = wake_time(when)
        handle = self._state.begin(step_name)
        params = self._state.sleep_params(handle, wake_at=wake_at, seconds=seconds)
        row = self._db.one(sqlw.sleep, params, retry=True)
        self._state.after_sleep(handle, row)

    # -- events --------------------------------------------------------------

    def await_event(
        self,
        event_name: str,
        *,
        step_name: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Return the event's payload, suspending the run until it is emitted.

        An event emitted before the call is returned at once. With ``timeout``
        (seconds, floats welcome) raises :class:`absurd_sqla.TimeoutError`; the
        timeout is checkpointed, so a replay raises again rather than waiting.
        """
        _core.check_name("event name", event_name)
        handle = self._state.begin_named(step_name, "$await:", event_name)
        if handle.done:
            return self._state.replay_await(handle, event_name)
        return self._await(handle, event_name, self.queue_name, timeout)

    def _await(self, handle: StepHandle, event_name: str, queue: str, timeout: float | None) -> Any:
        params = self._state.await_params(handle, event_name, queue, timeout)
        row = self._db.one(sqlw.await_event, params, retry=True)
        return self._state.after_await(handle, event_name, row)

    def emit_event(self, event_name: str, payload: Any = None) -> bool:
        """Emit an event on this task's queue (first emit wins).

        Fenced like a checkpoint: a worker that lost its lease, or whose task was
        cancelled, cannot emit (the lease check and the emit commit together).
        """
        params = self._core.emit_params(event_name, payload, self.queue_name)
        with self._db.transaction() as conn:
            row = conn.execute(sqlw.heartbeat, self._state.heartbeat_params(None)).one()
            self._state.check_owned(row)
            return _ops.emit(conn, params)

    def heartbeat(self, seconds: float | None = None) -> None:
        """Extend the lease by ``seconds`` (default: the worker's claim timeout)."""
        params = self._state.heartbeat_params(seconds)
        row = self._db.one(sqlw.heartbeat, params, retry=True)
        self._state.check_owned(row)
        self._enforce_max_duration(row.now)

    # -- child tasks ---------------------------------------------------------

    def spawn(
        self,
        task_name: str,
        params: Any = None,
        *,
        step_name: str | None = None,
        **options: Any,
    ) -> SpawnResult:
        """Spawn a child task, exactly once across replays (keyed by this step)."""
        _core.check_name("task name", task_name)
        handle = self._state.begin_named(step_name, "$spawn:", task_name)
        if handle.done:
            return _children.spawn_from_checkpoint(handle.state)
        options["headers"] = _children.child_headers(options.get("headers"), self.task_id)
        options.setdefault(
            "idempotency_key", _children.child_key(self.task_id, handle.checkpoint_name)
        )
        batches = self._core.spawn_batches([SpawnRequest(task_name, params, **options)])
        with self._db.transaction() as conn:
            (result,) = _ops.spawn_many(self._db, conn, self._core, batches)
            value = _children.spawn_checkpoint(result)
            row = (
                conn.execute(sqlw.write_checkpoint, self._state.checkpoint_params(handle, value))
            ).one()
            self._state.check_owned(row)
        self._state.after_checkpoint(handle, value, row)
        return result

    def await_task_result(
        self,
        task_id: uuid.UUID | str,
        *,
        timeout: float | None = None,
        step_name: str | None = None,
    ) -> TaskResultSnapshot:
        """Durably wait for a child task spawned with :meth:`spawn`.

        The run suspends (freeing the worker) until the child finishes; the
        snapshot is checkpointed, so replays return it without waiting.
        """
        child = _core.check_task_id(task_id)
        handle = self._state.begin_named(step_name, "$await-task:", str(child))
        event = _children.done_event(child)
        if handle.done:
            return _children.snapshot_from_payload(self._state.replay_await(handle, event))
        row = self._db.one_or_none(_sql.task_identity, {"task": child})
        if row is None:
            raise TaskNotFound(f"task {child} not found", task_id=child)
        _children.check_parent(child, row.headers, self.task_id)
        payload = self._await(handle, event, row.queue_name, timeout)
        return _children.snapshot_from_payload(payload)

    # -- internals -----------------------------------------------------------

    def _run_step_function(self, name: str, fn: Callable[[], T]) -> T:
        """``fn()``, through ``Hooks.wrap_step`` if there is one."""
        wrap = self._core.hooks.wrap_step
        if wrap is None:
            return fn()
        return wrap(self, name, fn)  # type: ignore[no-any-return]

    def _enforce_max_duration(self, now: datetime) -> None:
        limit = (self._state.run.cancellation or {}).get("max_duration")
        if limit is None:
            return
        if (now - self._state.run.first_started_at).total_seconds() > limit:
            reason = f"ran longer than max_duration={limit}s"
            with self._db.transaction() as conn:
                _ops.cancel(conn, self._core.task_params(self.task_id, None), reason)
            raise CancelledTask(
                f"task {self.task_id} {reason}",
                task_id=self.task_id,
                run_id=self.run_id,
                state="cancelled",
            )
