"""A/B: the same worker throughput for two checkouts of absurd_sqla, alternating.

    python bench/ab.py OLD_CHECKOUT NEW_CHECKOUT [--tasks 1000] [--concurrency 1] [--rounds 6]

Each checkout (a directory holding ``absurd_sqla/`` and ``bench/``, e.g. made
with ``git worktree add /tmp/old <commit>``) gets its own database on one
private PostgreSQL with fsync on (and pg_stat_statements preloaded with
``--pgss``). Each round runs, in a fresh process per checkout, ``--tasks``
3-step tasks through ``start_worker`` (threads) and then through the asyncio
worker, both at ``--concurrency``; the order of the two checkouts alternates
from round to round. It prints tasks/s per round and the medians: on a noisy
machine only such interleaved figures tell a change from the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CHILD = "--child"


def child(checkout: str, url: str, n: int, concurrency: int) -> None:
    """Runs in the checkout's own process: prints ``thread <rate> async <rate>``."""
    sys.path[:0] = [checkout, str(Path(checkout) / "bench")]
    from sqlalchemy import func, select
    from workload import three_steps, three_steps_async

    import absurd_sqla
    from absurd_sqla import Absurd, AsyncAbsurd, SpawnRequest, migrate
    from absurd_sqla.models import tasks

    assert Path(absurd_sqla.__file__).is_relative_to(checkout), absurd_sqla.__file__
    migrate.upgrade(url)
    tag = str(time.time_ns())
    app = Absurd(url)
    app.register_task("t")(three_steps)

    def done(queue: str) -> int:
        query = select(func.count()).where(
            tasks.c.queue_name == queue, tasks.c.state == "completed"
        )
        with app.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def spawned(queue: str) -> None:
        app.create_queue(queue)
        app.spawn_many([SpawnRequest("t", {"i": i}, queue=queue) for i in range(n)])

    def until_done(queue: str, began: float) -> float:
        while done(queue) < n:
            time.sleep(0.005)  # polling the database count, the condition we time
        return n / (time.perf_counter() - began)

    queue = f"thread_{tag}"
    spawned(queue)
    kwargs = {"concurrency": concurrency, "poll_interval": 0.05, "queue": queue}
    worker = threading.Thread(target=app.start_worker, kwargs=kwargs, daemon=True)
    began = time.perf_counter()
    worker.start()
    threaded = until_done(queue, began)
    while worker.is_alive():
        app.stop_worker()
        worker.join(0.05)

    queue = f"async_{tag}"
    spawned(queue)

    async def run_async() -> float:
        async_app = AsyncAbsurd(url)
        async_app.register_task("t")(three_steps_async)
        began = time.perf_counter()
        running = asyncio.create_task(
            async_app.start_worker(concurrency=concurrency, poll_interval=0.05, queue=queue)
        )
        rate = await asyncio.to_thread(until_done, queue, began)
        async_app.stop_worker()
        await running
        await async_app.close()
        return rate

    asynchronous = asyncio.run(run_async())
    app.close()
    print(f"thread {threaded:.1f} async {asynchronous:.1f}")


def main() -> None:
    if sys.argv[1:2] == [CHILD]:
        checkout, url, n, concurrency = sys.argv[2:6]
        child(checkout, url, int(n), int(concurrency))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="checkout A (a directory with absurd_sqla/ and bench/)")
    parser.add_argument("new", help="checkout B")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pgss", action="store_true", help="preload pg_stat_statements")
    args = parser.parse_args()

    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    from absurd_sqla.localpg import LocalPostgres

    checkouts = {"A": os.path.abspath(args.old), "B": os.path.abspath(args.new)}
    settings = {"fsync": "on", "full_page_writes": "on"}
    if args.pgss:
        settings["shared_preload_libraries"] = "pg_stat_statements"
    rates: dict[tuple[str, str], list[float]] = {}
    with LocalPostgres(settings=settings) as url:
        admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        urls = {}
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in checkouts:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"ab_{name}")))
                urls[name] = make_url(url).set(database=f"ab_{name}")
        for round_ in range(args.rounds):
            order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
            for name in order:
                command = [
                    sys.executable,
                    __file__,
                    CHILD,
                    checkouts[name],
                    urls[name].render_as_string(hide_password=False),
                    str(args.tasks),
                    str(args.concurrency),
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                _, threaded, _, asynchronous = out.stdout.split()
                rates.setdefault((name, "thread"), []).append(float(threaded))
                rates.setdefault((name, "async"), []).append(float(asynchronous))
                print(f"round {round_ + 1} {name}: {out.stdout.strip()}", flush=True)
    print(f"\nmedians, tasks/s at c={args.concurrency} ({args.tasks} 3-step tasks, fsync on):")
    for kind in ("thread", "async"):
        a = statistics.median(rates[("A", kind)])
        b = statistics.median(rates[("B", kind)])
        print(f"  {kind:6} A {a:7.1f}   B {b:7.1f}   B/A {b / a:.2f}")


if __name__ == "__main__":
    main()
