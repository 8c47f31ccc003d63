"""I/O-free Core statements, built once at import and shared by sync and async code.

Each operation is one statement (CTEs where Postgres allows it) with named bind
parameters; names of queues, tasks and events are always bound, never spliced.
JSON arrives pre-encoded as text and is cast to ``jsonb`` in SQL, so a value is
serialised exactly once, by ``_core.encode_json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    Text,
    bindparam,
    cast,
    column,
    delete,
    func,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import CTE, Select

from .models import (
    TERMINAL_STATES,
    checkpoints,
    events,
    queues,
    runs,
    tasks,
    waits,
)

LIVE_STATES = ("pending", "running", "sleeping")

NOW: ColumnElement[datetime] = func.absurd.now(type_=TIMESTAMP(timezone=True))


def state_in(column: ColumnElement[str], *states: str) -> ColumnElement[bool]:
    """``column IN ('a', 'b')`` with the states as SQL literals, not bind
    parameters: a generic (prepared) plan can then still match the partial
    indexes, whose predicates name the same literals. States are constants.
    """
    literals = [literal_column(f"'{state}'", Text) for state in states]
    return column == literals[0] if len(literals) == 1 else column.in_(literals)


def json_param(name: str) -> ColumnElement[object]:
    """A bind parameter carrying JSON text, cast to jsonb."""
    return cast(bindparam(name, type_=Text), JSONB)


ONE_SECOND: ColumnElement[object] = literal_column("interval '1 second'")


def seconds(name: str) -> ColumnElement[object]:
    """``CAST(:name AS FLOAT) * interval '1 second'``."""
    return cast(bindparam(name), Float) * ONE_SECOND


def notify(channel_param: str = "channel") -> ColumnElement[object]:
    """``pg_notify(:channel, '')``: delivered only if the transaction commits."""
    return func.pg_notify(bindparam(channel_param, type_=Text), literal("", Text))


def count_of(cte: CTE) -> ColumnElement[int]:
    """``(SELECT count(*) FROM cte)``: also forces a data-modifying CTE to run."""
    return select(func.count()).select_from(cte).scalar_subquery()


def delete_waits_of(run_ids: CTE, name: str) -> CTE:
    """A CTE deleting the event waits of the runs listed in ``run_ids.c.run_id``."""
    return (
        delete(waits)
        .where(waits.c.run_id.in_(select(run_ids.c.run_id)))
        .returning(waits.c.run_id)
        .cte(name)
    )


def task_follows(
    run_update: CTE, name: str, state: str, *where: ColumnElement[bool], **values: Any
) -> CTE:
    """A CTE moving the tasks of the runs just updated to ``state``.

    It reads the run update's RETURNING rows, so the run is always locked
    before its task: the one lock order every statement keeps.
    """
    return (
        update(tasks)
        .where(tasks.c.task_id == run_update.c.task_id, *where)
        .values(state=state, **values)
        .returning(tasks.c.task_id)
        .cte(name)
    )


def insert_checkpoints(rows: Select[Any]) -> Insert:
    """``INSERT INTO checkpoints`` from ``rows``: (task_id, name, state, owner run, time)."""
    return pg_insert(checkpoints).from_select(
        ["task_id", "checkpoint_name", "state", "owner_run_id", "updated_at"], rows
    )


def insert_pending_runs(rows: Select[Any]) -> Insert:
    """``INSERT INTO runs`` from ``rows`` of (run_id, task_id, queue, attempt,
    available_at), each a new ``pending`` run."""
    return pg_insert(runs).from_select(
        ["run_id", "task_id", "queue_name", "attempt", "available_at", "state"],
        rows.add_columns(literal("pending", Text)),
    )


def channel_for(queue_name: str) -> str:
    return f"absurd.{queue_name}"


q_param = bindparam("queue", type_=Text)

# -- queues ------------------------------------------------------------------

create_queue = pg_insert(queues).values(queue_name=q_param).on_conflict_do_nothing()
drop_queue = delete(queues).where(queues.c.queue_name == q_param).returning(queues.c.queue_name)
list_queues = select(queues.c.queue_name).order_by(queues.c.queue_name)
existing_queues = select(queues.c.queue_name).where(
    queues.c.queue_name.in_(bindparam("queues", expanding=True))
)

# -- spawn -------------------------------------------------------------------

_recordset = (
    func.jsonb_to_recordset(json_param("items"))
    .table_valued(
        column("position", Integer),
        column("task_id", UUID(as_uuid=True)),
        column("run_id", UUID(as_uuid=True)),
        column("task_name", Text),
        column("params", JSONB),
        column("headers", JSONB),
        column("retry_strategy", JSONB),
        column("max_attempts", Integer),
        column("cancellation", JSONB),
        column("idempotency_key", Text),
        column("delay_seconds", Float),
        column("run_after", TIMESTAMP(timezone=True)),
    )
    .render_derived(name="item", with_types=True)
)
_items = select(_recordset).cte("items")  # parsed once, read by both inserts


def _due_at(items: CTE) -> ColumnElement[datetime]:
    """When a spawned item's first run is due: ``run_after``, or now + its delay."""
    return func.coalesce(
        items.c.run_after, NOW + func.coalesce(items.c.delay_seconds, 0.0) * ONE_SECOND
    )


_queue_row = select(queues.c.queue_name).where(queues.c.queue_name == q_param).cte("queue_row")

_inserted_tasks = (
    pg_insert(tasks)
    .from_select(
        [
            "task_id",
            "queue_name",
            "task_name",
            "params",
            "headers",
            "retry_strategy",
            "max_attempts",
            "cancellation",
            "idempotency_key",
            "state",
            "attempts",
            "last_run_id",
            "enqueued_at",
        ],
        select(
            _items.c.task_id,
            _queue_row.c.queue_name,
            _items.c.task_name,
            _items.c.params,
            _items.c.headers,
            _items.c.retry_strategy,
            _items.c.max_attempts,
            _items.c.cancellation,
            _items.c.idempotency_key,
            literal("pending", Text),
            literal(1, Integer),
            _items.c.run_id,
            # enqueued_at is when the task first becomes due, so a max_delay
            # policy counts from run_after, not from the spawn.
            func.greatest(NOW, _due_at(_items)),
        )
        .select_from(_items.join(_queue_row, true()))
        # Concurrent batches that share idempotency keys take the key locks in
        # one order, so they wait for each other instead of deadlocking.
        .order_by(_items.c.idempotency_key, _items.c.position),
    )
    .on_conflict_do_nothing(
        index_elements=[tasks.c.queue_name, tasks.c.idempotency_key],
        index_where=tasks.c.idempotency_key.is_not(None),
    )
    .returning(tasks.c.task_id, tasks.c.last_run_id)
    .cte("inserted_tasks")
)
_run_items = _items
_inserted_runs = (
    insert_pending_runs(
        select(
            _inserted_tasks.c.last_run_id,
            _inserted_tasks.c.task_id,
            q_param,
            literal(1, Integer),
            _due_at(_run_items),
        ).select_from(
            _inserted_tasks.join(_run_items, _run_items.c.task_id == _inserted_tasks.c.task_id)
        ),
    )
    .returning(runs.c.task_id, runs.c.run_id)
    .cte("inserted_runs")
)
spawn = select(_inserted_runs.c.task_id, _inserted_runs.c.run_id, notify().label("notified"))

existing_by_keys = select(
    tasks.c.idempotency_key, tasks.c.task_id, tasks.c.last_run_id, tasks.c.attempts
).where(
    tasks.c.queue_name == q_param,
    tasks.c.idempotency_key.in_(bindparam("keys", expanding=True)),
)

# -- events ------------------------------------------------------------------

_emit_insert = pg_insert(events).from_select(
    ["queue_name", "event_name", "payload", "emitted_at"],
    select(
        _queue_row.c.queue_name, bindparam("event", type_=Text), json_param("payload_json"), NOW
    ),
)
_emitted = (
    _emit_insert.on_conflict_do_update(
        index_elements=[events.c.queue_name, events.c.event_name],
        set_={
            "payload": _emit_insert.excluded.payload,
            "emitted_at": _emit_insert.excluded.emitted_at,
        },
        # First emit wins: only a waiter's placeholder (emitted_at IS NULL) is filled in.
        where=events.c.emitted_at.is_(None),
    )
    .returning(events.c.event_name)
    .cte("emitted")
)

emit_event = select(
    count_of(_queue_row).label("queue_found"),
    count_of(_emitted).label("emitted"),
)

# Second statement of an emit, after the first has taken the event row's lock:
# a fresh snapshot sees every waiter that committed before us. Locks go run,
# then task, then wait row (as in cancel and fail), runs in run_id order.
_event_param = bindparam("event", type_=Text)
_waiting_runs = (
    select(runs.c.run_id)
    .where(
        runs.c.run_id.in_(
            select(waits.c.run_id).where(
                waits.c.queue_name == q_param, waits.c.event_name == _event_param
            )
        ),
        state_in(runs.c.state, "sleeping"),
    )
    .order_by(runs.c.run_id)
    .with_for_update(key_share=True)
    .cte("waiting_runs")
)
_woken_runs = (
    update(runs)
    .where(runs.c.run_id == _waiting_runs.c.run_id, state_in(runs.c.state, "sleeping"))
    .values(state="pending", available_at=NOW, wake_event=None)
    .returning(runs.c.run_id, runs.c.task_id, runs.c.queue_name)
    .cte("woken_runs")
)
_woken_tasks = task_follows(_woken_runs, "woken_tasks", "pending", tasks.c.state == "sleeping")
_woken_waits = (
    delete(waits)
    .where(
        waits.c.run_id.in_(select(_woken_runs.c.run_id)),
        waits.c.queue_name == q_param,
        waits.c.event_name == _event_param,
        count_of(_woken_tasks) >= 0,  # tasks before wait rows
    )
    .returning(waits.c.run_id, waits.c.task_id, waits.c.step_name)
    .cte("woken_waits")
)
_event_checkpoints = (
    insert_checkpoints(
        select(
            _woken_waits.c.task_id,
            _woken_waits.c.step_name,
            func.jsonb_build_object("payload", json_param("payload_json")),
            _woken_waits.c.run_id,
            NOW,
        ),
    )
    .on_conflict_do_nothing()
    .returning(checkpoints.c.task_id)
    .cte("event_checkpoints")
)
wake_waiters = select(
    count_of(_woken_tasks).label("woken"),
    count_of(_event_checkpoints).label("delivered"),
    notify().label("notified"),
    # A waiter may live on another queue (a parent awaiting a child): wake its
    # workers too. Postgres folds duplicate notifications within a transaction.
    select(
        func.count(
            func.pg_notify(literal("absurd.", Text) + _woken_runs.c.queue_name, literal("", Text))
        )
    )
    .scalar_subquery()
    .label("notified_waiter_queues"),
)

# -- cancel ------------------------------------------------------------------

t_param = bindparam("task", type_=UUID(as_uuid=True))

_cancelled_runs = (
    update(runs)
    .where(runs.c.task_id == t_param, runs.c.queue_name == q_param, runs.c.state.in_(LIVE_STATES))
    .values(state="cancelled", finished_at=NOW, claimed_by=None, claim_expires_at=None)
    .returning(runs.c.run_id)
    .cte("cancelled_runs")
)
_cancelled_task = (
    update(tasks)
    .where(
        tasks.c.task_id == t_param,
        tasks.c.queue_name == q_param,
        tasks.c.state.not_in(TERMINAL_STATES),
        # Lock order run -> task everywhere: referencing the runs CTE makes it run first.
        count_of(_cancelled_runs) >= 0,
    )
    .values(state="cancelled", finished_at=NOW)
    .returning(tasks.c.task_id)
    .cte("cancelled_task")
)
_cancelled_waits = delete_waits_of(_cancelled_runs, "cancelled_waits")
cancel_task = select(
    select(tasks.c.state)
    .where(tasks.c.task_id == t_param, tasks.c.queue_name == q_param)
    .scalar_subquery()
    .label("previous_state"),
    count_of(_cancelled_task).label("cancelled"),
    count_of(_cancelled_waits).label("waits_removed"),
    select(tasks.c.headers)
    .where(tasks.c.task_id == t_param, tasks.c.queue_name == q_param)
    .scalar_subquery()
    .label("headers"),
)

# Second statement of a cancel that cancelled the task: the task row is ours
# now, and a fresh snapshot sees a run that a concurrent failure inserted
# (its retry) while the first statement waited for a lock.
_late_runs = (
    update(runs)
    .where(runs.c.task_id == t_param, runs.c.state.in_(LIVE_STATES))
    .values(state="cancelled", finished_at=NOW, claimed_by=None, claim_expires_at=None)
    .returning(runs.c.run_id)
    .cte("late_runs")
)
cancel_late_runs = select(
    count_of(_late_runs).label("runs"),
    count_of(delete_waits_of(_late_runs, "late_waits")).label("waits"),
)

# -- results -----------------------------------------------------------------

fetch_task_result = (
    select(tasks.c.state, tasks.c.result, runs.c.failure_reason)
    .select_from(tasks.outerjoin(runs, runs.c.run_id == tasks.c.last_run_id))
    .where(tasks.c.task_id == t_param, tasks.c.queue_name == q_param)
)
