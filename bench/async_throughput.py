"""The asyncio worker beside the thread worker: tasks/s, and event wake-up latency.

    python bench/async_throughput.py [--tasks 2000] [--rounds 3] [--wake-rounds 50]

Uses ABSURD_DATABASE_URL if set, else a throwaway local PostgreSQL (fsync off).

* Throughput: ``--tasks`` tasks of three checkpointed steps each, spawned up front
  with one ``spawn_many`` on a fresh queue; then one worker starts and the clock
  stops when a count of completed tasks in the database reaches the total (the
  same measurement as bench/throughput.py). Configurations: ``AsyncAbsurd`` at
  concurrency 1, 8 and 32, ``Absurd`` (threads) at 1 and 8, all on the same
  database in the same run. Each round runs every configuration once, in an
  order rotated per round; the table shows the median of ``--rounds`` rounds.
* Wake-up: a task of an ``AsyncAbsurd`` worker (polling only every 5 s) suspends
  in ``await ctx.await_event``; the clock runs from the ``emit_event`` call
  (which commits) to the handler running again after the await.

The async worker runs in an event loop of its own thread, as it would in a
process of its own; spawns, emits and the completion count come from the main
thread for every configuration alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import func, make_url, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from workload import three_steps, three_steps_async, waiter_async  # bench/ is on sys.path

from absurd_sqla import Absurd, AsyncAbsurd, SpawnRequest, migrate
from absurd_sqla.localpg import database_url
from absurd_sqla.models import tasks

TASK = "three-steps"
WAITER = "waiter"
WAKE_POLL_INTERVAL = 5.0
CONFIGS = [("async", 1), ("async", 8), ("async", 32), ("sync", 1), ("sync", 8)]
T = TypeVar("T")


class AsyncSide:
    """An ``AsyncAbsurd`` living in an event loop of its own thread."""

    def __init__(self, url: str, pool: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        engine = create_async_engine(
            make_url(url).set(drivername="postgresql+psycopg_async"),
            pool_size=pool,
            max_overflow=10,
        )
        self.app = AsyncAbsurd(engine)
        self.resumed: dict[str, float] = {}
        self.suspending = threading.Semaphore(0)
        self._register()

    def _register(self) -> None:
        self.app.register_task(TASK)(three_steps_async)
        self.app.register_task(WAITER)(waiter_async(self.suspending, self.resumed))

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.submit(self.app.close()).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def build_sync_app(url: str) -> Absurd:
    app = Absurd(url)

    app.register_task(TASK)(three_steps)

    return app


def completed_count(app: Absurd, queue: str) -> int:
    with app.engine.connect() as conn:
        query = (
            select(func.count())
            .select_from(tasks)
            .where(tasks.c.queue_name == queue, tasks.c.state == "completed")
        )
        return int(conn.scalar(query) or 0)


def run_worker(
    kind: str, concurrency: int, queue: str, sync_app: Absurd, async_side: AsyncSide
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Start a worker on ``queue``; return (stop, join)."""
    kwargs = {"concurrency": concurrency, "poll_interval": 0.05, "queue": queue}
    if kind == "async":
        future = async_side.submit(async_side.app.start_worker(**kwargs))
        return async_side.app.stop_worker, lambda: future.result(timeout=60)
    worker = threading.Thread(target=sync_app.start_worker, kwargs=kwargs, daemon=True)
    worker.start()

    def join() -> None:
        # stop_worker() reaches only a worker that has registered; repeat until it is gone.
        while worker.is_alive():
            sync_app.stop_worker()
            worker.join(timeout=0.05)

    return sync_app.stop_worker, join


def one_round(
    kind: str, concurrency: int, n: int, sync_app: Absurd, async_side: AsyncSide
) -> float:
    """Tasks/s for ``n`` three-step tasks through one worker of ``kind``."""
    queue = f"bench_{kind}_c{concurrency}_{uuid.uuid4().hex[:6]}"
    sync_app.create_queue(queue)
    sync_app.spawn_many([SpawnRequest(TASK, {"i": i}, queue=queue) for i in range(n)])
    began = time.perf_counter()
    stop, join = run_worker(kind, concurrency, queue, sync_app, async_side)
    deadline = time.monotonic() + 600
    try:
        while completed_count(sync_app, queue) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {completed_count(sync_app, queue)}/{n} after 600 s")
            time.sleep(0.01)  # polling the database count, the condition we time
        elapsed = time.perf_counter() - began
    finally:
        stop()
        join()
    sync_app.drop_queue(queue)  # every round starts from tables of the same size
    return n / elapsed


def wake_latencies(rounds: int, sync_app: Absurd, async_side: AsyncSide) -> list[float]:
    """Milliseconds from ``emit_event`` to the waiting task running again."""
    queue = f"bench_wake_{uuid.uuid4().hex[:6]}"
    sync_app.create_queue(queue)
    app = async_side.app
    worker = async_side.submit(
        app.start_worker(queue=queue, poll_interval=WAKE_POLL_INTERVAL, concurrency=4)
    )
    latencies = []
    try:
        for i in range(rounds):
            event = f"go:{queue}:{i}"
            spawned = sync_app.spawn(WAITER, {"event": event}, queue=queue)
            if not async_side.suspending.acquire(timeout=30):
                raise RuntimeError(f"task {spawned.task_id} never ran")
            deadline = time.monotonic() + 30
            while (snapshot := sync_app.fetch_task_result(spawned.task_id)) is None or (
                snapshot.state != "sleeping"
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {spawned.task_id} never suspended")
                time.sleep(0.001)  # the suspension commits just after the semaphore
            sent = time.perf_counter()
            sync_app.emit_event(event, {"i": i}, queue_name=queue)
            result = sync_app.await_task_result(spawned.task_id, timeout=30)
            if result.state != "completed":
                raise RuntimeError(f"task {spawned.task_id} ended {result.state}")
            latencies.append((async_side.resumed[event] - sent) * 1000)
    finally:
        app.stop_worker()
        worker.result(timeout=60)
    sync_app.drop_queue(queue)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per worker run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--wake-rounds", type=int, default=50, help="emits timed")
    args = parser.parse_args()

    with database_url() as url:
        migrate.upgrade(url)
        sync_app = build_sync_app(url)
        async_side = AsyncSide(url, pool=max(c for _, c in CONFIGS) + 2)
        try:
            with sync_app.engine.connect() as conn:
                server = conn.scalar(text("SHOW server_version"))
            print(f"PostgreSQL {server}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
            print(
                f"\nworker: {args.tasks} tasks x 3 steps per run, spawned with spawn_many first; "
                f"{args.rounds} interleaved rounds"
            )
            rates: dict[tuple[str, int], list[float]] = {config: [] for config in CONFIGS}
            for r in range(args.rounds):
                shift = r % len(CONFIGS)
                for kind, concurrency in CONFIGS[shift:] + CONFIGS[:shift]:
                    rate = one_round(kind, concurrency, args.tasks, sync_app, async_side)
                    rates[(kind, concurrency)].append(rate)
            print(f"  {'worker':<16} {'concurrency':>11} {'median':>9} {'min':>7} {'max':>7}")
            for (kind, concurrency), runs in rates.items():
                label = "AsyncAbsurd" if kind == "async" else "Absurd (threads)"
                print(
                    f"  {label:<16} {concurrency:>11} {statistics.median(runs):>9.0f} "
                    f"{min(runs):>7.0f} {max(runs):>7.0f}   tasks/s"
                )
            median = {config: statistics.median(runs) for config, runs in rates.items()}
            print(
                f"  async/sync at 1: {median[('async', 1)] / median[('sync', 1)]:.2f}x, "
                f"at 8: {median[('async', 8)] / median[('sync', 8)]:.2f}x; "
                f"async 32 / async 1: {median[('async', 32)] / median[('async', 1)]:.2f}x"
            )

            latencies = wake_latencies(args.wake_rounds, sync_app, async_side)
            p95 = statistics.quantiles(latencies, n=100, method="inclusive")[94]
            print(
                f"\nAsyncAbsurd wake-up, emit -> resumed task, {args.wake_rounds} rounds "
                f"(poll_interval {WAKE_POLL_INTERVAL}s):"
            )
            print(
                f"  p50 {statistics.median(latencies):.2f} ms, p95 {p95:.2f} ms, "
                f"max {max(latencies):.2f} ms"
            )
        finally:
            async_side.close()
            sync_app.close()


if __name__ == "__main__":
    main()
