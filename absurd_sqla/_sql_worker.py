"""I/O-free Core statements a worker and its running tasks make: claim,
checkpoints, suspension, completion, failure and the lease sweep. The client's
statements (spawn, emit, cancel, retry, results, retention) are in ``_sql``.

Fencing: every write a running task makes names its ``run_id`` and succeeds
only while that run is ``running`` with an unexpired lease. A statement that
finds it otherwise changes nothing and reports the run's state, so the caller
can tell "cancelled" from "lease lost".

Lock order is run, then task, in every statement that touches both: the task
update reads the run update's RETURNING rows, so it cannot lock first.
"""

from __future__ import annotations

import typing
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    Text,
    bindparam,
    case,
    cast,
    column,
    delete,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import CTE, Select

from ._sql import (
    NOW,
    ONE_SECOND,
    array_param,
    count_of,
    delete_waits_of,
    insert_checkpoints,
    insert_pending_runs,
    json_param,
    notify,
    q_param,
    seconds,
    state_in,
    task_follows,
)
from .models import CLAIMABLE_STATES, TERMINAL_STATES, checkpoints, events, runs, tasks, waits

run_param = bindparam("run", type_=UUID(as_uuid=True))
task_param = bindparam("task", type_=UUID(as_uuid=True))
step_param = bindparam("step", type_=Text)


def _lease_ok(run: Any) -> ColumnElement[bool]:
    """``run`` (``runs`` or an alias of it) holds an unexpired lease, or one without expiry."""
    return or_(run.c.claim_expires_at.is_(None), run.c.claim_expires_at > NOW)


LEASE_OK = _lease_ok(runs)
_owns_run = (runs.c.run_id == run_param, state_in(runs.c.state, "running"), LEASE_OK)

# A claim_timeout <= 0 means "no expiry"; otherwise now + claim_timeout.
_fresh_lease = case(
    (cast(bindparam("claim_timeout"), Float) > 0, NOW + seconds("claim_timeout")),
    else_=null(),
)
# Extending keeps a no-expiry run without expiry, and never shortens a longer
# lease (a heartbeat(600) is not undone by the next checkpoint).
_extended_lease = case(
    (runs.c.claim_expires_at.is_(None), null()),
    else_=func.greatest(runs.c.claim_expires_at, NOW + seconds("claim_timeout")),
)


def _run_state(write: CTE) -> ColumnElement[str]:
    """The run's state, for telling why a fenced ``write`` changed nothing.

    A write that waited for the run's row lock (a cancel holding it) rechecks
    the new row version, but the statement's snapshot still holds the old one.
    So when ``write`` changed nothing, the state is read ``FOR SHARE``, which
    conflicts with any update and returns the newest committed version:
    "cancelled", not the snapshot's "running". (``FOR KEY SHARE`` would not:
    it coexists with a non-key update and reads the old version.) A write that
    succeeded needs no lock.
    """
    found = select(runs.c.state).where(runs.c.run_id == run_param)
    return case(
        (count_of(write) > 0, found.scalar_subquery()),
        else_=found.with_for_update(read=True).scalar_subquery(),
    )


# -- claim -------------------------------------------------------------------


def _claim(*gate: ColumnElement[bool]) -> tuple[Select[Any], CTE, CTE]:
    """The claim statement, with its candidates and claimed-runs CTEs; a run
    is claimed only where ``gate`` holds too (a completion's claim: only while
    the completing run is still ours)."""
    candidates = (
        select(
            runs.c.run_id,
            runs.c.available_at,
            runs.c.started_at.label("prev_started_at"),
            tasks.c.first_started_at.label("prev_first_started_at"),
        )
        .join(tasks, tasks.c.task_id == runs.c.task_id)
        .where(
            runs.c.queue_name == q_param,
            state_in(runs.c.state, *CLAIMABLE_STATES),
            runs.c.available_at <= NOW,
            ~state_in(tasks.c.state, *TERMINAL_STATES),  # backstop: a finished task never runs
            *gate,
        )
        .order_by(runs.c.available_at)
        .limit(bindparam("batch_size", type_=Integer))
        # Claim never waits: a run or task locked by anyone else is skipped.
        .with_for_update(skip_locked=True, of=[runs.c.run_id, tasks.c.task_id])
        .cte("candidates")
    )
    claimed = (
        update(runs)
        .where(runs.c.run_id == candidates.c.run_id)
        .values(
            state="running",
            claimed_by=bindparam("worker", type_=Text),
            claim_expires_at=_fresh_lease,
            started_at=func.coalesce(runs.c.started_at, NOW),
            wake_event=None,
        )
        .returning(runs.c.run_id, runs.c.task_id, runs.c.attempt, runs.c.claim_expires_at)
        .cte("claimed")
    )
    claimed_tasks = (
        update(tasks)
        .where(tasks.c.task_id == claimed.c.task_id)
        .values(state="running", first_started_at=func.coalesce(tasks.c.first_started_at, NOW))
        .returning(*_CLAIMED_TASK_COLUMNS)
        .cte("claimed_tasks")
    )
    statement = (
        select(
            claimed.c.run_id,
            claimed.c.attempt,
            claimed.c.claim_expires_at,
            claimed_tasks,
            candidates.c.prev_first_started_at,
            candidates.c.prev_started_at,
            NOW.label("now"),
            # Checkpoints ride along with the claim: no second round trip to replay.
            _checkpoints_of(claimed.c.task_id),
        )
        .select_from(
            claimed.join(claimed_tasks, claimed_tasks.c.task_id == claimed.c.task_id).join(
                candidates, candidates.c.run_id == claimed.c.run_id
            )
        )
        .order_by(candidates.c.available_at)
    )
    return statement, candidates, claimed


_CLAIMED_TASK_COLUMNS = (
    tasks.c.task_id,
    tasks.c.queue_name,
    tasks.c.task_name,
    tasks.c.params,
    tasks.c.headers,
    tasks.c.retry_strategy,
    tasks.c.max_attempts,
    tasks.c.cancellation,
    tasks.c.enqueued_at,
    tasks.c.first_started_at,
)


def _checkpoints_of(task_id: ColumnElement[Any]) -> Any:
    """A task's checkpoints as one JSON object, name -> value."""
    return (
        select(
            func.jsonb_object_agg(checkpoints.c.checkpoint_name, checkpoints.c.state, type_=JSONB)
        )
        .where(checkpoints.c.task_id == task_id)
        .scalar_subquery()
        .label("checkpoints")
    )


claim, _, _ = _claim()

# Seconds until the queue's next run comes due (a sleep, a retry delay, a
# run_after), or NULL: an idle worker wakes exactly then instead of a poll later.
# One row from ix_runs_claim.
seconds_until_due = select(
    func.extract("epoch", func.min(runs.c.available_at) - NOW).label("seconds")
).where(
    runs.c.queue_name == q_param,
    state_in(runs.c.state, *CLAIMABLE_STATES),
    runs.c.available_at > NOW,
)

# Runs whose lease ran out; the caller fails each one as $ClaimTimeout.
expired_runs = (
    select(
        runs.c.run_id,
        runs.c.task_id,
        runs.c.attempt,
        runs.c.claimed_by,
        tasks.c.queue_name,
        tasks.c.task_name,
        tasks.c.max_attempts,
        tasks.c.retry_strategy,
        tasks.c.headers,
    )
    .join(tasks, tasks.c.task_id == runs.c.task_id)
    .where(
        runs.c.queue_name == q_param,
        state_in(runs.c.state, "running"),
        runs.c.claim_expires_at < NOW,
    )
    .order_by(runs.c.claim_expires_at)
    .limit(100)
    .with_for_update(skip_locked=True, of=[runs.c.run_id, tasks.c.task_id])
)

# -- checkpoints and leases --------------------------------------------------

# Renew the lease of a run this worker still owns; no row means fenced.
_renewed = (
    update(runs)
    .where(*_owns_run)
    .values(claim_expires_at=_extended_lease)
    .returning(runs.c.run_id, runs.c.task_id, runs.c.claim_expires_at)
    .cte("owner")
)


def _checkpoints_written(rows: Select[Any]) -> CTE:
    """A CTE writing ``rows`` (as ``insert_checkpoints`` takes them) over any
    checkpoint of the same task and name; it returns each row's owner run."""
    insert = insert_checkpoints(rows)
    return (
        insert.on_conflict_do_update(
            index_elements=[checkpoints.c.task_id, checkpoints.c.checkpoint_name],
            set_={
                "state": insert.excluded.state,
                "owner_run_id": insert.excluded.owner_run_id,
                "updated_at": insert.excluded.updated_at,
            },
        )
        .returning(checkpoints.c.owner_run_id)
        .cte("written")
    )


_cp_written = _checkpoints_written(
    select(_renewed.c.task_id, step_param, json_param("value_json"), _renewed.c.run_id, NOW)
)
write_checkpoint = select(
    count_of(_renewed).label("owned"),
    count_of(_cp_written).label("written"),
    _run_state(_renewed).label("run_state"),
    NOW.label("now"),
)

# The same for the checkpoints of several runs at once (concurrent handlers of
# one worker, grouped into one statement and one commit): parallel arrays of
# run, step, value (JSON text) and lease seconds; one row per item, in order.
# The runs are locked in run_id order first, so two groups that share runs
# (they never should: a run belongs to one worker) would wait, not deadlock.
# Each row is fenced on its own, exactly as ``write_checkpoint``.
_group = (
    func.unnest(
        array_param("runs", UUID(as_uuid=True)),
        array_param("steps", Text),
        array_param("values", Text),
        array_param("timeouts", Float),
    )
    .table_valued(
        column("run_id", UUID(as_uuid=True)),
        column("step", Text),
        column("value_json", Text),
        column("claim_timeout", Float),
        with_ordinality="position",
    )
    .render_derived(name="item")
)
_group_items = select(_group).cte("items")
_group_locked = (
    select(runs.c.run_id, runs.c.state)
    .where(runs.c.run_id.in_(select(_group_items.c.run_id)))
    .order_by(runs.c.run_id)
    .with_for_update()
    .cte("locked")
)
_group_renewed = (
    update(runs)
    .where(
        runs.c.run_id == _group_items.c.run_id,
        runs.c.run_id.in_(select(_group_locked.c.run_id)),
        state_in(runs.c.state, "running"),
        LEASE_OK,
    )
    .values(
        claim_expires_at=case(
            (runs.c.claim_expires_at.is_(None), null()),
            else_=func.greatest(
                runs.c.claim_expires_at, NOW + _group_items.c.claim_timeout * ONE_SECOND
            ),
        )
    )
    .returning(runs.c.run_id, runs.c.task_id)
    .cte("owner")
)
_group_written = _checkpoints_written(
    select(
        _group_renewed.c.task_id,
        _group_items.c.step,
        cast(_group_items.c.value_json, JSONB),
        _group_renewed.c.run_id,
        NOW,
    ).select_from(
        _group_renewed.join(_group_items, _group_items.c.run_id == _group_renewed.c.run_id)
    )
)
write_checkpoints = (
    select(
        _group_items.c.position,
        (_group_renewed.c.run_id.is_not(None)).cast(Integer).label("owned"),
        select(func.count())
        .where(_group_written.c.owner_run_id == _group_items.c.run_id)
        .scalar_subquery()
        .label("written"),
        _group_locked.c.state.label("run_state"),
        NOW.label("now"),
    )
    .select_from(
        _group_items.outerjoin(
            _group_renewed, _group_renewed.c.run_id == _group_items.c.run_id
        ).outerjoin(_group_locked, _group_locked.c.run_id == _group_items.c.run_id)
    )
    .order_by(_group_items.c.position)
)

heartbeat = select(
    count_of(_renewed).label("owned"),
    _run_state(_renewed).label("run_state"),
    select(_renewed.c.claim_expires_at).scalar_subquery().label("claim_expires_at"),
    NOW.label("now"),
)

# -- suspension ----------------------------------------------------------------

_owner_locked = (
    select(runs.c.run_id, runs.c.task_id).where(*_owns_run).with_for_update().cte("owner")
)


def _suspend_or_extend(should_suspend: ColumnElement[bool], wake_at: ColumnElement[object]):  # type: ignore[no-untyped-def]
    """SET values that either suspend the run until ``wake_at`` or extend its lease."""
    return {
        "state": case((should_suspend, "sleeping"), else_="running"),
        "available_at": case((should_suspend, wake_at), else_=runs.c.available_at),
        "claimed_by": case((should_suspend, null()), else_=runs.c.claimed_by),
        "claim_expires_at": case((should_suspend, null()), else_=_extended_lease),
    }


_wake = (
    select(
        _owner_locked.c.run_id,
        _owner_locked.c.task_id,
        func.coalesce(
            bindparam("wake_at", type_=TIMESTAMP(timezone=True)), NOW + seconds("seconds")
        ).label("wake_at"),
        NOW.label("now"),
    )
    .select_from(_owner_locked)
    .cte("wake")
)
_sleep_cp = (
    insert_checkpoints(
        select(_wake.c.task_id, step_param, func.to_jsonb(_wake.c.wake_at), _wake.c.run_id, NOW),
    )
    .on_conflict_do_nothing()
    .returning(checkpoints.c.checkpoint_name)
    .cte("sleep_checkpoint")
)
_sleep_run = (
    update(runs)
    .where(runs.c.run_id == _wake.c.run_id)
    .values(_suspend_or_extend(_wake.c.wake_at > _wake.c.now, _wake.c.wake_at))
    .returning(runs.c.task_id, runs.c.state)
    .cte("sleep_run")
)
_sleep_task = task_follows(_sleep_run, "sleep_task", "sleeping", _sleep_run.c.state == "sleeping")
sleep = select(
    count_of(_owner_locked).label("owned"),
    _run_state(_owner_locked).label("run_state"),
    select(_wake.c.wake_at).scalar_subquery().label("wake_at"),
    count_of(_sleep_task).label("suspended"),
    count_of(_sleep_cp).label("checkpointed"),
)

# await_event: lock the event row (inserting a placeholder if needed) so that an
# emit either committed before us (we see it) or waits for our commit (and then
# sees our wait row). Emitted -> checkpoint the payload; timed out -> checkpoint
# the timeout; otherwise -> suspend until emit or timeout.
_event_queue = bindparam("event_queue", type_=Text)
_event_name = bindparam("event", type_=Text)
_event_row = pg_insert(events).from_select(
    ["queue_name", "event_name"],
    select(_event_queue, _event_name).select_from(_owner_locked),
)
_event_locked = (
    _event_row.on_conflict_do_update(
        index_elements=[events.c.queue_name, events.c.event_name],
        set_={"event_name": _event_row.excluded.event_name},
    )
    .returning(events.c.payload, events.c.emitted_at)
    .cte("event_row")
)
_prior_deadline = (
    select(waits.c.timeout_at)
    .where(waits.c.run_id == run_param, waits.c.step_name == step_param)
    .scalar_subquery()
)
_timeout_seconds = cast(bindparam("timeout_seconds"), Float)
_decision = (
    select(
        _owner_locked.c.run_id,
        _owner_locked.c.task_id,
        _event_locked.c.payload,
        _event_locked.c.emitted_at.is_not(None).label("emitted"),
        case(
            (_timeout_seconds.is_(None), null()),
            else_=func.coalesce(_prior_deadline, NOW + _timeout_seconds * ONE_SECOND),
        ).label("deadline"),
        NOW.label("now"),
    )
    .select_from(_owner_locked.join(_event_locked, true()))
    .cte("decision_base")
)
_outcome = select(
    _decision.c.run_id,
    _decision.c.task_id,
    _decision.c.payload,
    _decision.c.emitted,
    _decision.c.deadline,
    (~_decision.c.emitted & (_decision.c.deadline <= _decision.c.now)).is_(True).label("timed_out"),
).cte("decision")
_resolved = or_(_outcome.c.emitted, _outcome.c.timed_out)
_await_cp = (
    insert_checkpoints(
        select(
            _outcome.c.task_id,
            step_param,
            case(
                (_outcome.c.emitted, func.jsonb_build_object("payload", _outcome.c.payload)),
                else_=func.jsonb_build_object("timeout", True),
            ),
            _outcome.c.run_id,
            NOW,
        ).where(_resolved),
    )
    .on_conflict_do_nothing()
    .returning(checkpoints.c.checkpoint_name)
    .cte("await_checkpoint")
)
_wait_insert = pg_insert(waits).from_select(
    ["run_id", "task_id", "queue_name", "event_name", "step_name", "timeout_at"],
    select(
        _outcome.c.run_id,
        _outcome.c.task_id,
        _event_queue,
        _event_name,
        step_param,
        _outcome.c.deadline,
    ).where(~_resolved),
)
_wait_row = (
    _wait_insert.on_conflict_do_update(
        index_elements=[waits.c.run_id],
        set_={
            "queue_name": _wait_insert.excluded.queue_name,
            "event_name": _wait_insert.excluded.event_name,
            "step_name": _wait_insert.excluded.step_name,
            "timeout_at": _wait_insert.excluded.timeout_at,
        },
    )
    .returning(waits.c.run_id)
    .cte("wait_row")
)
_wait_done = (
    delete(waits)
    .where(waits.c.run_id == _outcome.c.run_id, _resolved)
    .returning(waits.c.run_id)
    .cte("wait_done")
)
_await_run = (
    update(runs)
    .where(runs.c.run_id == _outcome.c.run_id)
    .values(
        # No timeout: available_at NULL, so only an emit makes the run claimable.
        **_suspend_or_extend(~_resolved, _outcome.c.deadline),
        wake_event=case((~_resolved, _event_name), else_=null()),
    )
    .returning(runs.c.task_id, runs.c.state)
    .cte("await_run")
)
_await_task = task_follows(_await_run, "await_task", "sleeping", _await_run.c.state == "sleeping")
await_event = select(
    count_of(_owner_locked).label("owned"),
    _run_state(_owner_locked).label("run_state"),
    select(_outcome.c.emitted).scalar_subquery().label("emitted"),
    select(_outcome.c.timed_out).scalar_subquery().label("timed_out"),
    select(_outcome.c.payload).scalar_subquery().label("payload"),
    count_of(_await_task).label("suspended"),
    count_of(_await_cp).label("checkpointed"),
    count_of(_wait_row).label("waiting"),
    count_of(_wait_done).label("wait_cleared"),
)

# A task whose name this worker does not know: hand the run back for later.
_deferred = (
    update(runs)
    .where(runs.c.run_id == run_param, runs.c.state == "running")
    .values(
        state="pending",
        available_at=NOW + seconds("delay"),
        claimed_by=None,
        claim_expires_at=None,
        # Not started after all: max_delay / max_duration keep counting right.
        started_at=bindparam("prev_started_at", type_=TIMESTAMP(timezone=True)),
    )
    .returning(runs.c.task_id)
    .cte("deferred")
)
_deferred_task = task_follows(
    _deferred,
    "deferred_task",
    "pending",
    tasks.c.state == "running",
    first_started_at=bindparam("prev_first_started_at", type_=TIMESTAMP(timezone=True)),
)
defer_run = select(count_of(_deferred).label("deferred"), count_of(_deferred_task).label("tasks"))

# -- finishing ---------------------------------------------------------------


def _complete(
    owned: tuple[ColumnElement[bool], ...] = _owns_run, **handed_over: Any
) -> Select[Any]:
    """Complete the run and its task where ``owned`` holds (the run is still
    ours): one row, ``owned``, ``tasks`` and ``run_state``. ``handed_over``:
    the value of ``runs.handed_over``."""
    completed = (
        update(runs)
        .where(*owned)
        .values(
            state="completed",
            result=json_param("result_json"),
            finished_at=NOW,
            claim_expires_at=None,  # claimed_by stays: who ran it
            **handed_over,
        )
        .returning(runs.c.task_id)
        .cte("completed")
    )
    completed_task = (
        update(tasks)
        # Never overwrite a task that finished meanwhile (cancelled, say).
        .where(tasks.c.task_id == completed.c.task_id, ~state_in(tasks.c.state, *TERMINAL_STATES))
        .values(state="completed", result=json_param("result_json"), finished_at=NOW)
        .returning(tasks.c.task_id)
        .cte("completed_task")
    )
    # Typed loosely: SQLAlchemy 2.0 and 2.1 type a select's rows apart.
    return typing.cast(
        "Select[Any]",
        select(
            count_of(completed).label("owned"),
            count_of(completed_task).label("tasks"),
            _run_state(completed).label("run_state"),
        ),
    )


complete_run = _complete()

# A completion that also claims its worker slot's next run, in the same
# statement and commit (one round trip fewer per task): ``complete_run``'s row
# with the claim's columns of the run claimed (NULL if none; ``:batch_size``
# is 1). The completing run is locked first, before anything else (run before
# task; a cancel holding it is waited for and its outcome read), and the claim
# and the completion both happen exactly when that lock found the run ours.
# The completion records what it claimed in ``runs.handed_over``: a worker
# whose answer was lost with its connection finds the run there
# (``handed_over_run``) instead of leaving it to its lease.
_completing = select(runs.c.run_id).where(*_owns_run).with_for_update().cte("completing")
_next_claim, _next_candidates, _next_claimed = _claim(select(_completing.c.run_id).exists())
_hand_over_record = (
    select(
        func.jsonb_build_object(
            "run_id",
            _next_claimed.c.run_id,
            "prev_started_at",
            _next_candidates.c.prev_started_at,
            "prev_first_started_at",
            _next_candidates.c.prev_first_started_at,
        )
    )
    .select_from(
        _next_claimed.join(_next_candidates, _next_candidates.c.run_id == _next_claimed.c.run_id)
    )
    .scalar_subquery()
)
_completion = _complete(
    (runs.c.run_id == run_param, select(_completing.c.run_id).exists()),
    handed_over=_hand_over_record,
).subquery("completion")
_next_runs = _next_claim.subquery("next_runs")
complete_and_claim = select(_completion, _next_runs).select_from(
    _completion.outerjoin(_next_runs, true())
)

# The run a completion of ``:run`` claimed (``complete_and_claim``), as the
# claim returned it, if it is still this worker's (``:worker``) and leased.
_handing = runs.alias("handing")
_handed = runs.alias("handed")


def _handed_over(key: str, type_: Any) -> ColumnElement[Any]:
    return cast(_handing.c.handed_over[key].astext, type_)


handed_over_run = (
    select(
        _handed.c.run_id,
        _handed.c.attempt,
        _handed.c.claim_expires_at,
        *_CLAIMED_TASK_COLUMNS,
        _handed_over("prev_first_started_at", TIMESTAMP(timezone=True)).label(
            "prev_first_started_at"
        ),
        _handed_over("prev_started_at", TIMESTAMP(timezone=True)).label("prev_started_at"),
        NOW.label("now"),
        _checkpoints_of(_handed.c.task_id),
    )
    .select_from(
        _handing.join(_handed, _handed.c.run_id == _handed_over("run_id", UUID(as_uuid=True))).join(
            tasks, tasks.c.task_id == _handed.c.task_id
        )
    )
    .where(
        _handing.c.run_id == run_param,
        state_in(_handed.c.state, "running"),
        _handed.c.claimed_by == bindparam("worker", type_=Text),
        _lease_ok(_handed),
    )
)

_retry = bindparam("retry", type_=Boolean)
_new_run = bindparam("new_run", type_=UUID(as_uuid=True))
_failed = (
    update(runs)
    .where(
        runs.c.run_id == run_param,
        runs.c.state == "running",
        # The owner must hold its lease; the expiry sweep fails runs that lost it.
        or_(~bindparam("require_lease", type_=Boolean), LEASE_OK),
    )
    .values(
        state="failed",
        failure_reason=json_param("reason_json"),
        finished_at=NOW,
        claim_expires_at=None,  # claimed_by stays: who ran it (or died)
    )
    .returning(runs.c.run_id, runs.c.task_id, runs.c.attempt, runs.c.queue_name)
    .cte("failed_run")
)
_failed_task = (
    update(tasks)
    .where(tasks.c.task_id == _failed.c.task_id, ~state_in(tasks.c.state, *TERMINAL_STATES))
    .values(
        state=case((_retry, "pending"), else_="failed"),
        attempts=case((_retry, _failed.c.attempt + 1), else_=tasks.c.attempts),
        last_run_id=case((_retry, _new_run), else_=tasks.c.last_run_id),
        finished_at=case((_retry, null()), else_=NOW),
    )
    .returning(tasks.c.task_id, tasks.c.queue_name, tasks.c.state)
    .cte("failed_task")
)
# The retry run follows the task update: none for a task that was cancelled
# (or otherwise finished) meanwhile.
_retry_run = (
    insert_pending_runs(
        select(
            _new_run,
            _failed_task.c.task_id,
            _failed_task.c.queue_name,
            _failed.c.attempt + 1,
            NOW + seconds("delay"),
        )
        .select_from(_failed_task.join(_failed, _failed.c.task_id == _failed_task.c.task_id))
        .where(_retry),
    )
    .returning(runs.c.run_id, runs.c.attempt, runs.c.available_at)
    .cte("retry_run")
)
_failed_waits = delete_waits_of(_failed, "failed_waits")
# retry_at / next_attempt: when and as which attempt the task runs again (NULL
# without a retry), as the database decided, for the worker's log line.
fail_run = select(
    count_of(_failed).label("owned"),
    count_of(_retry_run).label("retried"),
    select(_retry_run.c.available_at).scalar_subquery().label("retry_at"),
    select(_retry_run.c.attempt).scalar_subquery().label("next_attempt"),
    count_of(_failed_task).label("tasks"),
    count_of(_failed_waits).label("waits_removed"),
    _run_state(_failed).label("run_state"),
    notify().label("notified"),
)


# -- a write whose answer was lost -----------------------------------------------
#
# A write that broke with its connection may have committed first. Then its
# retry is fenced (the run is no longer ``running`` under our lease) and reports
# the run as lost, though the change that took it away was our own. Each
# statement below recognises that change: a row shaped like the write's own,
# ``owned`` = 1, when our earlier attempt is in the database; no row otherwise.
# It takes the write's parameters.

_landed_event = bindparam("event", type_=Text)
# jsonb #>> '{}': the text of a JSON string (a checkpointed wake time).
_NO_PATH: ColumnElement[Any] = literal_column("'{}'::text[]")


def _own_checkpoint(*columns: Any) -> Select[Any]:
    """``columns`` of the run and its checkpoint ``step``, if our run wrote it."""
    return (
        select(*columns)
        .select_from(runs.join(checkpoints, checkpoints.c.task_id == runs.c.task_id))
        .where(
            runs.c.run_id == run_param,
            checkpoints.c.checkpoint_name == step_param,
            checkpoints.c.owner_run_id == run_param,
        )
    )


_landed_completed = select(
    literal(1).label("owned"),
    literal(1).label("tasks"),
    runs.c.state.label("run_state"),
).where(
    runs.c.run_id == run_param,
    runs.c.state == "completed",
    runs.c.result == json_param("result_json"),
)

_landed_retry_run = runs.alias("retry_run")


def _landed_retry(*columns: Any) -> Any:
    return (
        select(*columns)
        .where(_landed_retry_run.c.run_id == bindparam("new_run", type_=UUID(as_uuid=True)))
        .scalar_subquery()
    )


_landed_failed = select(
    literal(1).label("owned"),
    _landed_retry(func.count()).label("retried"),
    _landed_retry(_landed_retry_run.c.available_at).label("retry_at"),
    _landed_retry(_landed_retry_run.c.attempt).label("next_attempt"),
    runs.c.state.label("run_state"),
).where(
    runs.c.run_id == run_param,
    runs.c.state == "failed",
    runs.c.failure_reason == json_param("reason_json"),
)

_landed_checkpoint = _own_checkpoint(
    literal(1).label("owned"),
    literal(1).label("written"),
    runs.c.state.label("run_state"),
    NOW.label("now"),
).where(checkpoints.c.state == json_param("value_json"))

_landed_sleep = _own_checkpoint(
    literal(1).label("owned"),
    runs.c.state.label("run_state"),
    runs.c.available_at.label("wake_at"),
    literal(1).label("suspended"),
    literal(1).label("checkpointed"),
).where(
    runs.c.state == "sleeping",
    # Until the wake time checkpointed (as a JSON string).
    runs.c.available_at == cast(checkpoints.c.state.op("#>>")(_NO_PATH), TIMESTAMP(timezone=True)),
)

_landed_wait = (
    select(
        literal(1).label("owned"),
        runs.c.state.label("run_state"),
        false().label("emitted"),
        false().label("timed_out"),
        null().label("payload"),
        literal(1).label("suspended"),
        literal(0).label("checkpointed"),
        literal(1).label("waiting"),
        literal(0).label("wait_cleared"),
    )
    .select_from(runs.join(waits, waits.c.run_id == runs.c.run_id))
    .where(
        runs.c.run_id == run_param,
        runs.c.state == "sleeping",
        runs.c.wake_event == _landed_event,
        waits.c.step_name == step_param,
        waits.c.event_name == _landed_event,
        waits.c.queue_name == bindparam("event_queue", type_=Text),
    )
)

# write -> the statement recognising it landed. A write not listed here (a
# heartbeat: it only extends the lease) is retried without one.
_LANDED: tuple[tuple[Executable, Executable], ...] = (
    (complete_run, _landed_completed),
    (fail_run, _landed_failed),
    (write_checkpoint, _landed_checkpoint),
    (sleep, _landed_sleep),
    (await_event, _landed_wait),
)


def landed_statement(write: Executable) -> Executable | None:
    """The statement recognising that ``write`` committed, if it has one."""
    for listed, landed in _LANDED:
        if listed is write:
            return landed
    return None
