"""The run statements of ``absurd_sqla._sql_worker``, compiled for PostgreSQL
without a database: the properties the worker relies on (skip-locked FIFO
claims, literal states for the partial indexes, fencing by lease, lock order,
the database clock) and the bind parameters, checked against the parameter
dicts ``RunState`` / ``ClaimedRun`` build for them.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import TextClause

from absurd_sqla import _sql_worker as sqlw
from absurd_sqla._run import RunState
from absurd_sqla.models import runs
from tests.support import claimed_run

RUN_STATEMENTS = (
    "claim",
    "expired_runs",
    "write_checkpoint",
    "heartbeat",
    "sleep",
    "await_event",
    "defer_run",
    "complete_run",
    "fail_run",
)
# Writes a running task makes: each must find its run still running under an
# unexpired lease, and report the run's state when it does not.
FENCED = ("write_checkpoint", "heartbeat", "sleep", "await_event", "complete_run")
LEASE_OK = "(absurd.runs.claim_expires_at IS NULL OR absurd.runs.claim_expires_at > absurd.now())"


def sql(name: str) -> str:
    return str(getattr(sqlw, name).compile(dialect=postgresql.dialect()))


def named_binds(name: str) -> set[str]:
    """The bind parameters a caller must supply (not the anonymous ones SQLAlchemy
    makes for literal values such as ``state='running'`` in a SET clause)."""
    compiled = getattr(sqlw, name).compile(dialect=postgresql.dialect())
    return {key for key, bind in compiled.binds.items() if not bind.unique}


def cte_body(statement_sql: str, cte: str) -> str:
    """The text of one CTE: from ``<cte> AS (`` to the next CTE or the final SELECT."""
    match = re.search(
        rf"(?:WITH |, \n){cte} AS \n\((.*?)\)(?:, \n\w+ AS \n\(|\n SELECT)", statement_sql, re.S
    )
    assert match is not None, f"no CTE {cte!r} in:\n{statement_sql}"
    return match.group(1)


def partial_index_predicate(index_name: str) -> str:
    (index,) = (ix for ix in runs.indexes if ix.name == index_name)
    where = index.dialect_options["postgresql"]["where"]
    assert isinstance(where, TextClause)
    return where.text


# -- claim -----------------------------------------------------------------------


def test_claim_skips_locked_rows_and_takes_the_longest_due_first() -> None:
    claim = sql("claim")
    candidates = cte_body(claim, "candidates")
    assert "FOR UPDATE OF runs, tasks SKIP LOCKED" in candidates  # never waits for a lock
    assert "absurd.runs.available_at <= absurd.now()" in candidates  # due runs only
    assert "absurd.runs.queue_name = %(queue)s" in candidates
    assert "ORDER BY absurd.runs.available_at \n LIMIT %(batch_size)s" in candidates
    # The rows come back in the same order, so a batch runs oldest first.
    assert claim.rstrip().endswith("ORDER BY candidates.available_at")
    # A finished task never runs again, whatever state a stray run is in.
    assert "absurd.tasks.state NOT IN ('completed', 'failed', 'cancelled')" in candidates


def test_claim_leases_the_run_and_replays_checkpoints_in_the_same_round_trip() -> None:
    claimed = cte_body(sql("claim"), "claimed")
    assert claimed.startswith("UPDATE absurd.runs SET")
    assert "claimed_by=%(worker)s" in claimed
    # claim_timeout <= 0: no expiry; otherwise now + claim_timeout.
    assert re.search(
        r"claim_expires_at=CASE WHEN \(CAST\(%\(claim_timeout\)s AS FLOAT\) > %\(param_\d+\)s"
        r"(?:::INTEGER)?\) THEN absurd\.now\(\) \+ CAST\(%\(claim_timeout\)s AS FLOAT\) "
        r"\* interval '1 second' ELSE NULL END",
        claimed,
    )
    assert "started_at=coalesce(absurd.runs.started_at, absurd.now())" in claimed
    assert "jsonb_object_agg(absurd.checkpoints.checkpoint_name" in sql("claim")
    assert "absurd.now() AS now" in sql("claim")  # the claim time, for max_delay


@pytest.mark.parametrize(
    ("name", "index"), [("claim", "ix_runs_claim"), ("expired_runs", "ix_runs_lease")]
)
def test_state_filters_are_literals_matching_the_partial_index(name: str, index: str) -> None:
    """A generic (prepared) plan can use a partial index only if the statement
    names the index predicate's states as literals, not bind parameters."""
    predicate = partial_index_predicate(index)
    assert f"absurd.runs.{predicate}" in sql(name)
    compiled = getattr(sqlw, name).compile(dialect=postgresql.dialect())
    assert not [key for key in compiled.params if key.startswith("state")]


def test_expired_runs_finds_running_runs_past_their_lease_without_waiting() -> None:
    expired = sql("expired_runs")
    assert "absurd.runs.claim_expires_at < absurd.now()" in expired
    assert "absurd.runs.queue_name = %(queue)s" in expired
    assert "ORDER BY absurd.runs.claim_expires_at" in expired
    assert expired.rstrip().endswith("FOR UPDATE OF runs, tasks SKIP LOCKED")
    assert re.search(r"LIMIT %\(param_\d+\)s", expired)  # bounded: one sweep, one batch


# -- fencing and leases -------------------------------------------------------------


@pytest.mark.parametrize("name", FENCED)
def test_fenced_statements_check_state_and_lease_and_report_the_run_state(name: str) -> None:
    statement = sql(name)
    fence = (
        "WHERE absurd.runs.run_id = %(run)s::UUID AND absurd.runs.state = 'running' AND " + LEASE_OK
    )
    assert fence in statement
    assert ") AS owned" in statement
    # The state as found, so the caller can tell "cancelled" from "lease lost";
    # when nothing was written, read FOR SHARE: the newest committed
    # version, not the snapshot's (a cancel the write waited for).
    assert (
        "ELSE (SELECT absurd.runs.state \nFROM absurd.runs \nWHERE absurd.runs.run_id = "
        "%(run)s::UUID FOR SHARE) END AS run_state"
    ) in statement


def test_fail_run_checks_the_lease_unless_the_sweep_fails_it() -> None:
    failed = cte_body(sql("fail_run"), "failed_run")
    assert "absurd.runs.run_id = %(run)s::UUID" in failed
    assert (
        "(NOT %(require_lease)s OR absurd.runs.claim_expires_at IS NULL "
        "OR absurd.runs.claim_expires_at > absurd.now())"
    ) in failed
    assert "FOR SHARE) END AS run_state" in sql("fail_run")
    assert ") AS owned" in sql("fail_run")


@pytest.mark.parametrize("name", ["write_checkpoint", "heartbeat"])
def test_lease_renewal_never_shortens_a_lease_and_keeps_no_expiry(name: str) -> None:
    owner = cte_body(sql(name), "owner")
    assert owner.startswith("UPDATE absurd.runs SET claim_expires_at=")
    assert (
        "CASE WHEN (absurd.runs.claim_expires_at IS NULL) THEN NULL ELSE "
        "greatest(absurd.runs.claim_expires_at, "
        "absurd.now() + CAST(%(claim_timeout)s AS FLOAT) * interval '1 second') END"
    ) in owner


def test_write_checkpoint_writes_only_for_the_owner_and_overwrites_a_stale_one() -> None:
    written = cte_body(sql("write_checkpoint"), "written")
    assert written.startswith("INSERT INTO absurd.checkpoints")
    assert "FROM owner" in written  # no owner row (fenced): nothing inserted
    assert "ON CONFLICT (task_id, checkpoint_name) DO UPDATE SET state = excluded.state" in written


@pytest.mark.parametrize("name", ["sleep", "await_event"])
def test_suspending_statements_lock_the_owned_run_first(name: str) -> None:
    owner = cte_body(sql(name), "owner")
    assert owner.startswith("SELECT absurd.runs.run_id")
    assert owner.rstrip().endswith("FOR UPDATE")


def test_await_event_locks_the_event_row_so_an_emit_cannot_slip_between() -> None:
    event_row = cte_body(sql("await_event"), "event_row")
    assert event_row.startswith("INSERT INTO absurd.events (queue_name, event_name)")
    assert "ON CONFLICT (queue_name, event_name) DO UPDATE" in event_row
    assert "RETURNING absurd.events.payload, absurd.events.emitted_at" in event_row


# -- lock order and finishing ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["claim", "sleep", "await_event", "defer_run", "complete_run", "fail_run"]
)
def test_task_updates_read_the_run_update_so_runs_are_locked_first(name: str) -> None:
    statement = sql(name)
    run_updates = set(re.findall(r"(\w+) AS \n\(UPDATE absurd\.runs ", statement))
    task_sources = re.findall(r"UPDATE absurd\.tasks SET .*? FROM (\w+)", statement, re.S)
    assert run_updates and task_sources
    # Each task update joins a run update's RETURNING rows: it cannot lock first.
    for source in task_sources:
        assert source in run_updates, (name, source)


def test_fail_run_retries_only_when_told_and_wakes_workers() -> None:
    statement = sql("fail_run")
    retry_run = cte_body(statement, "retry_run")
    assert retry_run.startswith("INSERT INTO absurd.runs")
    assert "WHERE %(retry)s" in retry_run
    assert "%(new_run)s::UUID" in retry_run
    assert "absurd.now() + CAST(%(delay)s AS FLOAT) * interval '1 second'" in retry_run
    assert "FROM failed_task" in retry_run  # no retry for a task finished meanwhile
    assert "DELETE FROM absurd.waits" in cte_body(statement, "failed_waits")
    assert "pg_notify(%(channel)s" in statement


def test_defer_run_hands_the_run_back_as_if_never_started() -> None:
    statement = sql("defer_run")
    deferred = cte_body(statement, "deferred")
    assert "started_at=%(prev_started_at)s" in deferred
    assert "available_at=(absurd.now() + CAST(%(delay)s AS FLOAT) * interval '1 second')" in (
        deferred
    )
    assert "first_started_at=%(prev_first_started_at)s" in cte_body(statement, "deferred_task")


@pytest.mark.parametrize("name", RUN_STATEMENTS)
def test_run_statements_use_the_database_clock_and_bind_every_name(name: str) -> None:
    statement = sql(name)
    assert "absurd.now()" in statement  # honours FakeClock's absurd.fake_now
    assert not re.search(r"(?<!absurd\.)\bnow\(\)", statement)
    assert "clock_timestamp" not in statement and "CURRENT_TIMESTAMP" not in statement
    assert "'default'" not in statement


# -- parameters -----------------------------------------------------------------------


def built_params() -> dict[str, dict[str, Any]]:
    """The parameters RunState / ClaimedRun build for each statement."""
    run = claimed_run(
        retry_strategy={"kind": "fixed", "base_seconds": 5},
        max_attempts=3,
        checkpoints={"nap": "2030-01-02T00:00:00+00:00"},
    )
    state = RunState(run, "w", 120)
    step = state.begin("s")
    return {
        "write_checkpoint": state.checkpoint_params(step, {"v": 1}),
        "heartbeat": state.heartbeat_params(None),
        "sleep": state.sleep_params(step, wake_at=None, seconds=5),
        "sleep-replayed": state.sleep_params(state.begin("nap"), wake_at=None, seconds=None),
        "await_event": state.await_params(step, "e", "default", 10),
        "complete_run": state.complete_params({"ok": True}),
        "fail_run": state.fail_params({"name": "E", "message": "m", "traceback": None}),
        "defer_run": run.defer_params(),
    }


# complete_params starts from the base parameters every fenced write shares;
# complete_run does not extend the lease, so it ignores claim_timeout.
UNUSED = {"complete_run": {"claim_timeout"}}


@pytest.mark.parametrize(
    "name",
    [
        "write_checkpoint",
        "heartbeat",
        "sleep",
        "sleep-replayed",
        "await_event",
        "complete_run",
        "fail_run",
        "defer_run",
    ],
)
def test_the_parameters_the_code_builds_are_the_ones_the_statement_expects(name: str) -> None:
    statement = name.split("-")[0]
    passed = set(built_params()[name])
    expected = named_binds(statement)
    assert expected <= passed, f"{statement} needs {expected - passed}"
    assert passed - expected == UNUSED.get(statement, set())


def test_claim_and_sweep_parameters() -> None:
    assert named_binds("claim") == {"queue", "worker", "claim_timeout", "batch_size"}
    assert named_binds("expired_runs") == {"queue"}
