"""Exceptions raised by absurd_sqla.

Errors a caller should handle derive from :class:`AbsurdError` (an ``Exception``).
The signals used to suspend or stop a running task derive from
``BaseException`` so that a handler's ``except Exception:`` cannot swallow them.

Every error carries the ids it is about as attributes (``task_id``,
``run_id``, ``queue``, ``state``; ``None`` where they do not apply), so code can
act on them without parsing messages.
"""

from __future__ import annotations

import builtins
import uuid


class _Fields(BaseException):
    """The structured fields shared by errors and task signals."""

    def __init__(
        self,
        message: str,
        *,
        task_id: uuid.UUID | None = None,
        run_id: uuid.UUID | None = None,
        queue: str | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.run_id = run_id
        self.queue = queue
        self.state = state


class AbsurdError(_Fields, Exception):
    """Base class of every error absurd_sqla raises to callers."""


class InvalidArgument(AbsurdError, ValueError):
    """An argument was rejected before anything was written."""


class InvalidQueueName(InvalidArgument):
    """A queue name that is empty, too long or has characters outside ``[A-Za-z0-9_.-]``."""


class NotSerializable(InvalidArgument, TypeError):
    """Params, a payload or a step value that cannot be stored as JSON."""


class TaskAlreadyRegistered(InvalidArgument):
    """A second handler was registered under a task name this app already has."""


class QueueMismatch(InvalidArgument):
    """A task id was given with ``queue_name=`` naming another queue than the task's.

    ``queue`` is the task's real queue.
    """


class QueueNotFound(AbsurdError, LookupError):
    """The queue does not exist; create it with ``create_queue`` first."""


class TaskNotFound(AbsurdError, LookupError):
    """No task has that id."""


class TaskStateError(AbsurdError):
    """The task is not in a state that allows the operation (e.g. retrying a running task)."""


class TimeoutError(AbsurdError, builtins.TimeoutError):
    """A wait (for an event or a task result) passed its timeout."""


class SchemaNotCurrent(AbsurdError):
    """The database's ``absurd`` schema is not at the migration head this release ships.

    The message names the command that fixes it. ``status`` is the
    :class:`absurd_sqla.migrate.SchemaStatus` that was found.
    """

    def __init__(self, message: str, *, status: object = None) -> None:
        super().__init__(message)
        self.status = status


class TaskSignal(_Fields):
    """Control flow of a running task; never catch it in task code."""


class SuspendTask(TaskSignal):
    """The run is suspended (sleeping or waiting); the worker releases it."""


class CancelledTask(TaskSignal):
    """The task was cancelled; the worker stops running it."""


class LeaseLost(TaskSignal):
    """The run's lease expired or another worker owns it now; this worker is fenced."""
