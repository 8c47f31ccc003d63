"""Idempotency keys in ``spawn_many``, against the real PostgreSQL: a batch
with a key twice makes one task, and concurrent batches whose keys overlap in
different orders do not deadlock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, text

from absurd_sqla import Absurd, SpawnRequest
from absurd_sqla.models import tasks
from tests.support import Outcome, wait_for_lock_waiters


def test_spawn_many_with_overlapping_keys_in_different_orders_does_not_deadlock(
    app: Absurd,
) -> None:
    """A third transaction holds key "kx" only to pause batch A between k1 and k2.

    Without it, two 50-key batches in opposite orders started on a Barrier
    deadlocked in 33 of 40 rounds in review.
    """

    def batch(*keys: str) -> Callable[[], Any]:
        return lambda: app.spawn_many([SpawnRequest("t", {}, idempotency_key=k) for k in keys])

    with app.engine.connect() as holder:
        app.spawn("t", {}, idempotency_key="kx", session=holder)
        a = Outcome(batch("k1", "kx", "k2"))  # inserts k1, waits on kx
        wait_for_lock_waiters(app.engine, 1)
        b = Outcome(batch("k2", "k1"))  # inserts k2, waits on k1 (a)
        wait_for_lock_waiters(app.engine, 2)
        holder.rollback()  # a goes on to k2, held by b
        a.join()
        b.join()
    errors = [repr(o.error) for o in (a, b) if o.error is not None]
    assert errors == []  # observed: DeadlockDetected in one batch


def test_spawn_many_duplicate_keys_in_one_batch_make_one_task(app: Absurd) -> None:
    first, second, other = app.spawn_many(
        [
            SpawnRequest("t", {"n": 1}, idempotency_key="dup"),
            SpawnRequest("t", {"n": 2}, idempotency_key="dup"),
            SpawnRequest("t", {"n": 3}),
        ]
    )
    assert first.task_id == second.task_id and first.run_id == second.run_id
    assert (first.created, second.created, other.created) == (True, False, True)
    with app.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM absurd.tasks")) == 2
        assert conn.scalar(text("SELECT count(*) FROM absurd.runs")) == 2
        params = conn.scalar(select(tasks.c.params).where(tasks.c.idempotency_key == "dup"))
    assert params == {"n": 1}  # the first request wins
