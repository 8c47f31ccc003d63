"""spawn / emit_event / cancel_task join the caller's transaction and never commit it."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from absurd_sqla import Absurd, SpawnRequest
from absurd_sqla.models import events, tasks
from tests.support import Order, count_runs, count_tasks


def orders_and_tasks(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        orders = conn.scalar(select(func.count()).select_from(Order.__table__))
        spawned = conn.scalar(select(func.count()).select_from(tasks))
    return int(orders or 0), int(spawned or 0)


def test_commit_keeps_order_and_task(app: Absurd, clean_db: Engine) -> None:
    with Session(clean_db) as session:
        order = Order(email="a@example.com", amount=10)
        session.add(order)
        session.flush()
        spawned = app.spawn("fulfil", {"order_id": order.id}, session=session)
        # Not visible outside the transaction before commit.
        assert orders_and_tasks(clean_db) == (0, 0)
        session.commit()
    assert orders_and_tasks(clean_db) == (1, 1)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "pending"


def test_rollback_drops_order_and_task(app: Absurd, clean_db: Engine) -> None:
    with Session(clean_db) as session:
        session.add(Order(email="a@example.com", amount=10))
        session.flush()
        spawned = app.spawn("fulfil", {"order_id": 1}, session=session)
        session.rollback()
    assert orders_and_tasks(clean_db) == (0, 0)
    assert count_runs(clean_db) == 0
    assert app.fetch_task_result(spawned.task_id) is None


def test_exception_inside_session_begin_writes_nothing(app: Absurd, clean_db: Engine) -> None:
    factory = sessionmaker(clean_db)
    with pytest.raises(RuntimeError, match="payment declined"), factory.begin() as session:
        session.add(Order(email="b@example.com", amount=5))
        app.spawn("fulfil", {"order_id": 2}, session=session)
        app.emit_event("order.created:2", {"id": 2}, session=session)
        raise RuntimeError("payment declined")
    assert orders_and_tasks(clean_db) == (0, 0)
    with clean_db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events)) == 0


def test_savepoint_rollback_drops_only_inner_task(app: Absurd, clean_db: Engine) -> None:
    with Session(clean_db) as session:
        session.add(Order(email="c@example.com", amount=7))
        outer = app.spawn("fulfil", {"n": "outer"}, session=session)
        nested = session.begin_nested()
        inner = app.spawn("fulfil", {"n": "inner"}, session=session)
        nested.rollback()
        session.commit()
    assert orders_and_tasks(clean_db) == (1, 1)
    assert app.fetch_task_result(outer.task_id) is not None
    assert app.fetch_task_result(inner.task_id) is None


def test_connection_enlistment(app: Absurd, clean_db: Engine) -> None:
    with clean_db.connect() as conn:
        app.spawn("fulfil", {}, session=conn)
        app.spawn_many([SpawnRequest("fulfil", {"i": i}) for i in range(3)], session=conn)
        conn.rollback()
    assert count_tasks(clean_db) == 0
    with clean_db.begin() as conn:
        app.spawn("fulfil", {}, session=conn)
    assert count_tasks(clean_db) == 1


def test_emit_event_rolls_back_with_caller(app: Absurd, clean_db: Engine) -> None:
    with Session(clean_db) as session:
        assert app.emit_event("paid:1", {"ok": True}, session=session) is True
        session.rollback()
    # The rolled-back emit never happened: a later emit is the first one.
    assert app.emit_event("paid:1", {"ok": False}) is True
    with clean_db.connect() as conn:
        assert conn.scalar(select(events.c.payload)) == {"ok": False}


def test_cancel_rolls_back_with_caller(app: Absurd, clean_db: Engine) -> None:
    spawned = app.spawn("fulfil", {})
    with Session(clean_db) as session:
        assert app.cancel_task(spawned.task_id, session=session) is True
        session.rollback()
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "pending"


def test_notify_is_sent_only_on_commit(app: Absurd, clean_db: Engine) -> None:
    import psycopg

    url = clean_db.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute('LISTEN "absurd.default"')
        with Session(clean_db) as session:
            app.spawn("fulfil", {}, session=session)
            session.rollback()
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
        with Session(clean_db) as session:
            app.spawn("fulfil", {}, session=session)
            session.commit()
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in received] == ["absurd.default"]
        # Nothing else is queued: the rolled-back spawn never notified, even late.
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []


def test_session_sees_its_own_uncommitted_task(app: Absurd, clean_db: Engine) -> None:
    with Session(clean_db) as session:
        spawned = app.spawn("fulfil", {"x": 1}, session=session)
        row = session.execute(
            text("SELECT params FROM absurd.tasks WHERE task_id = :t"), {"t": spawned.task_id}
        ).one()
        assert row.params == {"x": 1}
        session.rollback()
