"""``TaskContext``: what a sync task handler uses to checkpoint, sleep and wait."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import _sql_worker as sqlw
from ._core import SpawnResult, TaskResultSnapshot
from ._run import (
    PARENT_HEADER,
    RunState,
    StepHandle,
    snapshot_from_payload,
    task_done_event,
    wake_time,
)
from .errors import CancelledTask, InvalidArgument, TaskNotFound
from .models import tasks

if TYPE_CHECKING:
    from .client import Absurd

T = TypeVar("T")


class TaskContext:
    """Handed to every sync handler as ``ctx``. Steps are checkpointed: on a
    retry or after a suspension the handler runs again from the top, and every
    step that already finished returns its stored value instead of running.
    """

    def __init__(self, app: Absurd, state: RunState) -> None:
        self._app = app
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
        return self.complete_step(handle, fn())

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
        """First half of a step: ``handle.done`` tells whether ``handle.state`` is stored."""
        return self._state.begin(name)

    def complete_step(self, handle: StepHandle, value: T) -> T:
        """Checkpoint ``value`` for a step begun with :meth:`begin_step`."""
        if handle.done:
            return handle.state  # type: ignore[no-any-return]
        params = self._state.checkpoint_params(handle, value)
        row = self._app._one(sqlw.write_checkpoint, params)
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
        with self._app.session_factory() as session, session.begin():
            value = fn(session)
            session.flush()
            params = self._state.checkpoint_params(handle, value)
            row = session.connection().execute(sqlw.write_checkpoint, params).one()
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
        row = self._app._one(sqlw.sleep, params)
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
        handle = self._state.begin(step_name or f"$await:{event_name}")
        if handle.done:
            return self._state.replay_await(handle, event_name)
        return self._await(handle, event_name, self.queue_name, timeout)

    def _await(self, handle: StepHandle, event_name: str, queue: str, timeout: float | None) -> Any:
        params = self._state.await_params(handle, event_name, queue, timeout)
        row = self._app._one(sqlw.await_event, params)
        return self._state.after_await(handle, event_name, row)

    def emit_event(self, event_name: str, payload: Any = None) -> bool:
        """Emit an event on this task's queue (first emit wins).

        Fenced like a checkpoint: a worker that lost its lease, or whose task was
        cancelled, cannot emit (the lease check and the emit commit together).
        """
        with self._app.engine.begin() as conn:
            row = conn.execute(sqlw.heartbeat, self._state.heartbeat_params(None)).one()
            self._state.check_owned(row)
            return self._app.emit_event(
                event_name, payload, session=conn, queue_name=self.queue_name
            )

    def heartbeat(self, seconds: float | None = None) -> None:
        """Extend the lease by ``seconds`` (default: the worker's claim timeout)."""
        params = self._state.heartbeat_params(seconds)
        row = self._app._one(sqlw.heartbeat, params)
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
        handle = self._state.begin(step_name or f"$spawn:{task_name}")
        if handle.done:
            return self._state.spawn_from_checkpoint(handle.state)
        headers = {**(options.pop("headers", None) or {}), PARENT_HEADER: str(self.task_id)}
        options.setdefault("idempotency_key", self._state.child_key(handle))
        with self._app.engine.begin() as conn:
            result = self._app.spawn(task_name, params, session=conn, headers=headers, **options)
            value = self._state.spawn_checkpoint(result)
            row = conn.execute(
                sqlw.write_checkpoint, self._state.checkpoint_params(handle, value)
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
        child = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id))
        handle = self._state.begin(step_name or f"$await-task:{child}")
        event = task_done_event(child)
        if handle.done:
            return snapshot_from_payload(self._state.replay_await(handle, event))
        with self._app.engine.connect() as conn:
            row = conn.execute(
                select(tasks.c.queue_name, tasks.c.state, tasks.c.headers).where(
                    tasks.c.task_id == child
                )
            ).one_or_none()
        if row is None:
            raise TaskNotFound(f"no task {child}")
        if (row.headers or {}).get(PARENT_HEADER) != str(self.task_id):
            raise InvalidArgument(
                f"task {child} is not a child of this task; spawn it with ctx.spawn() to await it"
            )
        payload = self._await(handle, event, row.queue_name, timeout)
        return snapshot_from_payload(payload)

    # -- internals -----------------------------------------------------------

    def _enforce_max_duration(self, now: datetime) -> None:
        limit = (self._state.run.cancellation or {}).get("max_duration")
        if limit is None:
            return
        if (now - self._state.run.first_started_at).total_seconds() > limit:
            self._app.cancel_task(self.task_id, queue_name=self.queue_name)
            raise CancelledTask(f"task {self.task_id} ran longer than max_duration={limit}s")
