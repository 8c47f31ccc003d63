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
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import CTE, Select

from ._children import TASK_EVENT_PREFIX
from ._core import PARENT_HEADER
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


def array_param(name: str, item_type: Any) -> ColumnElement[Any]:
    """A bind parameter carrying a list, as an array of ``item_type``. JSON
    items arrive as text (an array of text, cast). ``_wire`` sends array
    parameters in binary: no quoting and escaping of each item."""
    sent = Text if item_type is JSONB else item_type
    return cast(bindparam(name, type_=ARRAY(sent)), ARRAY(item_type))


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


CHANNEL_PREFIX = "absurd."  # a queue's NOTIFY channel is "absurd.<queue name>"


def channel_for(queue_name: str) -> str:
    """The queue's NOTIFY channel, for a bind parameter (and for LISTEN)."""
    return f"{CHANNEL_PREFIX}{queue_name}"


def notify_queue_of(queue_name: ColumnElement[str]) -> ColumnElement[object]:
    """``pg_notify`` on the channel of the queue named by a column: for statements
    whose queue is only known in SQL (a waiter on another queue, a task found by id)."""
    return func.pg_notify(literal(CHANNEL_PREFIX, Text) + queue_name, literal("", Text))


q_param = bindparam("queue", type_=Text)

# -- queues ------------------------------------------------------------------

create_queue = pg_insert(queues).values(queue_name=q_param).on_conflict_do_nothing()
drop_queue = delete(queues).where(queues.c.queue_name == q_param).returning(queues.c.queue_name)
list_queues = select(queues.c.queue_name).order_by(queues.c.queue_name)
existing_queues = select(queues.c.queue_name).where(
    queues.c.queue_name.in_(bindparam("queues", expanding=True))
)

# -- spawn -------------------------------------------------------------------

# A spawned item's fields (``_core.spawn_row``), each a bind parameter of the
# same name: a value for a single spawn, an array of values (one per task) for
# a batch, which ``unnest`` turns back into rows. JSON arrives as text.
_ITEM_FIELDS: tuple[tuple[str, Any], ...] = (
    ("task_id", UUID(as_uuid=True)),
    ("run_id", UUID(as_uuid=True)),
    ("task_name", Text),
    ("params", JSONB),
    ("headers", JSONB),
    ("retry_strategy", JSONB),
    ("max_attempts", Integer),
    ("cancellation", JSONB),
    ("idempotency_key", Text),
    ("delay_seconds", Float),
    ("run_after", TIMESTAMP(timezone=True)),
)
SPAWN_FIELDS = tuple(name for name, _ in _ITEM_FIELDS)
_unnested = (
    func.unnest(*(array_param(name, type_) for name, type_ in _ITEM_FIELDS))
    .table_valued(
        *(column(name, type_) for name, type_ in _ITEM_FIELDS), with_ordinality="position"
    )
    .render_derived(name="item")
)
_items = select(_unnested).cte("items")  # unpacked once, read by both inserts


def _due_at(items: CTE) -> ColumnElement[datetime]:
    """When a spawned item's first run is due: ``run_after``, or now + its delay."""
    return func.coalesce(
        items.c.run_after, NOW + func.coalesce(items.c.delay_seconds, 0.0) * ONE_SECOND
    )


_queue_row = select(queues.c.queue_name).where(queues.c.queue_name == q_param).cte("queue_row")


def _spawn_from(items: CTE) -> Select[Any]:
    """Insert a task and its first run for each row of ``items`` (the columns
    of ``_ITEM_FIELDS`` and a ``position``) into the queue ``:queue``, unless
    its idempotency key is taken; select each new (task_id, run_id) and notify
    the queue's workers."""
    inserted_tasks = (
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
                items.c.task_id,
                _queue_row.c.queue_name,
                items.c.task_name,
                items.c.params,
                items.c.headers,
                items.c.retry_strategy,
                items.c.max_attempts,
                items.c.cancellation,
                items.c.idempotency_key,
                literal("pending", Text),
                literal(1, Integer),
                items.c.run_id,
                # enqueued_at is when the task first becomes due, so a max_delay
                # policy counts from run_after, not from the spawn.
                func.greatest(NOW, _due_at(items)),
            )
            .select_from(items.join(_queue_row, true()))
            # Concurrent batches that share idempotency keys take the key locks in
            # one order, so they wait for each other instead of deadlocking.
            .order_by(items.c.idempotency_key, items.c.position),
        )
        .on_conflict_do_nothing(
            index_elements=[tasks.c.queue_name, tasks.c.idempotency_key],
            index_where=tasks.c.idempotency_key.is_not(None),
        )
        .returning(tasks.c.task_id, tasks.c.last_run_id)
        .cte("inserted_tasks")
    )
    inserted_runs = (
        insert_pending_runs(
            select(
                inserted_tasks.c.last_run_id,
                inserted_tasks.c.task_id,
                q_param,
                literal(1, Integer),
                _due_at(items),
            ).select_from(inserted_tasks.join(items, items.c.task_id == inserted_tasks.c.task_id)),
        )
        .returning(runs.c.task_id, runs.c.run_id)
        .cte("inserted_runs")
    )
    return select(inserted_runs.c.task_id, inserted_runs.c.run_id, notify().label("notified"))


spawn = _spawn_from(_items)


# The same for one task, its fields as plain bind parameters.
def _item_param(name: str, type_: Any) -> ColumnElement[Any]:
    """A single spawn's value of one item field (JSON arrives as text)."""
    if type_ is JSONB:
        return json_param(name)
    if type_ is Float:
        return cast(bindparam(name), Float)
    return bindparam(name, type_=type_)


_one_fields = [literal(1, Integer).label("position")] + [
    _item_param(name, type_).label(name) for name, type_ in _ITEM_FIELDS
]
_one_item = select(*_one_fields).cte("items")
spawn_one = _spawn_from(_one_item)
existing_by_key = select(
    tasks.c.idempotency_key, tasks.c.task_id, tasks.c.last_run_id, tasks.c.attempts
).where(tasks.c.queue_name == q_param, tasks.c.idempotency_key == bindparam("key", type_=Text))

existing_by_keys = select(
    tasks.c.idempotency_key, tasks.c.task_id, tasks.c.last_run_id, tasks.c.attempts
).where(
    tasks.c.queue_name == q_param,
    tasks.c.idempotency_key == any_(array_param("keys", Text)),
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
    select(func.count(notify_queue_of(_woken_runs.c.queue_name)))
    .scalar_subquery()
    .label("notified_waiter_queues"),
)

# -- task ids ----------------------------------------------------------------
# Task ids are unique across queues: a task is found by its id alone. The
# optional ``:queue`` (``queue_name=`` of the original SDK) must then name the
# task's queue; a write whose queue does not match changes nothing, and the
# statement returns the task's real queue so the caller can say so.

t_param = bindparam("task", type_=UUID(as_uuid=True))
opt_q_param = bindparam("queue", type_=Text)  # NULL: any queue


def task_queue_matches(queue_column: ColumnElement[str]) -> ColumnElement[bool]:
    """``:queue IS NULL OR queue_name = :queue``."""
    return or_(opt_q_param.is_(None), queue_column == opt_q_param)


def _task_column(column: ColumnElement[Any], label: str) -> ColumnElement[Any]:
    """``(SELECT column FROM tasks WHERE task_id = :task)``, labelled."""
    return select(column).where(tasks.c.task_id == t_param).scalar_subquery().label(label)


# -- cancel ------------------------------------------------------------------

_cancelled_runs = (
    update(runs)
    .where(
        runs.c.task_id == t_param,
        task_queue_matches(runs.c.queue_name),
        state_in(runs.c.state, *LIVE_STATES),
    )
    .values(state="cancelled", finished_at=NOW, claim_expires_at=None)
    .returning(runs.c.run_id)
    .cte("cancelled_runs")
)
_cancelled_task = (
    update(tasks)
    .where(
        tasks.c.task_id == t_param,
        task_queue_matches(tasks.c.queue_name),
        tasks.c.state.not_in(TERMINAL_STATES),
        # Lock order run -> task: the task is cancelled only together with its
        # current run, which the runs CTE (run first) has locked. A retry run
        # that a failure created after this statement's snapshot is the task's
        # last_run_id but not ours: then nothing is cancelled, and the caller
        # rolls back to a savepoint (releasing the task row) and runs the
        # statement again with a snapshot that sees the new run.
        tasks.c.last_run_id.in_(select(_cancelled_runs.c.run_id)),
    )
    .values(state="cancelled", finished_at=NOW, cancel_reason=bindparam("reason", type_=Text))
    .returning(tasks.c.task_id)
    .cte("cancelled_task")
)
_cancelled_waits = delete_waits_of(_cancelled_runs, "cancelled_waits")
cancel_task = select(
    _task_column(tasks.c.state, "previous_state"),
    _task_column(tasks.c.queue_name, "task_queue"),
    count_of(_cancelled_task).label("cancelled"),
    count_of(_cancelled_waits).label("waits_removed"),
    _task_column(tasks.c.headers, "headers"),
)

# -- results -----------------------------------------------------------------

fetch_task_result = (
    select(tasks.c.state, tasks.c.result, runs.c.failure_reason, tasks.c.queue_name)
    .select_from(tasks.outerjoin(runs, runs.c.run_id == tasks.c.last_run_id))
    .where(tasks.c.task_id == t_param)
)

# What a parent needs to know before awaiting a task it names.
task_identity = select(tasks.c.queue_name, tasks.c.state, tasks.c.headers).where(
    tasks.c.task_id == t_param
)

# -- retry_task --------------------------------------------------------------

_new_run = bindparam("new_run", type_=UUID(as_uuid=True))
_retry_source = (
    select(tasks.c.task_id, tasks.c.attempts, tasks.c.queue_name)
    .where(
        tasks.c.task_id == t_param,
        task_queue_matches(tasks.c.queue_name),
        state_in(tasks.c.state, "failed"),
    )
    .with_for_update()
    .cte("retry_source")
)
_manual_run = (
    insert_pending_runs(
        select(
            _new_run,
            _retry_source.c.task_id,
            _retry_source.c.queue_name,
            _retry_source.c.attempts + 1,
            NOW,
        ),
    )
    .returning(runs.c.run_id, runs.c.attempt, runs.c.queue_name)
    .cte("manual_run")
)
_manual_task = (
    update(tasks)
    .where(tasks.c.task_id == _retry_source.c.task_id)
    .values(
        state="pending",
        attempts=_retry_source.c.attempts + 1,
        last_run_id=_new_run,
        finished_at=None,
        result=None,
        max_attempts=func.coalesce(bindparam("max_attempts", type_=Integer), tasks.c.max_attempts),
    )
    .returning(tasks.c.task_id)
    .cte("manual_task")
)
retry_task = select(
    _task_column(tasks.c.state, "previous_state"),
    _task_column(tasks.c.queue_name, "task_queue"),
    select(_manual_run.c.attempt).scalar_subquery().label("attempt"),
    count_of(_manual_task).label("tasks"),
    select(func.count(notify_queue_of(_manual_run.c.queue_name)))
    .scalar_subquery()
    .label("notified"),
)

task_for_respawn = select(
    tasks.c.task_name,
    tasks.c.params,
    tasks.c.headers,
    tasks.c.retry_strategy,
    tasks.c.max_attempts,
    tasks.c.cancellation,
    tasks.c.state,
    tasks.c.queue_name,
).where(tasks.c.task_id == t_param)

# -- retention ---------------------------------------------------------------

_cutoff = NOW - seconds("older_than")
_UUID_TEXT = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _uuid_or_null(value: ColumnElement[str]) -> ColumnElement[object]:
    """Cast text to uuid only when it is one (user data must not break cleanup)."""
    return case((value.regexp_match(_UUID_TEXT), cast(value, UUID(as_uuid=True))), else_=null())


def _array_of(column: ColumnElement[Any], item_type: Any) -> ColumnElement[Any]:
    """``CAST((SELECT array_agg(column) ...) AS type[])``: for ``= ANY(...)`` as one
    array (primary-key probes), not the ``ANY (subquery)`` join form."""
    return cast(select(func.array_agg(column)).scalar_subquery(), ARRAY(item_type))


_parent = tasks.alias("parent")
_parent_state = (
    select(_parent.c.state)
    .where(_parent.c.task_id == _uuid_or_null(tasks.c.headers[PARENT_HEADER].astext))
    .scalar_subquery()
)
_old_tasks = (
    select(tasks.c.task_id)
    .where(
        tasks.c.queue_name == q_param,
        state_in(tasks.c.state, *TERMINAL_STATES),
        tasks.c.finished_at < _cutoff,
        # A finished child stays while its parent may still await its result
        # (a per-row primary-key probe, not a join over every task).
        func.coalesce(_parent_state, literal_column("'completed'", Text)).in_(
            [literal_column(f"'{state}'", Text) for state in TERMINAL_STATES]
        ),
    )
    .limit(bindparam("limit", type_=Integer))
    .cte("old_tasks")
)
_deleted_tasks = (
    delete(tasks)
    # = ANY(one array): a primary-key probe per id, never a join over every task.
    .where(tasks.c.task_id == func.any(_array_of(_old_tasks.c.task_id, UUID(as_uuid=True))))
    .returning(tasks.c.task_id)
    .cte("deleted_tasks")
)
_child_of_event = (
    select(tasks.c.task_id)
    .where(
        tasks.c.task_id
        == case(
            (
                events.c.event_name.startswith(TASK_EVENT_PREFIX, autoescape=True),
                _uuid_or_null(func.substr(events.c.event_name, len(TASK_EVENT_PREFIX) + 1)),
            ),
            else_=null(),
        )
    )
    .exists()
)
_old_events = (
    select(events.c.event_name)
    .where(
        events.c.queue_name == q_param,
        events.c.emitted_at < _cutoff,
        ~_child_of_event,  # a child's "$task:<id>" event lives as long as the child
    )
    .limit(bindparam("limit", type_=Integer))
)
# Placeholders written by waiters for events that never came, once nobody waits.
_stale_placeholders = (
    select(events.c.event_name)
    .where(
        events.c.queue_name == q_param,
        events.c.emitted_at.is_(None),
        events.c.created_at < _cutoff,
        ~exists().where(
            waits.c.queue_name == events.c.queue_name, waits.c.event_name == events.c.event_name
        ),
    )
    .limit(bindparam("limit", type_=Integer))
)
_doomed_events = (
    select(_old_events.union_all(_stale_placeholders).subquery().c.event_name)
    .limit(bindparam("limit", type_=Integer))
    .cte("doomed_events")
)
_deleted_events = (
    delete(events)
    .where(
        events.c.queue_name == q_param,
        events.c.event_name == func.any(_array_of(_doomed_events.c.event_name, Text)),
    )
    .returning(events.c.event_name)
    .cte("deleted_events")
)
cleanup = select(count_of(_deleted_tasks).label("tasks"), count_of(_deleted_events).label("events"))
