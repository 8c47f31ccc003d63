"""examples/order_fulfillment_async.py (the original README's asyncio example) runs
end to end against the test database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Engine, select

from absurd_sqla import AsyncAbsurd
from absurd_sqla.models import checkpoints, events, tasks
from tests.integration.test_examples import EXPECTED, ORDER, load_example
from tests.support import DEADLINE, run_async

EXAMPLE = "order_fulfillment_async"
ALL_STEPS = {
    "process-payment",
    "reserve-inventory",
    "$await:shipment.packed:T-7",
    "send-notification",
}


def stored_steps(engine: Engine, task_id: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(checkpoints.c.checkpoint_name, checkpoints.c.state).where(
                checkpoints.c.task_id == task_id
            )
        )
        return {row.checkpoint_name: row.state for row in rows}


def emitted_events(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(events.c.event_name, events.c.payload).where(events.c.emitted_at.is_not(None))
        )
        return {row.event_name: row.payload for row in rows}


async def work_until_idle(app: AsyncAbsurd) -> int:
    """``testing.run_until_idle`` for an ``AsyncAbsurd``: claim and run in this loop."""
    total = 0
    while claimed := await app.work_batch("test-worker", batch_size=10):
        total += claimed
    return total


@run_async
async def test_order_fulfillment_async_with_a_worker_task(
    clean_db: Engine, database_url: str
) -> None:
    example = load_example(EXAMPLE)
    app: AsyncAbsurd = await example.build_app(database_url)
    worker = asyncio.create_task(app.start_worker(concurrency=2, poll_interval=0.05))
    try:
        snapshot = await example.fulfil_order(app, ORDER, tracking_number="TRACK-T7")
    finally:
        app.stop_worker()
        await asyncio.wait_for(worker, DEADLINE)
        await app.close()
    assert snapshot.state == "completed", snapshot.failure
    assert snapshot.result == EXPECTED
    assert emitted_events(clean_db) == {"shipment.packed:T-7": {"tracking_number": "TRACK-T7"}}
    with clean_db.connect() as conn:
        (task_id,) = conn.scalars(select(tasks.c.task_id))
    steps = stored_steps(clean_db, task_id)
    assert set(steps) == ALL_STEPS
    assert steps["process-payment"] == EXPECTED["payment"]
    assert steps["reserve-inventory"] == EXPECTED["inventory"]
    assert steps["send-notification"] == EXPECTED["notification"]


@run_async
async def test_order_fulfillment_async_suspends_until_the_shipment_is_packed(
    clean_db: Engine, database_url: str
) -> None:
    app: AsyncAbsurd = await load_example(EXAMPLE).build_app(database_url)
    try:
        spawned = await app.spawn("order-fulfillment", ORDER)
        assert await work_until_idle(app) == 1
        waiting = await app.fetch_task_result(spawned.task_id)
        assert waiting is not None and waiting.state == "sleeping"
        assert set(stored_steps(clean_db, spawned.task_id)) == {
            "process-payment",
            "reserve-inventory",
        }
        assert emitted_events(clean_db) == {}

        # An unrelated order's shipment wakes nothing.
        await app.emit_event("shipment.packed:T-8", {"tracking_number": "OTHER"})
        assert await work_until_idle(app) == 0

        assert await app.emit_event("shipment.packed:T-7", {"tracking_number": "TRACK-T7"})
        assert await work_until_idle(app) == 1
        snapshot = await app.fetch_task_result(spawned.task_id)
        assert snapshot is not None and snapshot.state == "completed", snapshot
        assert snapshot.result == EXPECTED
        assert set(stored_steps(clean_db, spawned.task_id)) == ALL_STEPS
    finally:
        await app.close()


def test_order_fulfillment_async_main(
    clean_db: Engine,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ABSURD_DATABASE_URL", database_url)
    load_example(EXAMPLE).main()
    out = capsys.readouterr().out
    assert "payment taken, inventory reserved; waiting for the warehouse..." in out
    assert "task completed:" in out
    assert '"tracking_number": "TRACK-42"' in out
    assert '"payment_id": "pay-A-1001"' in out
    with clean_db.connect() as conn:
        states = list(conn.scalars(select(tasks.c.state)))
    assert states == ["completed"]
    assert emitted_events(clean_db) == {"shipment.packed:A-1001": {"tracking_number": "TRACK-42"}}
