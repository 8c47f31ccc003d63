"""Read-only inspection: what the tasks are doing, for people and dashboards.

The result types, the argument checks and the Core statements, I/O-free and
shared by ``Absurd`` and ``AsyncAbsurd``. Every listing is backed by an index
(see ``models``): tasks newest first by id (UUIDv7, so by creation time) within
a queue, a state or a task name; a task's children by the header naming it;
recent finishes by ``runs.finished_at``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import TIMESTAMP, UUID
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from . import _core
from ._children import TASK_EVENT_PREFIX
from ._core import PARENT_HEADER
from ._sql import NOW, state_in
from .errors import InvalidArgument
from .models import (
    TASK_STATES,
    TERMINAL_STATES,
    checkpoints,
    events,
    queues,
    runs,
    tasks,
    waits,
)

MAX_PAGE = 1000
_CLAIMABLE = ("pending", "sleeping")

# -- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitInfo:
    """What a live task waits for now.

    ``kind``: ``"event"`` (``event_name``; ``until`` is the timeout, if any),
    ``"task"`` (a child task, ``task_id``; ``until`` as for an event), ``"sleep"``
    (until ``until``), or ``"scheduled"`` (a pending run due at ``until``: a
    retry's delay or a spawn's ``run_after``).
    """

    kind: str
    until: datetime | None = None
    event_name: str | None = None
    step_name: str | None = None
    task_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """One row of :meth:`Absurd.list_tasks`. ``created_at`` is the time in the
    task's id (UUIDv7, the spawning client's clock, to the millisecond)."""

    task_id: uuid.UUID
    task_name: str
    queue_name: str
    state: str
    attempts: int
    max_attempts: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    waiting_for: WaitInfo | None


@dataclass(frozen=True, slots=True)
class TaskPage(Sequence[TaskSummary]):
    """A page of tasks, newest first. ``next_cursor`` is the ``after=`` of the
    next page, None on the last one."""

    tasks: list[TaskSummary]
    next_cursor: uuid.UUID | None

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[TaskSummary]:
        return iter(self.tasks)

    def __getitem__(self, index: Any) -> Any:
        return self.tasks[index]


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One attempt. ``worker`` is the worker that claimed it last, kept after
    the run ends (a ``$ClaimTimeout`` failure still names the worker that died);
    None for a run never claimed, or suspended and not claimed again."""

    run_id: uuid.UUID
    attempt: int
    state: str
    worker: str | None
    created_at: datetime
    available_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    failure: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A stored step: its checkpoint name, value, and when it was written."""

    name: str
    value: Any
    updated_at: datetime
    run_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ChildInfo:
    task_id: uuid.UUID
    task_name: str
    queue_name: str
    state: str


@dataclass(frozen=True, slots=True)
class TaskDetail:
    """Everything about one task (:meth:`Absurd.get_task`). ``failure`` is the
    last run's failure (name, message, traceback) when the task failed."""

    task_id: uuid.UUID
    task_name: str
    queue_name: str
    state: str
    attempts: int
    max_attempts: int | None
    created_at: datetime
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: Any
    headers: dict[str, Any] | None
    retry_strategy: dict[str, Any] | None
    cancellation: dict[str, Any] | None
    idempotency_key: str | None
    result: Any
    failure: dict[str, Any] | None
    cancel_reason: str | None
    waiting_for: WaitInfo | None
    parent_id: uuid.UUID | None
    runs: list[RunInfo] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    children: list[ChildInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue now: tasks per state (every state present, 0 if none), the age
    of its oldest due run not yet claimed, and runs finished lately."""

    queue_name: str
    counts: dict[str, int]
    oldest_due_age: timedelta | None
    completed_last_minute: int
    failed_last_minute: int
    completed_last_hour: int
    failed_last_hour: int


@dataclass(frozen=True, slots=True)
class EventInfo:
    """An emitted event (:meth:`Absurd.list_events`)."""

    queue_name: str
    event_name: str
    payload: Any
    emitted_at: datetime


@dataclass(frozen=True, slots=True)
class WaitingTask:
    """A run suspended in ``await_event`` (or a parent awaiting a child):
    :meth:`Absurd.list_waits`."""

    task_id: uuid.UUID
    task_name: str
    queue_name: str
    event_name: str
    step_name: str
    timeout_at: datetime | None
    waiting_since: datetime


@dataclass(frozen=True, slots=True)
class MinuteCount:
    """Runs that finished in one minute (:meth:`Absurd.queue_throughput`)."""

    minute: datetime
    completed: int
    failed: int


# -- arguments -----------------------------------------------------------------


def created_at(task_id: uuid.UUID) -> datetime:
    """The millisecond timestamp in a UUIDv7."""
    return datetime.fromtimestamp((task_id.int >> 80) / 1000, UTC)


def first_id_at(when: datetime) -> uuid.UUID:
    """The smallest UUIDv7 of the millisecond ``when`` (a lower bound on ids)."""
    millis = max(0, int(when.timestamp() * 1000))
    return uuid.UUID(int=(millis << 80) | (0x7 << 76) | (0b10 << 62))


def check_limit(limit: object) -> int:
    page = _core.check_positive_int("limit", limit)
    if page > MAX_PAGE:
        raise InvalidArgument(f"limit must be at most {MAX_PAGE}, got {page}")
    return page


def check_minutes(minutes: object) -> int:
    span = _core.check_positive_int("minutes", minutes)
    if span > 1440:
        raise InvalidArgument(f"minutes must be at most 1440 (a day), got {span}")
    return span


def list_params(
    *,
    queue: object,
    state: object,
    task_name: object,
    since: object,
    limit: object,
    after: object,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Checked filters of ``list_tasks``, as statement parameters."""
    if state is not None and state not in TASK_STATES:
        raise InvalidArgument(f"state must be one of {', '.join(TASK_STATES)}, got {state!r}")
    if isinstance(since, timedelta):
        since = (now or datetime.now(UTC)) - since
    if since is not None and not isinstance(since, datetime):
        raise InvalidArgument(
            f"since must be a timezone-aware datetime or a timedelta, got {_core.show(since)}"
        )
    page = check_limit(limit)
    return {
        "queue": None if queue is None else _core.check_queue_name(queue),
        "state": state,
        "task_name": None if task_name is None else _core.check_name("task_name", task_name),
        "since": None if since is None else first_id_at(_core.check_aware("since", since)),
        "after": None if after is None else _core.check_task_id(after),
        "limit": page + 1,  # one more: is there a next page?
    }


# -- statements ----------------------------------------------------------------

_last_run = runs.alias("last_run")
_wait = waits.alias("wait")


def _waiting_columns() -> list[ColumnElement[Any]]:
    return [
        _last_run.c.state.label("run_state"),
        _last_run.c.available_at.label("run_available_at"),
        _wait.c.event_name.label("wait_event"),
        _wait.c.step_name.label("wait_step"),
        _wait.c.timeout_at.label("wait_timeout"),
        NOW.label("now"),  # is a pending run due yet?
    ]


_task_columns = [
    tasks.c.task_id,
    tasks.c.task_name,
    tasks.c.queue_name,
    tasks.c.state,
    tasks.c.attempts,
    tasks.c.max_attempts,
    tasks.c.first_started_at,
    tasks.c.finished_at,
]
_with_last_run = tasks.outerjoin(_last_run, _last_run.c.run_id == tasks.c.last_run_id).outerjoin(
    _wait, _wait.c.run_id == tasks.c.last_run_id
)


def list_tasks(params: Mapping[str, Any]) -> Select[Any]:
    """Newest first; only the filters given become conditions, so each
    filter's index can serve the ordering."""
    conditions = []
    for key, column in (
        ("queue", tasks.c.queue_name),
        ("state", tasks.c.state),
        ("task_name", tasks.c.task_name),
    ):
        if params[key] is not None:
            conditions.append(column == bindparam(key, type_=Text))
    if params["since"] is not None:
        conditions.append(tasks.c.task_id >= bindparam("since", type_=UUID(as_uuid=True)))
    if params["after"] is not None:
        conditions.append(tasks.c.task_id < bindparam("after", type_=UUID(as_uuid=True)))
    return (
        select(*_task_columns, *_waiting_columns())
        .select_from(_with_last_run)
        .where(and_(True, *conditions))
        .order_by(tasks.c.task_id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


_task_param = bindparam("task", type_=UUID(as_uuid=True))

get_task = (
    select(
        *_task_columns,
        tasks.c.enqueued_at,
        tasks.c.params,
        tasks.c.headers,
        tasks.c.retry_strategy,
        tasks.c.cancellation,
        tasks.c.idempotency_key,
        tasks.c.result,
        tasks.c.cancel_reason,
        _last_run.c.failure_reason.label("last_failure"),
        *_waiting_columns(),
    )
    .select_from(_with_last_run)
    .where(tasks.c.task_id == _task_param)
)

task_runs = (
    select(
        runs.c.run_id,
        runs.c.attempt,
        runs.c.state,
        runs.c.claimed_by,
        runs.c.created_at,
        runs.c.available_at,
        runs.c.started_at,
        runs.c.finished_at,
        runs.c.claim_expires_at,
        runs.c.failure_reason,
    )
    .where(runs.c.task_id == _task_param)
    .order_by(runs.c.attempt)
)

task_checkpoints = (
    select(
        checkpoints.c.checkpoint_name,
        checkpoints.c.state,
        checkpoints.c.updated_at,
        checkpoints.c.owner_run_id,
    )
    .where(checkpoints.c.task_id == _task_param)
    .order_by(checkpoints.c.updated_at, checkpoints.c.checkpoint_name)
)

_parent_of = tasks.c.headers.op("->>")(PARENT_HEADER)
task_children = (
    select(tasks.c.task_id, tasks.c.task_name, tasks.c.queue_name, tasks.c.state)
    .where(_parent_of == cast(_task_param, Text))
    .order_by(tasks.c.task_id)
)

_queue_param = bindparam("queue", type_=Text)


def _for_queue(column: ColumnElement[str], params: Mapping[str, Any]) -> list[Any]:
    return [] if params["queue"] is None else [column == _queue_param]


def queue_names(params: Mapping[str, Any]) -> Select[Any]:
    return (
        select(queues.c.queue_name)
        .where(*_for_queue(queues.c.queue_name, params))
        .order_by(queues.c.queue_name)
    )


def state_counts(params: Mapping[str, Any]) -> Select[Any]:
    return (
        select(tasks.c.queue_name, tasks.c.state, func.count().label("n"))
        .where(*_for_queue(tasks.c.queue_name, params))
        .group_by(tasks.c.queue_name, tasks.c.state)
    )


def oldest_due(params: Mapping[str, Any]) -> Select[Any]:
    """Per queue, how long its oldest due, unclaimed run has been due."""
    return (
        select(runs.c.queue_name, (NOW - func.min(runs.c.available_at)).label("age"))
        .where(
            *_for_queue(runs.c.queue_name, params),
            state_in(runs.c.state, *_CLAIMABLE),
            runs.c.available_at <= NOW,
        )
        .group_by(runs.c.queue_name)
    )


def recent_finishes(params: Mapping[str, Any]) -> Select[Any]:
    hour_ago = NOW - func.make_interval(0, 0, 0, 0, 1)
    minute_ago = NOW - func.make_interval(0, 0, 0, 0, 0, 1)

    def count(state: str, since: ColumnElement[Any]) -> ColumnElement[int]:
        hit = case((and_(runs.c.state == state, runs.c.finished_at >= since), 1))
        return func.count(hit)

    return (
        select(
            runs.c.queue_name,
            count("completed", minute_ago).label("completed_minute"),
            count("failed", minute_ago).label("failed_minute"),
            count("completed", hour_ago).label("completed_hour"),
            count("failed", hour_ago).label("failed_hour"),
        )
        .where(
            *_for_queue(runs.c.queue_name, params),
            state_in(runs.c.state, *TERMINAL_STATES),
            runs.c.finished_at >= hour_ago,
        )
        .group_by(runs.c.queue_name)
    )


def recent_events(params: Mapping[str, Any]) -> Select[Any]:
    """One queue's emitted events, newest first (``ix_events_emitted``)."""
    conditions = [events.c.queue_name == _queue_param, events.c.emitted_at.is_not(None)]
    if params.get("before") is not None:
        conditions.append(events.c.emitted_at < bindparam("before", type_=TIMESTAMP(timezone=True)))
    return (
        select(events.c.queue_name, events.c.event_name, events.c.payload, events.c.emitted_at)
        .where(*conditions)
        .order_by(events.c.emitted_at.desc(), events.c.event_name)
        .limit(bindparam("limit", type_=Integer))
    )


def waiting(params: Mapping[str, Any]) -> Select[Any]:
    """Runs waiting for an event, newest wait first."""
    return (
        select(
            waits.c.task_id,
            tasks.c.task_name,
            waits.c.queue_name,
            waits.c.event_name,
            waits.c.step_name,
            waits.c.timeout_at,
            waits.c.created_at,
        )
        .join(tasks, tasks.c.task_id == waits.c.task_id)
        .where(*_for_queue(waits.c.queue_name, params))
        .order_by(waits.c.created_at.desc())
        .limit(bindparam("limit", type_=Integer))
    )


def finishes_per_minute(params: Mapping[str, Any]) -> Select[Any]:
    """One queue's runs finished per minute over the last ``minutes`` minutes."""
    minute = func.date_trunc("minute", runs.c.finished_at).label("minute")
    since = func.date_trunc("minute", NOW) - func.make_interval(
        0, 0, 0, 0, 0, bindparam("minutes", type_=Integer) - 1
    )
    return (
        select(
            minute,
            func.count(case((runs.c.state == "completed", 1))).label("completed"),
            func.count(case((runs.c.state == "failed", 1))).label("failed"),
        )
        .where(
            runs.c.queue_name == _queue_param,
            state_in(runs.c.state, *TERMINAL_STATES),
            runs.c.finished_at >= since,
        )
        .group_by(minute)
    )


# -- rows -> results -----------------------------------------------------------


def waiting_for(row: Any) -> WaitInfo | None:
    """What a task row (with the ``_waiting_columns``) waits for, if anything."""
    if row.state in TERMINAL_STATES or row.run_state is None:
        return None
    if row.wait_event is not None:
        if row.wait_event.startswith(TASK_EVENT_PREFIX):
            child = _core.check_task_id(row.wait_event[len(TASK_EVENT_PREFIX) :])
            return WaitInfo("task", row.wait_timeout, row.wait_event, row.wait_step, child)
        return WaitInfo("event", row.wait_timeout, row.wait_event, row.wait_step)
    if row.run_state == "sleeping":
        return WaitInfo("sleep", row.run_available_at)
    due = row.run_available_at
    if row.run_state == "pending" and due is not None and due > row.now:
        return WaitInfo("scheduled", due)
    return None


def _task_fields(row: Any) -> dict[str, Any]:
    """What ``TaskSummary`` and ``TaskDetail`` share, from a task row."""
    return {
        "task_id": row.task_id,
        "task_name": row.task_name,
        "queue_name": row.queue_name,
        "state": row.state,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "created_at": created_at(row.task_id),
        "started_at": row.first_started_at,
        "finished_at": row.finished_at,
        "waiting_for": waiting_for(row),
    }


def summary(row: Any) -> TaskSummary:
    return TaskSummary(**_task_fields(row))


def page(rows: Sequence[Any], params: Mapping[str, Any]) -> TaskPage:
    found = [summary(row) for row in rows[: params["limit"] - 1]]
    more = len(rows) >= params["limit"]
    return TaskPage(found, found[-1].task_id if more and found else None)


def detail(
    row: Any,
    run_rows: Sequence[Any],
    checkpoint_rows: Sequence[Any],
    child_rows: Sequence[Any],
) -> TaskDetail:
    parent = (row.headers or {}).get(PARENT_HEADER)
    return TaskDetail(
        **_task_fields(row),
        enqueued_at=row.enqueued_at,
        params=row.params,
        headers=row.headers,
        retry_strategy=row.retry_strategy,
        cancellation=row.cancellation,
        idempotency_key=row.idempotency_key,
        result=row.result if row.state == "completed" else None,
        failure=row.last_failure if row.state == "failed" else None,
        cancel_reason=row.cancel_reason,
        parent_id=_parent_id(parent),
        runs=[
            RunInfo(
                run_id=r.run_id,
                attempt=r.attempt,
                state=r.state,
                worker=r.claimed_by,
                created_at=r.created_at,
                available_at=r.available_at,
                started_at=r.started_at,
                finished_at=r.finished_at,
                lease_expires_at=r.claim_expires_at,
                failure=r.failure_reason,
            )
            for r in run_rows
        ],
        checkpoints=[
            CheckpointInfo(c.checkpoint_name, c.state, c.updated_at, c.owner_run_id)
            for c in checkpoint_rows
        ],
        children=[ChildInfo(c.task_id, c.task_name, c.queue_name, c.state) for c in child_rows],
    )


def _parent_id(value: object) -> uuid.UUID | None:
    try:
        return None if value is None else uuid.UUID(str(value))
    except ValueError:
        return None


def stats(
    names: Sequence[str],
    counts: Sequence[Any],
    due: Sequence[Any],
    finishes: Sequence[Any],
) -> list[QueueStats]:
    per_state: dict[str, dict[str, int]] = {name: dict.fromkeys(TASK_STATES, 0) for name in names}
    for row in counts:
        per_state.setdefault(row.queue_name, dict.fromkeys(TASK_STATES, 0))[row.state] = row.n
    ages = {row.queue_name: row.age for row in due}
    done = {row.queue_name: row for row in finishes}
    result = []
    for name in sorted(per_state):
        recent = done.get(name)
        result.append(
            QueueStats(
                queue_name=name,
                counts=per_state[name],
                oldest_due_age=ages.get(name),
                completed_last_minute=recent.completed_minute if recent else 0,
                failed_last_minute=recent.failed_minute if recent else 0,
                completed_last_hour=recent.completed_hour if recent else 0,
                failed_last_hour=recent.failed_hour if recent else 0,
            )
        )
    return result


db_now = select(NOW.label("now"))


def minutes(rows: Sequence[Any], now: datetime, count: int) -> list[MinuteCount]:
    """Every minute of the last ``count`` (oldest first), zeros included."""
    last = now.replace(second=0, microsecond=0)
    found: dict[datetime, list[int]] = {}
    for row in rows:
        totals = found.setdefault(row.minute, [0, 0])
        totals[0] += row.completed
        totals[1] += row.failed
    series = []
    for back in range(count - 1, -1, -1):
        minute = last - timedelta(minutes=back)
        completed, failed = found.get(minute, (0, 0))
        series.append(MinuteCount(minute, completed, failed))
    return series
