"""``cancellation={"max_duration": seconds}``: a task still going that long after
its first start is cancelled. The limit is checked when a run is claimed, at
each checkpoint (``step``, ``complete_step``, ``transaction_step``) and at each
``heartbeat`` (docs/howto/cancellation.md); the database clock is moved with
``FakeClock``, never waited for.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from absurd_sqla import Absurd, CancelledTask
from absurd_sqla.context import TaskContext
from absurd_sqla.models import checkpoints
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import Order, run_states

LIMIT = 60  # seconds of max_duration in these tests


def test_max_duration_counts_sleep(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("bounded")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.sleep_for("long-nap", 120)
        return "too late"

    spawned = app.spawn("bounded", {}, cancellation={"max_duration": 60})
    run_until_idle(app)
    clock.advance(121)
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled"


def test_max_duration_enforced_at_checkpoints(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("slow-steps")
    def handler(params: Any, ctx: TaskContext) -> str:
        ctx.step("a", lambda: clock.advance(61) and 1)
        ctx.step("b", lambda: 2)
        return "done"

    spawned = app.spawn("slow-steps", {}, cancellation={"max_duration": 60})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled"


def test_a_heartbeat_past_max_duration_cancels_the_task(app: Absurd, clock: FakeClock) -> None:
    """No checkpoint follows the heartbeat: only the heartbeat can notice."""
    raised: list[str] = []
    reached: list[str] = []

    @app.register_task("beating", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> str:
        clock.advance(LIMIT + 1)
        try:
            ctx.heartbeat()
        except CancelledTask:
            raised.append("CancelledTask")
            raise
        reached.append("after-heartbeat")
        return "finished"

    spawned = app.spawn("beating", {}, cancellation={"max_duration": LIMIT})
    assert app.work_batch() == 1
    assert (raised, reached) == (["CancelledTask"], [])
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled" and snapshot.result is None
    assert run_states(app.engine, spawned.task_id) == ["cancelled"]


def test_a_transaction_step_past_max_duration_cancels_the_task(
    app: Absurd, clock: FakeClock, clean_db: Engine
) -> None:
    """The step's writes and its checkpoint stay together (both or neither), and
    nothing after the step runs."""
    writes: list[int] = []
    reached: list[str] = []

    @app.register_task("slow-write", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> str:
        def write(session: Session) -> str:
            writes.append(1)
            session.add(Order(email="late@example.com", amount=1))
            return "written"

        clock.advance(LIMIT + 1)
        value = ctx.transaction_step("write", write)
        reached.append(value)
        return value

    spawned = app.spawn("slow-write", {}, cancellation={"max_duration": LIMIT})
    assert app.work_batch() == 1
    assert (writes, reached) == ([1], [])
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "cancelled" and snapshot.result is None
    assert run_states(app.engine, spawned.task_id) == ["cancelled"]
    with Session(clean_db) as session:
        orders = session.scalar(select(func.count()).select_from(Order))
        stored = session.scalar(
            select(func.count())
            .select_from(checkpoints)
            .where(checkpoints.c.task_id == spawned.task_id)
        )
    assert (orders, stored) in ((0, 0), (1, 1))


def test_heartbeats_and_transaction_steps_within_max_duration_go_on(
    app: Absurd, clock: FakeClock, clean_db: Engine
) -> None:
    """The control: the same calls just inside the limit cancel nothing."""

    @app.register_task("prompt", default_max_attempts=1)
    def handler(params: Any, ctx: TaskContext) -> str:
        clock.advance(LIMIT / 2)
        ctx.heartbeat()
        clock.advance(LIMIT / 2 - 1)
        ctx.transaction_step("write", lambda s: s.add(Order(email="ok@example.com", amount=2)))
        ctx.heartbeat()
        return "finished"

    spawned = app.spawn("prompt", {}, cancellation={"max_duration": LIMIT})
    assert app.work_batch() == 1
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == "finished"
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 1
