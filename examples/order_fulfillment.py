"""Order fulfillment: the Absurd SDK README's example, on absurd_sqla.

    python examples/order_fulfillment.py

The task charges the payment and reserves inventory (checkpointed steps), then
waits durably for ``shipment.packed:<order_id>`` -- the run is suspended and
frees its worker -- and sends a notification once the warehouse emits it.

With ABSURD_DATABASE_URL unset it starts a throwaway PostgreSQL of its own.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sqlalchemy import Engine

from absurd_sqla import Absurd, TaskResultSnapshot, migrate
from absurd_sqla.context import TaskContext
from absurd_sqla.localpg import database_url

TASK_NAME = "order-fulfillment"


def build_app(bind: str | Engine) -> Absurd:
    """An ``Absurd`` client with the order-fulfillment task registered.

    ``bind`` is a URL or an Engine on a database already migrated with
    ``absurd_sqla.migrate.upgrade``; the default queue is created if missing.
    """
    app = Absurd(bind)
    app.create_queue()

    @app.register_task(name=TASK_NAME)
    def process_order(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        step = ctx.run_step

        @step("process-payment")
        def payment() -> dict[str, Any]:
            return {
                "payment_id": f"pay-{params['order_id']}",
                "amount": params["amount"],
            }

        @step("reserve-inventory")
        def inventory() -> dict[str, Any]:
            return {"reserved_items": params["items"]}

        # Suspends the run (no worker slot held) until the warehouse emits it.
        shipment = ctx.await_event(f"shipment.packed:{params['order_id']}")

        @step("send-notification")
        def notification() -> dict[str, Any]:
            return {
                "sent_to": params["email"],
                "tracking_number": shipment["tracking_number"],
            }

        return {
            "order_id": params["order_id"],
            "payment": payment,
            "inventory": inventory,
            "tracking_number": shipment["tracking_number"],
            "notification": notification,
        }

    return app


def wait_for_state(app: Absurd, task_id: Any, state: str, timeout: float = 30.0) -> None:
    """Poll the task's state until it is ``state`` (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = app.fetch_task_result(task_id)
        if snapshot is not None and snapshot.state == state:
            return
        if snapshot is not None and snapshot.terminal:
            raise RuntimeError(f"task {task_id} ended {snapshot.state}: {snapshot.failure}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} did not reach {state!r} within {timeout}s")
        time.sleep(0.02)


def fulfil_order(
    app: Absurd, order: dict[str, Any], tracking_number: str, timeout: float = 30.0
) -> TaskResultSnapshot:
    """Spawn the task, let it wait for the shipment, pack it, and await the result.

    A worker must be running (``app.start_worker()`` in another thread or process).
    """
    spawned = app.spawn(TASK_NAME, order)
    print(f"spawned order-fulfillment task {spawned.task_id}")
    wait_for_state(app, spawned.task_id, "sleeping", timeout)
    print("payment taken, inventory reserved; waiting for the warehouse...")
    app.emit_event(f"shipment.packed:{order['order_id']}", {"tracking_number": tracking_number})
    return app.await_task_result(spawned.task_id, timeout=timeout)


EXAMPLE_ORDER = {
    "order_id": "A-1001",
    "amount": 4200,
    "items": ["sku-1", "sku-7"],
    "email": "ada@example.com",
}


def main() -> None:
    with database_url() as url:
        migrate.upgrade(url)  # creates the absurd schema (idempotent)
        app = build_app(url)
        worker = threading.Thread(target=app.start_worker, kwargs={"concurrency": 2})
        worker.start()
        try:
            result = fulfil_order(app, EXAMPLE_ORDER, tracking_number="TRACK-42")
        finally:
            # Repeat: stop_worker() reaches only a worker that has started.
            while worker.is_alive():
                app.stop_worker()
                worker.join(timeout=0.1)
            app.close()
        print(f"task {result.state}:")
        print(json.dumps(result.result, indent=2))


if __name__ == "__main__":
    main()
