"""Parent and child tasks, without I/O.

A task spawned with ``ctx.spawn`` carries its parent's id in the header
:data:`PARENT_HEADER` and an idempotency key derived from the parent's step, so
a replay finds the same child. When a child finishes (completes, fails for
good, is cancelled or times out its last lease) it emits the event
``$task:<child id>`` on its own queue with a snapshot of its outcome; a parent
waiting in ``ctx.await_task_result`` is woken by that event and checkpoints
the snapshot. The one I/O step, emitting that event in the transaction that
finished the child, is ``_ops.announce_done``; everything else lives here.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

from . import _core
from ._core import PARENT_HEADER, SpawnResult, TaskResultSnapshot
from .errors import InvalidArgument

TASK_EVENT_PREFIX = "$task:"


def is_child(headers: Mapping[str, Any] | None) -> bool:
    """Spawned by ``ctx.spawn``: finishing must also emit the parent's wake-up event."""
    return bool((headers or {}).get(PARENT_HEADER))


def done_event(task_id: uuid.UUID | str) -> str:
    """The event a child emits on its queue when it finishes."""
    return f"{TASK_EVENT_PREFIX}{task_id}"


def child_headers(headers: Mapping[str, Any] | None, parent_id: uuid.UUID) -> dict[str, Any]:
    """The caller's headers plus the parent's id. Headers that are not a mapping
    are refused as ``spawn`` refuses them, before anything is merged."""
    if headers is not None and not isinstance(headers, Mapping):
        raise InvalidArgument(f"headers must be a dict, got {_core.show(headers)}")
    return {**(headers or {}), PARENT_HEADER: str(parent_id)}


def child_key(parent_id: uuid.UUID, checkpoint_name: str) -> str:
    """A child's idempotency key: the same on every replay of the parent's step.

    A step name too long for a key (``$spawn:`` + a 255-character task name)
    is replaced by its digest, so every task name the API accepts can be spawned.
    """
    key = f"{parent_id}:{checkpoint_name}"
    if len(key) <= _core.MAX_NAME_LENGTH:
        return key
    digest = hashlib.sha256(checkpoint_name.encode("utf-8")).hexdigest()
    return f"{parent_id}:sha256:{digest}"


def check_parent(
    child_id: uuid.UUID, headers: Mapping[str, Any] | None, parent_id: uuid.UUID
) -> None:
    """Only a task's own children can be awaited durably (their done event names them)."""
    if (headers or {}).get(PARENT_HEADER) != str(parent_id):
        raise InvalidArgument(
            f"task {child_id} is not a child of task {parent_id}; "
            "spawn it with ctx.spawn() to await it",
            task_id=child_id,
        )


def spawn_checkpoint(result: SpawnResult) -> dict[str, Any]:
    """What the parent's spawn step stores."""
    return {"task_id": str(result.task_id), "run_id": str(result.run_id), "attempt": result.attempt}


def spawn_from_checkpoint(state: Mapping[str, Any]) -> SpawnResult:
    return SpawnResult(
        uuid.UUID(state["task_id"]), uuid.UUID(state["run_id"]), state["attempt"], False
    )


def done_payload(snapshot: TaskResultSnapshot) -> dict[str, Any]:
    """The done event's payload: the child's outcome."""
    return {"state": snapshot.state, "result": snapshot.result, "failure": snapshot.failure}


def snapshot_from_payload(payload: Mapping[str, Any]) -> TaskResultSnapshot:
    return _core.snapshot_from_row(payload["state"], payload.get("result"), payload.get("failure"))
