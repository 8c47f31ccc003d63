"""A run the worker must turn away (unknown task, cancellation policy) whose
hand-back fails does not escape ``work_batch``: its failure is recorded on
that run and the rest of the claimed batch still runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from absurd_sqla import Absurd, TaskContext
from absurd_sqla.testing import FakeClock

REFUSE = """
CREATE FUNCTION public.refuse_run_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'injected fault: %% -> %%', OLD.state, NEW.state; END $$;
CREATE TRIGGER refuse_run_update BEFORE UPDATE ON absurd.runs FOR EACH ROW
WHEN (OLD.state = 'running' AND NEW.state = '{to_state}')
EXECUTE FUNCTION public.refuse_run_update();
"""
UNDO = """
DROP TRIGGER IF EXISTS refuse_run_update ON absurd.runs;
DROP FUNCTION IF EXISTS public.refuse_run_update();
"""


@pytest.fixture
def refuse_updates_to(clean_db: Engine) -> Iterator[Any]:
    """Install a trigger that makes every ``running -> <state>`` run update fail."""

    def install(to_state: str) -> None:
        with clean_db.begin() as conn:
            conn.exec_driver_sql(REFUSE.format(to_state=to_state))

    try:
        yield install
    finally:
        with clean_db.begin() as conn:
            conn.exec_driver_sql(UNDO)


def runs_by_task(engine: Engine) -> dict[str, list[tuple[int, str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT t.task_name, r.attempt, r.state, r.failure_reason "
                "FROM absurd.runs r JOIN absurd.tasks t USING (task_id) ORDER BY r.run_id"
            )
        ).all()
    found: dict[str, list[tuple[int, str, Any]]] = {}
    for row in rows:
        found.setdefault(row.task_name, []).append((row.attempt, row.state, row.failure_reason))
    return found


def register_ok(app: Absurd) -> None:
    @app.register_task("ok")
    def ok(params: Any, ctx: TaskContext) -> str:
        return "done"


def test_a_failed_deferral_fails_that_run_and_the_batch_goes_on(
    app: Absurd, refuse_updates_to: Any
) -> None:
    register_ok(app)
    app.spawn("nobody-knows-me", {}, max_attempts=1)  # claimed first (FIFO)
    app.spawn("ok", {})
    app.spawn("ok", {})
    refuse_updates_to("pending")  # the deferral's running -> pending
    assert app.work_batch(batch_size=3) == 3
    found = runs_by_task(app.engine)
    assert [state for _, state, _ in found["ok"]] == ["completed", "completed"]
    ((attempt, state, reason),) = found["nobody-knows-me"]
    assert (attempt, state) == (1, "failed")
    assert "injected fault: running -> pending" in reason["message"]


def test_a_failed_policy_cancellation_fails_that_run_and_the_batch_goes_on(
    app: Absurd, clock: FakeClock, refuse_updates_to: Any
) -> None:
    register_ok(app)

    @app.register_task("late", cancellation={"max_delay": 10}, max_attempts=1)
    def late(params: Any, ctx: TaskContext) -> str:
        return "never"

    app.spawn("late", {})
    clock.advance(60)  # "late" is now past its max_delay
    app.spawn("ok", {})
    refuse_updates_to("cancelled")  # the policy cancellation's running -> cancelled
    assert app.work_batch(batch_size=2) == 2
    found = runs_by_task(app.engine)
    assert [state for _, state, _ in found["ok"]] == ["completed"]
    ((_, state, reason),) = found["late"]
    assert state == "failed"
    assert "injected fault: running -> cancelled" in reason["message"]
