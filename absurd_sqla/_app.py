"""What the sync and async clients share and that needs no I/O: configuration,
the task registry, and turning calls into statement parameters and back.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _children, _core
from ._core import SpawnRequest, SpawnResult, TaskDefaults, TaskResultSnapshot
from ._sql import SPAWN_FIELDS, channel_for
from .errors import (
    InvalidArgument,
    QueueMismatch,
    QueueNotFound,
    TaskAlreadyRegistered,
    TaskNotFound,
    TaskStateError,
)

TaskHandler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class TaskRegistration:
    """A handler and the defaults every spawn of its task uses unless it overrides them."""

    name: str
    handler: TaskHandler
    queue: str
    max_attempts: int | None
    retry_strategy: Mapping[str, Any] | None
    cancellation: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """A worker's checked arguments (``work_batch`` uses the first four)."""

    queue: str
    worker_id: str
    claim_timeout: float
    batch_size: int
    concurrency: int = 1
    poll_interval: float = 0.25
    shutdown_timeout: float | None = None
    handle_signals: bool = True

    @property
    def connections_needed(self) -> int:
        """Pool connections this worker needs: one per handler, one for the claim
        loop, one spare for a handler holding two (its own session across a step).
        docs/howto/workers.md states the same rule."""
        return self.concurrency + 2

    @classmethod
    def checked(
        cls,
        queue: str,
        worker_id: object,
        claim_timeout: object,
        batch_size: object,
        concurrency: object = 1,
        poll_interval: object = 0.25,
        shutdown_timeout: object = None,
        handle_signals: object = True,
    ) -> WorkerSettings:
        return cls(
            queue=queue,
            worker_id=_core.check_name("worker_id", worker_id),
            claim_timeout=_core.check_claim_timeout(claim_timeout),
            batch_size=_core.check_positive_int("batch_size", batch_size),
            concurrency=_core.check_positive_int("concurrency", concurrency),
            poll_interval=_core.check_poll_interval(poll_interval),
            shutdown_timeout=_core.check_seconds("shutdown_timeout", shutdown_timeout),
            handle_signals=_core.check_flag("handle_signals", handle_signals),
        )


@dataclass(frozen=True, slots=True)
class Hooks:
    """Optional callbacks.

    ``before_spawn(request) -> request`` may rewrite every spawn (add headers
    for tracing, say; ``request.parent_task_id`` names the task spawning it with
    ``ctx.spawn``). ``wrap_task(ctx, call) -> result`` wraps each handler call,
    ``wrap_step(ctx, name, call) -> value`` each step function that runs (not a
    step replayed from its checkpoint; ``transaction_step``'s function too). With
    ``AsyncAbsurd`` the two wrappers return awaitables (``call()`` is one).
    """

    before_spawn: Callable[[SpawnRequest], SpawnRequest] | None = None
    wrap_task: Callable[[Any, Callable[[], Any]], Any] | None = None
    wrap_step: Callable[[Any, str, Callable[[], Any]], Any] | None = None


@dataclass(frozen=True, slots=True)
class SpawnBatch:
    """Validated spawn requests for one queue, ready for the spawn statement."""

    queue: str
    rows: list[dict[str, Any]]
    positions: list[int]  # index of each row in the caller's request list

    @property
    def params(self) -> dict[str, Any]:
        """The parameters of ``_sql.spawn``: each field an array, one value per row."""
        columns = {name: [row[name] for row in self.rows] for name in SPAWN_FIELDS}
        return {**columns, "queue": self.queue, "channel": channel_for(self.queue)}

    @property
    def one_params(self) -> dict[str, Any]:
        """The parameters of ``_sql.spawn_one`` for a batch of one row."""
        (row,) = self.rows
        return {**row, "queue": self.queue, "channel": channel_for(self.queue)}

    @property
    def keys(self) -> list[str]:
        return [row["idempotency_key"] for row in self.rows if row["idempotency_key"]]


def check_sync_handler(name: str, handler: TaskHandler) -> TaskHandler:
    """``Absurd`` runs plain functions; a coroutine function belongs on ``AsyncAbsurd``."""
    if inspect.iscoroutinefunction(handler):
        raise InvalidArgument(
            f"the handler of task {name!r} is an async def: register it on AsyncAbsurd, "
            "or make it a plain def for Absurd"
        )
    return handler


def check_async_handler(name: str, handler: TaskHandler) -> TaskHandler:
    """``AsyncAbsurd`` awaits its handlers; a plain function belongs on ``Absurd``."""
    if callable(handler) and not inspect.iscoroutinefunction(handler):
        raise InvalidArgument(
            f"the handler of task {name!r} is a plain def: make it an async def for "
            "AsyncAbsurd, or register it on Absurd"
        )
    return handler


class AppCore:
    """Configuration and registry; the clients add I/O on top."""

    def __init__(
        self,
        queue_name: str = "default",
        default_max_attempts: int | None = 5,
        hooks: Hooks | None = None,
    ) -> None:
        self.queue_name = _core.check_queue_name(queue_name)
        self.default_max_attempts = _core.check_max_attempts(default_max_attempts)
        self.hooks = hooks or Hooks()
        self.registry: dict[str, TaskRegistration] = {}

    def queue(self, name: str | None) -> str:
        return _core.check_queue_name(self.queue_name if name is None else name)

    def register(
        self,
        name: str,
        handler: TaskHandler,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        retry_strategy: Mapping[str, Any] | None = None,
        cancellation: Mapping[str, Any] | None = None,
    ) -> TaskRegistration:
        """Check everything, then add the task; a name registered twice is an error."""
        _core.check_name("task name", name)
        if not callable(handler):
            raise InvalidArgument(f"the handler of task {name!r} must be callable, got {handler!r}")
        registration = TaskRegistration(
            name=name,
            handler=handler,
            queue=self.queue(queue),
            max_attempts=_core.check_max_attempts(max_attempts),
            retry_strategy=_core.check_retry_strategy(retry_strategy),
            cancellation=_core.check_cancellation(cancellation),
        )
        if name in self.registry:
            raise TaskAlreadyRegistered(
                f"task {name!r} is already registered (to {self.registry[name].handler!r}); "
                "register each task name once per app"
            )
        self.registry[name] = registration
        return registration

    def defaults_for(self, task_name: str, queue: str | None) -> TaskDefaults:
        registration = self.registry.get(task_name)
        if registration is None:
            return TaskDefaults(self.queue(queue), self.default_max_attempts, None)
        max_attempts = registration.max_attempts
        return TaskDefaults(
            queue=self.queue(queue if queue is not None else registration.queue),
            max_attempts=max_attempts if max_attempts is not None else self.default_max_attempts,
            cancellation=registration.cancellation,
            retry_strategy=registration.retry_strategy,
        )

    def spawn_batches(self, requests: Iterable[SpawnRequest]) -> list[SpawnBatch]:
        """Validate every request (raising before anything is written), grouped by queue."""
        grouped: dict[str, SpawnBatch] = {}
        for position, request in enumerate(requests):
            if not isinstance(request, SpawnRequest):
                raise InvalidArgument(
                    f"spawn_many takes SpawnRequest items, got {_core.show(request)}"
                )
            if self.hooks.before_spawn is not None:
                request = self.hooks.before_spawn(request)
                if not isinstance(request, SpawnRequest):
                    raise InvalidArgument(
                        f"hooks.before_spawn must return a SpawnRequest, got {_core.show(request)}"
                    )
            # The name first: the registry lookup below needs a hashable one.
            _core.check_name("task name", request.task_name)
            defaults = self.defaults_for(request.task_name, request.queue)
            batch = grouped.setdefault(defaults.queue, SpawnBatch(defaults.queue, [], []))
            batch.rows.append(_core.spawn_row(request, defaults))
            batch.positions.append(position)
        # Queue order, like key order inside a batch: a fixed lock order.
        return [grouped[queue] for queue in sorted(grouped)]

    @staticmethod
    def check_queues_exist(batches: Sequence[SpawnBatch], found: Iterable[str]) -> None:
        missing = sorted({batch.queue for batch in batches} - set(found))
        if missing:
            raise QueueNotFound(f"queue {missing[0]!r} does not exist; create_queue() it first")

    @staticmethod
    def spawn_results(
        batch: SpawnBatch,
        inserted: Sequence[Any],
        existing: Sequence[Any],
    ) -> list[tuple[int, SpawnResult]]:
        """Match statement rows back to requests; raise if the queue was missing."""
        created = {row.task_id: row.run_id for row in inserted}
        by_key = {row.idempotency_key: row for row in existing}
        results: list[tuple[int, SpawnResult]] = []
        for position, row in zip(batch.positions, batch.rows, strict=True):
            task_id = row["task_id"]
            if task_id in created:
                results.append((position, SpawnResult(task_id, created[task_id], 1, True)))
                continue
            found = by_key.get(row["idempotency_key"])
            if found is None:
                raise QueueNotFound(
                    f"queue {batch.queue!r} does not exist; create_queue() it first"
                )
            results.append(
                (position, SpawnResult(found.task_id, found.last_run_id, found.attempts, False))
            )
        return results

    @classmethod
    def snapshot(cls, params: Mapping[str, Any], row: Any) -> TaskResultSnapshot | None:
        """``fetch_task_result``'s answer: None for an unknown task."""
        if row is None:
            return None
        cls.check_found(params, row.state, row.queue_name)
        return _core.snapshot_from_row(row.state, row.result, row.failure_reason)

    def emit_params(self, event_name: str, payload: Any, queue_name: str | None) -> dict[str, Any]:
        return self.emit_params_for(self.queue(queue_name), event_name, payload)

    @staticmethod
    def emit_params_for(queue: str, event_name: str, payload: Any) -> dict[str, Any]:
        _core.check_name("event name", event_name)
        # A finished child's done event wraps its result (checked when it was
        # stored) one level deeper: {"state": ..., "result": ...}.
        depth = _core.MAX_JSON_DEPTH
        if event_name.startswith(_children.TASK_EVENT_PREFIX):
            depth += 1
        return {
            "queue": queue,
            "event": event_name,
            "payload_json": _core.encode_json("event payload", payload, max_depth=depth),
            "channel": channel_for(queue),
        }

    @staticmethod
    def task_params(task_id: uuid.UUID | str, queue_name: str | None) -> dict[str, Any]:
        """Parameters of a statement that finds a task by id; ``queue`` is None
        (any queue) unless the caller named one, which must then match."""
        return {
            "task": _core.check_task_id(task_id),
            "queue": None if queue_name is None else _core.check_queue_name(queue_name),
        }

    @staticmethod
    def check_found(params: Mapping[str, Any], state: str | None, task_queue: str | None) -> None:
        """Raise if the task does not exist, or lives on another queue than the caller named."""
        if state is None or task_queue is None:
            raise TaskNotFound(f"task {params['task']} not found", task_id=params["task"])
        if params["queue"] is not None and params["queue"] != task_queue:
            raise QueueMismatch(
                f"task {params['task']} is on queue {task_queue!r}, not {params['queue']!r}",
                task_id=params["task"],
                queue=task_queue,
                state=state,
            )

    @classmethod
    def check_retryable(
        cls, params: Mapping[str, Any], state: str | None, task_queue: str | None
    ) -> None:
        cls.check_found(params, state, task_queue)
        if state != "failed":
            raise TaskStateError(
                f"only failed tasks can be retried; task {params['task']} is {state}",
                task_id=params["task"],
                queue=task_queue,
                state=state,
            )
