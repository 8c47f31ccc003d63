"""Whether the worker's hot path stays flat as finished tasks pile up.

    python bench/history_scale.py [--small 10000] [--large 1000000] [--claims 200]

Uses ABSURD_DATABASE_URL if set, else a throwaway local PostgreSQL (fsync off).
The queue first holds ``--small`` finished tasks (one run each, as
``bench/inspect_scale.py`` fills them), then ``--large``. At each size it times

* the claim statement: ``--claims`` claims of one run each from a queue with
  pending work (the median, in ms, as the worker sends it);
* the idle worker's two queries: when the next run comes due, and the lease
  sweep (medians, ms);
* 1000 tasks of three checkpointed steps through ``start_worker`` at
  concurrency 8 (tasks/s; the clock stops when all are counted completed);

and prints each figure at both sizes with the ratio large / small (the
original's claim went from 11 ms to 258 ms over the same range).
"""

from __future__ import annotations

import argparse
import threading
import time

from inspect_scale import UUID_FUNCTION, timed  # bench/ is on sys.path when run
from sqlalchemy import func, select, text
from workload import three_steps

from absurd_sqla import Absurd, SpawnRequest, migrate
from absurd_sqla.localpg import database_url
from absurd_sqla.models import tasks

FILL = """
INSERT INTO absurd.tasks (task_id, queue_name, task_name, params, state, attempts,
    last_run_id, result, enqueued_at, first_started_at, finished_at)
SELECT pg_temp.uuid_send_v7(g), 'default', 'done', '{}', 'completed', 1,
       pg_temp.uuid_send_v7(g + 100000000), '1', t, t, t + interval '50 ms'
FROM (SELECT g, now() - (g * interval '30 days' / :n) AS t
      FROM generate_series(:start, :start + :n - 1) g) s;
INSERT INTO absurd.runs (run_id, task_id, queue_name, attempt, state, available_at,
    started_at, finished_at, claimed_by)
SELECT last_run_id, task_id, queue_name, 1, state, enqueued_at, enqueued_at, finished_at, 'w-1'
FROM absurd.tasks WHERE task_name = 'done'
  AND last_run_id >= pg_temp.uuid_send_v7(:start + 100000000)
  AND last_run_id <= pg_temp.uuid_send_v7(:start + :n - 1 + 100000000);
"""

TASKS = 1000


def fill(app: Absurd, start: int, n: int) -> None:
    with app.engine.begin() as conn:
        conn.execute(text(UUID_FUNCTION))
        for statement in filter(str.strip, FILL.split(";")):
            conn.execute(text(statement), {"n": n, "start": start})
    with app.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def completed(app: Absurd, name: str) -> int:
    with app.engine.connect() as conn:
        query = (
            select(func.count())
            .select_from(tasks)
            .where(tasks.c.task_name == name, tasks.c.state == "completed")
        )
        return int(conn.scalar(query) or 0)


def measure(app: Absurd, size: int, claims: int) -> dict[str, float]:
    executor = app._executor
    name = f"claimed-{size}"
    app.spawn_many([SpawnRequest(name, {}) for _ in range(claims + 1)])
    figures = {
        "claim 1 run, ms": timed(lambda: executor.claim("default", "bench", 600, 1), claims),
        "next due, ms": timed(lambda: executor.seconds_until_due("default"), 50),
        "lease sweep, ms": timed(lambda: executor.sweep_expired("default"), 50),
    }
    work = f"three-{size}"

    app.register_task(work)(three_steps)

    app.spawn_many([SpawnRequest(work, {"i": i}) for i in range(TASKS)])
    began = time.perf_counter()
    worker = threading.Thread(
        target=app.start_worker,
        kwargs={"concurrency": 8, "poll_interval": 0.05, "handle_signals": False},
        daemon=True,
    )
    worker.start()
    while completed(app, work) < TASKS:
        time.sleep(0.02)  # polling the condition we time
    figures["3-step tasks/s, c=8"] = TASKS / (time.perf_counter() - began)
    while worker.is_alive():
        app.stop_worker()
        worker.join(timeout=0.05)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--claims", type=int, default=200)
    args = parser.parse_args()
    with database_url() as url:
        migrate.upgrade(url)
        app = Absurd(url)
        app.create_queue()
        began = time.perf_counter()
        fill(app, 1, args.small)
        small = measure(app, args.small, args.claims)
        fill(app, args.small + 1, args.large - args.small)
        print(f"filled {args.large} finished tasks in {time.perf_counter() - began:.0f} s")
        large = measure(app, args.large, args.claims)
        app.close()
    print(f"\n{'figure':24}{args.small:>12,}{args.large:>12,}{'large/small':>13}")
    for key in small:
        print(f"{key:24}{small[key]:12.2f}{large[key]:12.2f}{large[key] / small[key]:12.2f}x")


if __name__ == "__main__":
    main()
