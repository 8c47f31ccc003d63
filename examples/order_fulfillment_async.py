"""Order fulfillment on asyncio: the Absurd SDK README's async example, on absurd_sqla.

    python examples/order_fulfillment_async.py

The task handler below is the original README's "Asynchronous API" example as
written; only its import changed (``from absurd_sqla import AsyncAbsurd``).
Around it: the client is built on a database given by the caller instead of
the hard-coded ``postgresql://localhost/absurd``, and the README's top-level
``await app.start_worker()`` runs as an asyncio task inside ``main()``.

The task charges the payment and reserves inventory (checkpointed steps), then
waits durably for ``shipment.packed:<order_id>`` -- the run is suspended and
frees its worker slot -- and sends a notification once the warehouse emits it.

With ABSURD_DATABASE_URL unset it starts a throwaway PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from absurd_sqla import AsyncAbsurd, TaskResultSnapshot, migrate
from absurd_sqla.localpg import database_url

TASK_NAME = "order-fulfillment"


async def build_app(bind: str | AsyncEngine) -> AsyncAbsurd:
    """An ``AsyncAbsurd`` client with the order-fulfillment task registered.

    ``bind`` is a URL or an AsyncEngine on a database already migrated with
    ``absurd_sqla.migrate.upgrade``; the default queue is created if missing.
    Call it inside the event loop that will use the client (async connections
    belong to the loop that opened them).
    """
    app = AsyncAbsurd(bind)
    await app.create_queue()

    # ---- the README's example, as written ------------------------------------
    @app.register_task(name="order-fulfillment")
    async def process_order(params, ctx):
        async def process_payment():
            return {
                "payment_id": f"pay-{params['order_id']}",
                "amount": params["amount"],
            }

        payment = await ctx.step("process-payment", process_payment)

        async def reserve_inventory():
            return {"reserved_items": params["items"]}

        inventory = await ctx.step("reserve-inventory", reserve_inventory)

        shipment = await ctx.await_event(f"shipment.packed:{params['order_id']}")

        async def send_notification():
            return {
                "sent_to": params["email"],
                "tracking_number": shipment["tracking_number"],
            }

        notification = await ctx.step("send-notification", send_notification)

        return {
            "order_id": params["order_id"],
            "payment": payment,
            "inventory": inventory,
            "tracking_number": shipment["tracking_number"],
            "notification": notification,
        }

    # ---- end of the README's example -------------------------------------------

    return app


async def wait_for_state(app: AsyncAbsurd, task_id: Any, state: str, timeout: float = 30.0) -> None:
    """Poll the task's state until it is ``state`` (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = await app.fetch_task_result(task_id)
        if snapshot is not None and snapshot.state == state:
            return
        if snapshot is not None and snapshot.terminal:
            raise RuntimeError(f"task {task_id} ended {snapshot.state}: {snapshot.failure}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} did not reach {state!r} within {timeout}s")
        await asyncio.sleep(0.02)


async def fulfil_order(
    app: AsyncAbsurd, order: dict[str, Any], tracking_number: str, timeout: float = 30.0
) -> TaskResultSnapshot:
    """Spawn the task, let it wait for the shipment, pack it, and await the result.

    A worker must be running (``await app.start_worker()`` in another asyncio
    task, or another process).
    """
    spawned = await app.spawn(TASK_NAME, order)
    print(f"spawned order-fulfillment task {spawned.task_id}")
    await wait_for_state(app, spawned.task_id, "sleeping", timeout)
    print("payment taken, inventory reserved; waiting for the warehouse...")
    await app.emit_event(
        f"shipment.packed:{order['order_id']}", {"tracking_number": tracking_number}
    )
    return await app.await_task_result(spawned.task_id, timeout=timeout)


EXAMPLE_ORDER = {
    "order_id": "A-1001",
    "amount": 4200,
    "items": ["sku-1", "sku-7"],
    "email": "ada@example.com",
}


async def run(url: str) -> TaskResultSnapshot:
    """Build the client, run a worker beside the order, and stop it gracefully."""
    app = await build_app(url)
    worker = asyncio.create_task(app.start_worker(concurrency=2))
    try:
        return await fulfil_order(app, EXAMPLE_ORDER, tracking_number="TRACK-42")
    finally:
        # A stop that comes before the worker has started is remembered, so
        # one stop_worker() is enough in a single event loop.
        app.stop_worker()
        await worker
        await app.close()


def main() -> None:
    with database_url() as url:
        migrate.upgrade(url)  # creates the absurd schema (idempotent)
        result = asyncio.run(run(url))
        print(f"task {result.state}:")
        print(json.dumps(result.result, indent=2))


if __name__ == "__main__":
    main()
