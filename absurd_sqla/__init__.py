"""absurd_sqla: durable execution on PostgreSQL, as a SQLAlchemy extension."""

from ._app import Hooks
from ._core import SpawnRequest, SpawnResult, TaskResultSnapshot, uuid7
from ._current import get_current_context
from ._engine import discard_closed_connections
from ._inspect import (
    CheckpointInfo,
    ChildInfo,
    EventInfo,
    MinuteCount,
    QueueStats,
    RunInfo,
    TaskDetail,
    TaskPage,
    TaskSummary,
    WaitInfo,
    WaitingTask,
)
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
    SchemaNotCurrent,
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
    "CheckpointInfo",
    "ChildInfo",
    "EventInfo",
    "Hooks",
    "InvalidArgument",
    "InvalidQueueName",
    "LeaseLost",
    "MinuteCount",
    "NotSerializable",
    "QueueMismatch",
    "QueueNotFound",
    "QueueStats",
    "RunInfo",
    "SchemaNotCurrent",
    "SpawnRequest",
    "SpawnResult",
    "StepHandle",
    "SuspendTask",
    "TaskAlreadyRegistered",
    "TaskContext",
    "TaskDetail",
    "TaskNotFound",
    "TaskPage",
    "TaskResultSnapshot",
    "TaskSignal",
    "TaskStateError",
    "TaskSummary",
    "TimeoutError",
    "WaitInfo",
    "WaitingTask",
    "discard_closed_connections",
    "get_current_context",
    "metadata",
    "uuid7",
]
__version__ = "0.1.0"
