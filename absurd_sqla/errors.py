"""Exceptions raised by absurd_sqla.

Errors a caller should handle derive from :class:`AbsurdError` (an ``Exception``).
The signals used to suspend or stop a running task derive from
``BaseException`` so that a handler's ``except Exception:`` cannot swallow them.
"""

from __future__ import annotations

import builtins


class AbsurdError(Exception):
    """Base class of every error absurd_sqla raises to callers."""


class InvalidArgument(AbsurdError, ValueError):
    """An argument was rejected before anything was written."""


class InvalidQueueName(InvalidArgument):
    """A queue name that is empty, too long or has characters outside ``[A-Za-z0-9_.-]``."""


class NotSerializable(InvalidArgument, TypeError):
    """Params, a payload or a step value that cannot be stored as JSON."""


class QueueNotFound(AbsurdError, LookupError):
    """The queue does not exist; create it with ``create_queue`` first."""


class TaskNotFound(AbsurdError, LookupError):
    """No task with that id lives on that queue."""


class TaskStateError(AbsurdError):
    """The task is not in a state that allows the operation (e.g. retrying a running task)."""


class TimeoutError(AbsurdError, builtins.TimeoutError):
    """A wait (for an event or a task result) passed its timeout."""


class TaskSignal(BaseException):
    """Control flow of a running task; never catch it in task code."""


class SuspendTask(TaskSignal):
    """The run is suspended (sleeping or waiting); the worker releases it."""


class CancelledTask(TaskSignal):
    """The task was cancelled; the worker stops running it."""


class LeaseLost(TaskSignal):
    """The run's lease expired or another worker owns it now; this worker is fenced."""
