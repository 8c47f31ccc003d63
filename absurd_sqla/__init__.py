"""absurd_sqla: durable execution on PostgreSQL, as a SQLAlchemy extension."""

from ._app import Hooks
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot, uuid7
from ._current import get_current_context
from ._run import StepHandle
from .client import Absurd
from .client_async import AsyncAbsurd
from .context import TaskContext
from .context_async import AsyncTaskContext
from .errors import (
    AbsurdError,
    CancelledTask,
    InvalidArgument,
    InvalidQueueName,
    LeaseLost,
    NotSerializable,
    QueueMismatch,
    QueueNotFound,
    SuspendTask,
    TaskAlreadyRegistered,
    TaskNotFound,
    TaskSignal,
    TaskStateError,
    TimeoutError,
)
from .models import metadata

__all__ = [
    "Absurd",
    "AbsurdError",
    "AsyncAbsurd",
    "AsyncTaskContext",
    "CancelledTask",
    "Hooks",
    "InvalidArgument",
    "InvalidQueueName",
    "LeaseLost",
    "NotSerializable",
    "QueueMismatch",
    "QueueNotFound",
    "SpawnRequest",
    "SpawnResult",
    "StepHandle",
    "SuspendTask",
    "TaskAlreadyRegistered",
    "TaskContext",
    "TaskNotFound",
    "TaskResultSnapshot",
    "TaskSignal",
    "TaskStateError",
    "TimeoutError",
    "get_current_context",
    "metadata",
    "uuid7",
]
__version__ = "0.1.0"
