"""How fast the read-only inspection is on a database with many finished tasks.

    python bench/inspect_scale.py [--finished 1000000] [--repeat 5]

Uses ABSURD_DATABASE_URL if set, else a throwaway local PostgreSQL (fsync off).
Fills the database with ``--finished`` completed tasks (one run and one
checkpoint each, spread over the last 30 days, on two queues), a few thousand
failed, live and waiting ones, then times each inspection call (the median of
``--repeat``, warm cache) as the dashboard and the command line make them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from absurd_sqla import Absurd, SpawnRequest, migrate
from absurd_sqla.localpg import database_url

FILL = """
INSERT INTO absurd.tasks (task_id, queue_name, task_name, params, state, attempts,
    last_run_id, result, enqueued_at, first_started_at, finished_at)
SELECT uuid_send_v7(g), CASE WHEN g % 10 = 0 THEN 'emails' ELSE 'default' END,
       CASE WHEN g % 3 = 0 THEN 'charge' ELSE 'ship' END, '{}', :state, 1,
       uuid_send_v7(g + 100000000), '1', t, t, t + interval '50 ms'
FROM (SELECT g, now() - (g * interval '30 days' / :n) AS t
      FROM generate_series(:start, :start + :n - 1) g) s;
INSERT INTO absurd.runs (run_id, task_id, queue_name, attempt, state, available_at,
    started_at, finished_at, claimed_by)
SELECT last_run_id, task_id, queue_name, 1, state, enqueued_at, enqueued_at, finished_at, 'w-1'
FROM absurd.tasks WHERE state = :state AND last_run_id >= uuid_send_v7(:start + 100000000)
  AND last_run_id <= uuid_send_v7(:start + :n - 1 + 100000000);
"""

# A UUIDv7-shaped id from a number, ordered like the number (for the fill only).
UUID_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.uuid_send_v7(n bigint) RETURNS uuid LANGUAGE sql AS $$
  SELECT (lpad(to_hex(n), 12, '0') || '7000' || '8000' || '000000000000')::uuid $$
"""


def timed(call: Callable[[], Any], repeat: int) -> float:
    call()  # warm
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with database_url() as url:
        migrate.upgrade(url)
        app = Absurd(url)
        app.create_queue()
        app.create_queue("emails")
        start = time.perf_counter()
        with app.engine.begin() as conn:
            conn.execute(text(UUID_FUNCTION))
            fills = FILL.replace("uuid_send_v7", "pg_temp.uuid_send_v7").split(";")
            for state, n, first in (("completed", args.finished, 1), ("failed", 2000, 0)):
                begin = first or args.finished + 1
                for statement in filter(str.strip, fills):
                    conn.execute(text(statement), {"state": state, "n": n, "start": begin})
        app.register_task("live")(lambda params, ctx: ctx.await_event(f"go:{params['i']}"))
        app.spawn_many([SpawnRequest("live", {"i": i}) for i in range(2000)])
        app.work_batch("w", batch_size=500)  # 500 waiting, 1500 pending
        app.emit_event("go:1")
        with app.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        print(f"filled {args.finished} finished tasks in {time.perf_counter() - start:.0f} s")
        some = app.list_tasks(state="failed", limit=1)[0].task_id
        calls: dict[str, Callable[[], Any]] = {
            "list_tasks()": lambda: app.list_tasks(),
            "list_tasks(queue='emails')": lambda: app.list_tasks(queue="emails"),
            "list_tasks(state='failed')": lambda: app.list_tasks(state="failed"),
            "list_tasks(task_name='charge')": lambda: app.list_tasks(task_name="charge"),
            "list_tasks(page 100 of queue)": lambda: app.list_tasks(
                queue="default", after=app.list_tasks(queue="default", limit=1000)[-1].task_id
            ),
            "get_task(failed)": lambda: app.get_task(some),
            "queue_stats()": lambda: app.queue_stats(),
            "queue_throughput(60 min)": lambda: app.queue_throughput(),
            "list_events()": lambda: app.list_events(),
            "list_waits()": lambda: app.list_waits(),
        }
        print(f"{'call':34} {'ms (median of ' + str(args.repeat) + ')':>18}")
        for name, call in calls.items():
            print(f"{name:34} {timed(call, args.repeat):18.1f}")
        dashboard_pages(app, some, args.repeat)
        app.close()


def dashboard_pages(app: Absurd, task_id: Any, repeat: int) -> None:
    """The dashboard's pages, through Starlette's test client (the extra)."""
    try:
        from starlette.testclient import TestClient

        from absurd_sqla.dashboard import create_dashboard
    except ImportError:
        print("(dashboard pages skipped: pip install 'absurd_sqla[dashboard]')")
        return
    pages = {
        "GET / (overview)": "/",
        "GET /tasks": "/tasks",
        "GET /tasks?state=failed": "/tasks?state=failed",
        "GET /tasks?queue=emails&since=1h": "/tasks?queue=emails&since=1h",
        "GET /tasks/<failed task>": f"/tasks/{task_id}",
        "GET /queues": "/queues",
        "GET /events": "/events",
    }
    with TestClient(create_dashboard(app)) as client:
        for name, path in pages.items():

            def get(path: str = path) -> None:
                assert client.get(path).status_code == 200

            print(f"{name:34} {timed(get, repeat):18.1f}")


if __name__ == "__main__":
    main()
