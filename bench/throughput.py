"""Throughput of absurd_sqla: tasks/s through a worker, spawns/s through the client.

    python bench/throughput.py [--tasks 2000] [--spawns 2000]

Uses ABSURD_DATABASE_URL if set, else a throwaway local PostgreSQL (fsync off).

* Worker: ``--tasks`` tasks of three checkpointed steps each, spawned up front with
  one ``spawn_many``; then a worker (``concurrency`` 1, then 8) runs in a thread and
  the clock stops when a count of completed tasks in the database reaches the total.
* Spawn: ``--spawns`` tasks via ``spawn`` (a transaction each), via ``spawn`` inside
  one Session transaction (one commit), and via one ``spawn_many`` call.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from workload import three_steps  # bench/ is on sys.path when run

from absurd_sqla import Absurd, SpawnRequest, migrate
from absurd_sqla.localpg import database_url
from absurd_sqla.models import tasks

TASK = "three-steps"


def build_app(url: str) -> Absurd:
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


def stop(app: Absurd, worker: threading.Thread) -> None:
    # stop_worker() reaches only a worker that has registered; repeat until it is gone.
    while worker.is_alive():
        app.stop_worker()
        worker.join(timeout=0.05)


def worker_throughput(app: Absurd, n: int, concurrency: int) -> float:
    """Tasks/s for ``n`` three-step tasks through one worker with ``concurrency`` slots."""
    queue = f"bench_c{concurrency}"
    app.create_queue(queue)
    app.spawn_many([SpawnRequest(TASK, {"i": i}, queue=queue) for i in range(n)])
    worker = threading.Thread(
        target=app.start_worker,
        kwargs={"concurrency": concurrency, "poll_interval": 0.05, "queue": queue},
        daemon=True,
    )
    began = time.perf_counter()
    worker.start()
    deadline = time.monotonic() + 600
    try:
        while completed_count(app, queue) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {completed_count(app, queue)}/{n} done after 600 s")
            time.sleep(0.01)  # polling the database count, the condition we time
        elapsed = time.perf_counter() - began
    finally:
        stop(app, worker)
    return n / elapsed


def timed(n: int, fn: Callable[[], None]) -> float:
    began = time.perf_counter()
    fn()
    return n / (time.perf_counter() - began)


def spawn_throughput(app: Absurd, n: int) -> dict[str, float]:
    queue = "bench_spawn"
    app.create_queue(queue)

    def each_own_transaction() -> None:
        for i in range(n):
            app.spawn(TASK, {"i": i}, queue=queue)

    def one_session() -> None:
        with Session(app.engine) as session, session.begin():
            for i in range(n):
                app.spawn(TASK, {"i": i}, queue=queue, session=session)

    def spawn_many() -> None:
        app.spawn_many([SpawnRequest(TASK, {"i": i}, queue=queue) for i in range(n)])

    app.spawn(TASK, {"i": -1}, queue=queue)  # warm the statement cache and the pool
    return {
        "spawn, own transaction each": timed(n, each_own_transaction),
        "spawn x N in one Session transaction": timed(n, one_session),
        "spawn_many, one call": timed(n, spawn_many),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per worker run")
    parser.add_argument("--spawns", type=int, default=2000, help="tasks per spawn variant")
    args = parser.parse_args()

    with database_url() as url:
        migrate.upgrade(url)
        app = build_app(url)
        with app.engine.connect() as conn:
            server = conn.scalar(text("SHOW server_version"))
        print(f"PostgreSQL {server}, Python {platform.python_version()}, {os.cpu_count()} CPUs")

        print(f"\nworker: {args.tasks} tasks x 3 steps, spawned with spawn_many first")
        rates = {c: worker_throughput(app, args.tasks, c) for c in (1, 8)}
        for c, rate in rates.items():
            print(f"  concurrency={c}: {rate:8.0f} tasks/s")
        print(f"  concurrency 8 / 1: {rates[8] / rates[1]:.2f}x")

        print(f"\nspawn: {args.spawns} tasks per variant")
        spawns = spawn_throughput(app, args.spawns)
        base = spawns["spawn, own transaction each"]
        for label, rate in spawns.items():
            print(f"  {label:<38} {rate:8.0f} spawns/s  ({rate / base:5.1f}x)")
        app.close()


if __name__ == "__main__":
    main()
