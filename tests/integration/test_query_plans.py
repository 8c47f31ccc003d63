"""Query plans of the hot and the retention statements on a database with many
finished tasks: each statement the library sends uses its index, also as a
generic (prepared) plan, and none scans a whole table.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, event, select, text
from sqlalchemy.pool import NullPool

from absurd_sqla import Absurd, SpawnRequest, _sql
from absurd_sqla import _sql_worker as sqlw
from absurd_sqla.models import runs
from tests.internals import claim

FINISHED = 20_000

_POPULATE = f"""
INSERT INTO absurd.tasks (task_id, queue_name, task_name, params, state, attempts,
    last_run_id, result, enqueued_at, first_started_at, finished_at)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'default', 'old', '{{}}',
       'completed', 1, ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid, '1',
       now() - interval '30 days', now() - interval '30 days',
       now() - interval '30 days' + g * interval '1 ms'
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.runs (run_id, task_id, queue_name, attempt, state, available_at, result,
    started_at, finished_at)
SELECT ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid,
       ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'default', 1,
       'completed', now() - interval '30 days', '1', now(), now()
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.checkpoints (task_id, checkpoint_name, state, owner_run_id)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 's', '1',
       ('00000000-0000-7000-9000-' || lpad(to_hex(g), 12, '0'))::uuid
FROM generate_series(1, {FINISHED}) g;
INSERT INTO absurd.events (queue_name, event_name, payload, emitted_at, created_at)
SELECT 'default', 'old-' || g, '1', now() - interval '30 days', now() - interval '30 days'
FROM generate_series(1, {FINISHED}) g;
"""


@pytest.fixture
def many_finished(app: Absurd) -> Absurd:
    """FINISHED completed tasks (runs, checkpoints, emitted events) plus a few live runs."""
    with app.engine.begin() as conn:
        conn.execute(text(_POPULATE))
    app.spawn_many([SpawnRequest("live", {"i": i}) for i in range(5)])
    claim(app, "default", "w", 120, 2)  # two running, three pending
    with app.engine.begin() as conn:
        conn.execute(text("ANALYZE absurd.tasks, absurd.runs, absurd.checkpoints, absurd.events"))
    return app


def explain(conn: Connection, statement: Any, params: dict[str, Any]) -> str:
    """The plan of exactly the SQL and parameters the library sends (not executed)."""

    def prefix(*args: Any) -> tuple[str, Any]:
        return "EXPLAIN (COSTS OFF) " + args[2], args[3]

    event.listen(conn, "before_cursor_execute", prefix, retval=True)
    try:
        return "\n".join(row[0] for row in conn.execute(statement, params))
    finally:
        event.remove(conn, "before_cursor_execute", prefix)


def test_hot_statements_use_their_indexes(many_finished: Absurd) -> None:
    app = many_finished
    with app.engine.connect() as conn:
        live = conn.execute(
            select(runs.c.run_id, runs.c.task_id).where(runs.c.state == "running").limit(1)
        ).one()
        plans = {
            "claim": explain(
                conn,
                sqlw.claim,
                {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1},
            ),
            "expired_runs": explain(conn, sqlw.expired_runs, {"queue": "default"}),
            "write_checkpoint": explain(
                conn,
                sqlw.write_checkpoint,
                {"run": live.run_id, "claim_timeout": 120, "step": "s", "value_json": "1"},
            ),
            "complete_and_claim": explain(
                conn,
                sqlw.complete_and_claim,
                {
                    "run": live.run_id,
                    "result_json": "1",
                    "queue": "default",
                    "worker": "w",
                    "claim_timeout": 120,
                    "batch_size": 1,
                },
            ),
            "handed_over_run": explain(
                conn, sqlw.handed_over_run, {"run": live.run_id, "worker": "w"}
            ),
            "emit_event": explain(conn, _sql.emit_event, app._core.emit_params("e", 1, None)),
            "wake_waiters": explain(conn, _sql.wake_waiters, app._core.emit_params("e", 1, None)),
            "fetch": explain(
                conn, _sql.fetch_task_result, {"task": live.task_id, "queue": "default"}
            ),
        }
    assert "Index Scan using ix_runs_claim on runs" in plans["claim"]
    assert "Index Scan using ix_runs_lease on runs" in plans["expired_runs"]
    assert "Index Scan using pk_runs on runs" in plans["write_checkpoint"]
    assert "Conflict Arbiter Indexes: pk_checkpoints" in plans["write_checkpoint"]
    assert "Index Scan using ix_runs_claim on runs" in plans["complete_and_claim"]
    assert "Index Scan using pk_runs on runs" in plans["complete_and_claim"]
    # The completed run by its key; the run it names by key or among the running.
    assert "Index Scan using pk_runs on runs handing" in plans["handed_over_run"]
    assert "Conflict Arbiter Indexes: pk_events" in plans["emit_event"]
    assert "Index Scan using pk_tasks on tasks" in plans["fetch"]
    for name, plan in plans.items():
        for table in ("runs", "tasks", "checkpoints", "events"):
            assert f"Seq Scan on {table}" not in plan, (name, plan)


def test_cleanup_does_not_scan_every_task_and_event(many_finished: Absurd) -> None:
    app = many_finished
    with app.engine.connect() as conn:
        plan = explain(conn, _sql.cleanup, {"queue": "default", "older_than": 86400, "limit": 100})
    assert "Index Scan using ix_tasks_finished on tasks" in plan
    assert "Index Scan using ix_events_emitted on events" in plan
    # Observed: "Seq Scan on tasks parent" (and at this size also the DELETE's
    # "Seq Scan on tasks") and "Seq Scan on events events_2" under the DELETE.
    assert "Seq Scan on tasks" not in plan, plan
    assert "Seq Scan on events" not in plan, plan


def test_deleting_a_task_finds_its_waits_by_index(app: Absurd) -> None:
    with app.engine.begin() as conn:
        conn.execute(text(_POPULATE.replace(str(FINISHED), "5000")))
        conn.execute(
            text(
                "INSERT INTO absurd.waits (run_id, task_id, queue_name, event_name, step_name) "
                "SELECT run_id, task_id, queue_name, 'ev-' || attempt, 's' FROM absurd.runs"
            )
        )
        conn.execute(text("ANALYZE absurd.waits"))
        # The statement the RI trigger of fk_waits_task_id_tasks runs per deleted task.
        plan = "\n".join(
            conn.scalars(
                text("EXPLAIN (COSTS OFF) DELETE FROM absurd.waits WHERE task_id = :t"),
                {"t": uuid.UUID("00000000-0000-7000-8000-000000000001")},
            )
        )
    assert "Seq Scan on waits" not in plan, plan


@pytest.fixture
def generic_plans(app: Absurd) -> Iterator[tuple[Connection, list[str]]]:
    """A private connection that plans generically and sends each plan as a NOTICE."""
    engine = create_engine(app.engine.url, poolclass=NullPool)
    notices: list[str] = []
    try:
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql("LOAD 'auto_explain'")
            except Exception:
                pytest.skip("auto_explain is not loadable here")
            conn.exec_driver_sql("SET auto_explain.log_min_duration = 0")
            conn.exec_driver_sql("SET auto_explain.log_level = 'notice'")
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.commit()
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            yield conn, notices
    finally:
        engine.dispose()


def test_claim_and_sweep_use_partial_indexes_in_generic_plans(
    many_finished: Absurd, generic_plans: tuple[Connection, list[str]]
) -> None:
    conn, notices = generic_plans
    conn.execute(
        sqlw.claim, {"queue": "default", "worker": "w", "claim_timeout": 120, "batch_size": 1}
    )
    conn.rollback()
    conn.execute(sqlw.expired_runs, {"queue": "default"})
    conn.rollback()
    claim_plan, sweep_plan = (n for n in notices if "absurd.runs" in n)
    assert "ix_runs_claim" in claim_plan, claim_plan  # observed: Seq Scan on runs
    assert "ix_runs_lease" in sweep_plan, sweep_plan


def test_inspection_uses_indexes(many_finished: Absurd) -> None:
    """list_tasks under each filter, a task's children and the recent finishes
    of queue_stats use an index, not a scan of every task or run."""
    from absurd_sqla import _inspect

    def listing(**filters: Any) -> str:
        given = {"queue": None, "state": None, "task_name": None, "since": None, "after": None}
        params = _inspect.list_params(**{**given, **filters, "limit": 50})
        bound = {key: value for key, value in params.items() if value is not None}
        return explain(conn, _inspect.list_tasks(params), bound)

    with many_finished.engine.connect() as conn:
        some = uuid.UUID("00000000-0000-7000-8000-000000000010")
        plans = {
            "all": listing(),
            "queue": listing(queue="rare"),  # rare filters: the index, not pk_tasks
            "state": listing(state="failed"),
            "name": listing(task_name="live"),
            "after": listing(queue="rare", after=some),
            "children": explain(conn, _inspect.task_children, {"task": some}),
            "finishes": explain(conn, _inspect.recent_finishes({"queue": None}), {}),
        }
    assert "pk_tasks" in plans["all"]
    assert "ix_tasks_list_queue" in plans["queue"]
    assert "ix_tasks_list_queue" in plans["after"]
    assert "ix_tasks_list_state" in plans["state"]
    assert "ix_tasks_list_name" in plans["name"]
    assert "ix_tasks_parent" in plans["children"]
    assert "ix_runs_finished" in plans["finishes"]
    for name, plan in plans.items():
        for table in ("runs", "tasks"):
            assert f"Seq Scan on {table}" not in plan, (name, plan)
