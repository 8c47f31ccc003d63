"""Quickstart: an order row and its tasks, written in one transaction, then run.

    python examples/quickstart.py

With ABSURD_DATABASE_URL unset it starts a throwaway PostgreSQL of its own.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from absurd_sqla import Absurd, TaskContext, migrate
from absurd_sqla.localpg import database_url


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "quickstart_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    amount: Mapped[int]
    status: Mapped[str] = mapped_column(String(20), default="new")


def build_app(url: str) -> tuple[Absurd, sessionmaker[Session]]:
    migrate.upgrade(url)  # creates the absurd schema (idempotent)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    app = Absurd(sessions)
    app.create_queue()

    @app.register_task("charge-order")
    def charge_order(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        payment = ctx.step("charge", lambda: {"payment_id": f"pay-{params['order_id']}"})

        def mark_paid(session: Session) -> str:
            order = session.get(Order, params["order_id"])
            assert order is not None
            order.status = "paid"
            return order.status

        # The order update and this step's checkpoint commit together: exactly once.
        status = ctx.transaction_step("mark-paid", mark_paid)
        return {"payment": payment, "status": status}

    return app, sessions


def main() -> None:
    with database_url() as url:
        app, sessions = build_app(url)

        # The headline: the order and its task commit together, or not at all.
        with sessions.begin() as session:
            order = Order(email="ada@example.com", amount=4200)
            session.add(order)
            session.flush()
            order_id = order.id
            spawned = app.spawn("charge-order", {"order_id": order_id}, session=session)
        print(f"order {order_id} saved with task {spawned.task_id}")

        # A rolled-back order leaves no task behind.
        with sessions() as session:
            session.add(Order(email="bob@example.com", amount=1))
            app.spawn("charge-order", {"order_id": -1}, session=session)
            session.rollback()

        # A worker in a background thread; in production: its own process.
        worker = threading.Thread(target=app.start_worker, kwargs={"concurrency": 2})
        worker.start()
        result = app.await_task_result(spawned.task_id, timeout=30)
        app.stop_worker()
        worker.join()
        print(f"task {result.state}: {result.result}")
        with sessions() as session:
            print(f"orders: {[(o.id, o.status) for o in session.query(Order).order_by(Order.id)]}")
        app.close()


if __name__ == "__main__":
    main()
