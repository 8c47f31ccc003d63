"""What the sync and async clients share and that needs no I/O: configuration,
the task registry, and turning calls into statement parameters and back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _core
from ._core import SpawnRequest, SpawnResult, TaskDefaults, TaskResultSnapshot
from ._sql import channel_for
from .errors import InvalidArgument, QueueNotFound

TaskHandler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class TaskRegistration:
    name: str
    handler: TaskHandler
    queue: str
    default_max_attempts: int | None
    default_cancellation: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Hooks:
    """Optional callbacks.

    ``before_spawn(request) -> request`` may rewrite every spawn (add headers
    for tracing, say). ``wrap_task(ctx, run) -> result`` wraps each handler call.
    """

    before_spawn: Callable[[SpawnRequest], SpawnRequest] | None = None
    wrap_task: Callable[[Any, Callable[[], Any]], Any] | None = None


@dataclass(frozen=True, slots=True)
class SpawnBatch:
    """Validated spawn requests for one queue, ready for the spawn statement."""

    queue: str
    rows: list[dict[str, Any]]
    positions: list[int]  # index of each row in the caller's request list

    @property
    def params(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "items": json.dumps(self.rows, separators=(",", ":")),
            "channel": channel_for(self.queue),
        }

    @property
    def keys(self) -> list[str]:
        return [row["idempotency_key"] for row in self.rows if row["idempotency_key"]]


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
        queue: str | None,
        default_max_attempts: int | None,
        default_cancellation: Mapping[str, Any] | None,
    ) -> TaskRegistration:
        _core.check_name("task name", name)
        registration = TaskRegistration(
            name=name,
            handler=handler,
            queue=self.queue(queue),
            default_max_attempts=_core.check_max_attempts(default_max_attempts),
            default_cancellation=_core.check_cancellation(default_cancellation),
        )
        self.registry[name] = registration
        return registration

    def defaults_for(self, task_name: str, queue: str | None) -> TaskDefaults:
        registration = self.registry.get(task_name)
        if registration is None:
            return TaskDefaults(self.queue(queue), self.default_max_attempts, None)
        max_attempts = registration.default_max_attempts
        return TaskDefaults(
            queue=self.queue(queue if queue is not None else registration.queue),
            max_attempts=max_attempts if max_attempts is not None else self.default_max_attempts,
            cancellation=registration.default_cancellation,
        )

    def spawn_batches(self, requests: Iterable[SpawnRequest]) -> list[SpawnBatch]:
        """Validate every request (raising before anything is written), grouped by queue."""
        grouped: dict[str, SpawnBatch] = {}
        for position, request in enumerate(requests):
            if not isinstance(request, SpawnRequest):
                raise InvalidArgument(f"spawn_many takes SpawnRequest items, got {request!r}")
            if self.hooks.before_spawn is not None:
                request = self.hooks.before_spawn(request)
            defaults = self.defaults_for(request.task_name, request.queue)
            batch = grouped.setdefault(defaults.queue, SpawnBatch(defaults.queue, [], []))
            batch.rows.append(_core.spawn_row(request, defaults, position))
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
            task_id = uuid.UUID(row["task_id"])
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

    @staticmethod
    def snapshot(row: Any) -> TaskResultSnapshot | None:
        if row is None:
            return None
        return _core.snapshot_from_row(row.state, row.result, row.failure_reason)

    def emit_params(self, event_name: str, payload: Any, queue_name: str | None) -> dict[str, Any]:
        queue = self.queue(queue_name)
        return {
            "queue": queue,
            "event": _core.check_name("event name", event_name),
            "payload_json": _core.encode_json("event payload", payload),
            "channel": channel_for(queue),
        }

    def task_params(self, task_id: uuid.UUID | str, queue_name: str | None) -> dict[str, Any]:
        try:
            tid = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id))
        except ValueError as exc:
            raise InvalidArgument(f"task_id must be a UUID, got {task_id!r}") from exc
        return {"task": tid, "queue": self.queue(queue_name)}
