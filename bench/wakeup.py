"""Wake-up latency in an idle worker: from calling ``emit_event`` (which
commits) to the waiting task running again, via LISTEN/NOTIFY (SPEC §6); and
from a ``sleep_for`` coming due to the task running again, via the worker's
timer (it wakes when the queue's next run comes due).

    python bench/wakeup.py [--rounds 50] [--sleep 0.2]

The worker polls only every 5 s, so any figure well below that is NOTIFY (or
the timer) at work. Uses ABSURD_DATABASE_URL if set, else a throwaway local
PostgreSQL.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from typing import Any

from workload import waiter  # bench/ is on sys.path when run

from absurd_sqla import Absurd, TaskContext, migrate
from absurd_sqla.localpg import database_url

POLL_INTERVAL = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds each napper sleeps")
    args = parser.parse_args()
    with database_url() as url:
        migrate.upgrade(url)
        app = Absurd(url)
        app.create_queue()
        resumed: dict[str, float] = {}
        suspended = threading.Semaphore(0)

        app.register_task("waiter")(waiter(suspended, resumed))

        slept: dict[str, float] = {}
        woke: dict[str, float] = {}

        @app.register_task("napper")
        def napper(params: dict[str, Any], ctx: TaskContext) -> None:
            slept.setdefault(params["tag"], time.perf_counter())  # the first run only
            ctx.sleep_for("nap", args.sleep)
            woke[params["tag"]] = time.perf_counter()

        worker = threading.Thread(
            target=app.start_worker, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True
        )
        worker.start()
        latencies = []
        run_tag = uuid.uuid4().hex[:8]
        for i in range(args.rounds):
            event = f"go:{run_tag}:{i}"  # fresh names: the database may be reused
            spawned = app.spawn("waiter", {"event": event})
            assert suspended.acquire(timeout=30)
            deadline = time.monotonic() + 30
            while (snapshot := app.fetch_task_result(spawned.task_id)) is None or (
                snapshot.state != "sleeping"
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {spawned.task_id} never suspended")
                time.sleep(0.001)  # the suspension commits just after the semaphore
            sent = time.perf_counter()
            app.emit_event(event, {"i": i})
            result = app.await_task_result(spawned.task_id, timeout=30)
            assert result.state == "completed"
            latencies.append((resumed[event] - sent) * 1000)
        naps = []
        for i in range(args.rounds):
            tag = f"nap:{run_tag}:{i}"
            spawned = app.spawn("napper", {"tag": tag})
            assert app.await_task_result(spawned.task_id, timeout=30).state == "completed"
            naps.append((woke[tag] - slept[tag] - args.sleep) * 1000)
        app.stop_worker()
        worker.join()
        app.close()
    naps.sort()
    print(f"sleep due -> resumed task, {args.rounds} rounds of sleep_for({args.sleep}):")
    print(
        f"  median {statistics.median(naps):.2f} ms, "
        f"p95 {naps[int(len(naps) * 0.95) - 1]:.2f} ms, max {naps[-1]:.2f} ms"
    )
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    print(f"emit -> resumed task, {args.rounds} rounds (poll_interval {POLL_INTERVAL}s):")
    median = statistics.median(latencies)
    print(f"  median {median:.2f} ms, p95 {p95:.2f} ms, max {latencies[-1]:.2f} ms")
    print(f"  median vs poll interval: {POLL_INTERVAL * 1000 / median:.0f}x faster")


if __name__ == "__main__":
    main()
