"""Checkpoints of concurrent handlers share one statement and one commit
(``absurd_sqla._group``), each row still fenced on its own."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, func, insert, select

from absurd_sqla import Absurd, TaskContext
from absurd_sqla.models import checkpoints, tasks
from tests.support import (
    DEADLINE,
    count_tasks,
    wait_for_lock_waiters,
    wait_until,
    worker_thread,
)


def test_checkpoints_that_meet_are_written_together_each_fenced(
    app: Absurd, clean_db: Engine
) -> None:
    lead_go, go = threading.Event(), threading.Event()

    @app.register_task("grouped")
    def grouped(params: Any, ctx: TaskContext) -> int:
        # The leader writes once the test blocks its write; the others once it is in flight.
        assert (go if params["n"] > 0 else lead_go).wait(DEADLINE)
        return ctx.step("one", lambda: params["n"])

    lead = app.spawn("grouped", {"n": 0})
    others = [app.spawn("grouped", {"n": n}) for n in (1, 2, 3)]
    group = app._db.checkpoints
    with (
        worker_thread(app, concurrency=4, poll_interval=0.05, worker_id="w"),
        clean_db.connect() as blocker,
    ):
        wait_until(lambda: count_tasks(clean_db, state="running") == 4, "all four claimed")
        # An uncommitted row with the leader's checkpoint key: its write waits on it.
        blocker.execute(
            insert(checkpoints).values(
                task_id=lead.task_id,
                checkpoint_name="one",
                state=-1,
                owner_run_id=lead.run_id,
                updated_at=func.now(),
            )
        )
        lead_go.set()
        wait_for_lock_waiters(clean_db, 1)
        go.set()
        wait_until(lambda: group.waiting == 3, "three checkpoints waiting behind the leader")
        # Cancelled while its checkpoint waits: its row in the group is refused.
        assert app.cancel_task(others[2].task_id) is True
        blocker.rollback()

        def finished() -> bool:
            with clean_db.connect() as conn:
                states = conn.scalars(
                    select(tasks.c.state).where(
                        tasks.c.state.in_(["completed", "cancelled", "failed"])
                    )
                ).all()
            return len(states) == 4

        wait_until(finished, "every task finished")
    assert group.groups == 1
    results = [app.fetch_task_result(s.task_id) for s in (lead, *others)]
    assert [(r.state, r.result) for r in results if r is not None] == [
        ("completed", 0),
        ("completed", 1),
        ("completed", 2),
        ("cancelled", None),
    ]
    with clean_db.connect() as conn:
        rows = conn.execute(select(checkpoints.c.task_id, checkpoints.c.state))
        written = {row.task_id: row.state for row in rows}
    assert written == {lead.task_id: 0, others[0].task_id: 1, others[1].task_id: 2}
