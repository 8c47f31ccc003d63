"""absurd_sqla side by side with the original Absurd Python SDK, on one PostgreSQL.

    pip install -e '.[bench]'          # absurd-sdk==0.5.1 and absurdctl==0.5.1
    python bench/compare.py [--rounds 3] [--spawns 1000] [--tasks 1000] [--wake-rounds 20]
    python bench/compare.py --quick    # a 1-2 minute smoke run

One PostgreSQL server with DEFAULT durability (fsync on, full_page_writes on,
synchronous_commit on): a private cluster started here (``--url`` points at a
server of your own instead). absurd_sqla's tables live in the database
``absurd_ours`` (alembic, ``absurd_sqla.migrate``); the original's schema,
applied with ``absurdctl init`` (the ``absurd.sql`` bundled in absurdctl 0.5.1),
lives in ``absurd_original``; the commit floor writes to ``bench_floor``.

Each round runs every figure once for each system, one after the other
(original first in even rounds, ours first in odd ones), on a fresh queue per
run; the table shows the median of ``--rounds`` rounds and every ratio as
ours / original for rates, original / ours for latencies (> 1 = ours better).

* spawn/s: ``--spawns`` spawns, each committing on its own; then the same
  inside one transaction (ours: ``spawn(..., session=session)`` in one Session
  transaction; the original: its client on a psycopg connection we own, inside
  ``with conn.transaction():``).
* tasks/s: ``--tasks`` tasks of three checkpointed steps, spawned up front
  (untimed); one worker starts and the clock stops when a count of completed
  tasks in the database reaches the total. ``start_worker`` (threads) and the
  asyncio clients' ``start_worker``, each at concurrency 1, 8, 16 and 32; a
  ``work_batch(100)`` loop in the calling thread. ``poll_interval`` 0.05 s for both.
* wake-up: a task suspends in ``await_event``; the clock runs from the
  ``emit_event`` call (which commits) to the handler running again. Both sync
  workers at their default ``poll_interval`` (0.25 s): the original's worker
  finds the woken run at its next poll, ours is woken by LISTEN/NOTIFY. Each
  emit waits a random 0-0.25 s after the suspension first, so it falls at a
  random point of the poll cycle; emits alternate between the systems.
* client CPU: ``time.process_time()`` (this process, user + system) across
  the spawn runs and the ``work_batch`` loop, per spawn and per task; per
  statement is a task's CPU over the client statements counted per task.
* floor: one-row INSERT + COMMIT per transaction into a scratch table; a
  psycopg loop at one connection, and ``pgbench`` at 1 and 8 clients when the
  binary is found beside the server's.
* statements and commits per 3-step task (one ``work_batch`` of 100), counted
  at the client: SQLAlchemy's ``before_cursor_execute``/``commit`` events for
  ours, a counting psycopg cursor for the original (autocommit: one statement
  is one commit); and at the server, with pg_stat_statements (preloaded in the
  private cluster unless ``--no-pgss``): every top-level statement, BEGIN,
  COMMIT and ROLLBACK included, with a per-query breakdown under the table.
  The client count is also taken for ``start_worker`` at c=1 (the same
  number of tasks, its idle polls until it is stopped included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine, event, func, make_url, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from workload import three_steps, three_steps_async, waiter  # bench/ is on sys.path

from absurd_sqla import Absurd, AsyncAbsurd, SpawnRequest, discard_closed_connections, migrate
from absurd_sqla.localpg import LocalPostgres, find_bindir
from absurd_sqla.models import tasks

try:
    import absurd_sdk as orig
except ImportError:  # pragma: no cover - told to the user below
    sys.exit("bench/compare.py needs the original SDK: pip install -e '.[bench]'")

TASK = "three-steps"
WAITER = "waiter"
THROUGHPUT_POLL = 0.05
WAKE_POLL = 0.25  # both SDKs' default poll_interval
# An emit comes at a random moment of the poller's cycle, not right after the
# suspension (which would land it just after an empty claim: a full interval).
PHASE = random.Random(20261203)
BATCH = 100
CONCURRENCY = (1, 8, 16, 32)  # of each worker, the thread one and the asyncio one
COUNT_TASKS = 100
DEADLINE = 600.0
T = TypeVar("T")


# -- the server ----------------------------------------------------------------


@contextlib.contextmanager
def server(url: str | None, pgss: bool) -> Iterator[tuple[str, Path | None]]:
    """(URL of the ``postgres`` database, the bindir if we started the server)."""
    if url:
        yield url, None
        return
    bindir = find_bindir()
    found = (bindir.parent / "lib" / "pg_stat_statements.so").exists()
    # PostgreSQL's own durability, not localpg's throwaway fsync=off.
    settings = {"fsync": "on", "full_page_writes": "on"}
    if pgss and found:
        settings["shared_preload_libraries"] = "pg_stat_statements"
    local = LocalPostgres(settings=settings)
    try:
        yield local.start(), local.bindir
    finally:
        local.stop()


def database(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def install_original_schema(url: str) -> str:
    """Apply absurdctl's bundled absurd.sql the way ``absurdctl init`` does."""
    if shutil.which("absurdctl") and shutil.which("psql"):
        subprocess.run(["absurdctl", "init", "-d", url], check=True, capture_output=True)
        how = "absurdctl init"
    else:  # no psql on PATH: the same SQL text, sent by psycopg
        import absurdctl

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(absurdctl.BUNDLED_SCHEMA_SQL)
        how = "absurdctl.BUNDLED_SCHEMA_SQL via psycopg"
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT absurd.get_schema_version()").fetchone()
    return f"{how}, schema {row[0] if row else '?'}"


# -- an event loop in a thread, for both asyncio clients ------------------------


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def wait_until(done: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(
            0.02
        )  # polling the database, the condition we time (every 5 ms cost both sides CPU)


def new_queue(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@dataclass
class Running:
    """A started worker: ``stop`` asks it to finish, ``join`` waits until it has."""

    stop: Callable[[], None]
    join: Callable[[], None]


# -- the two systems -------------------------------------------------------------


class Side:
    """What a figure needs from a system; ``None`` from a method = not possible."""

    name: str

    def spawn_each(self, n: int) -> Timing:
        raise NotImplementedError

    def spawn_one_transaction(self, n: int) -> Timing:
        raise NotImplementedError

    def worker(self, kind: str, concurrency: int, n: int) -> float | None:
        raise NotImplementedError

    def batch_loop(self, n: int) -> Timing:
        raise NotImplementedError

    def start_waiter_worker(self) -> None:
        raise NotImplementedError

    def wake_once(self, i: int) -> float:
        raise NotImplementedError

    def stop_waiter_worker(self) -> None:
        raise NotImplementedError

    def counts_per_task(
        self, n: int, counter: ServerCounter | None, *, worker: bool = False
    ) -> Counts:
        """Statements and commits per task of ``n`` tasks run by one
        ``work_batch(n)``, or with ``worker`` by ``start_worker`` at c=1 (its
        idle polls until it is stopped included)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ServerCounter:
    """Top-level statements per database, from pg_stat_statements: what reached
    the server, BEGIN / COMMIT / ROLLBACK included (the client hooks miss those)."""

    def __init__(self, admin_url: str) -> None:
        self.conn = psycopg.connect(admin_url, autocommit=True)
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    @classmethod
    def connect(cls, admin_url: str) -> ServerCounter | None:
        try:
            return cls(admin_url)
        except psycopg.Error:  # not in shared_preload_libraries
            return None

    def reset(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset()")

    def read(self, db_url: str) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
            (make_url(db_url).database,),
        ).fetchall()
        calls: dict[str, int] = {}
        for query, n in rows:
            key = " ".join(str(query).split())
            calls[key] = calls.get(key, 0) + int(n)
        return calls

    def close(self) -> None:
        self.conn.close()


@dataclass
class Counts:
    """Per 3-step task: statements and commits seen by the client, and the
    server's top-level statements by query text (None without pg_stat_statements)."""

    statements: float
    commits: float
    server: dict[str, float] | None


# pg_stat_statements (track=top) also counts a SQL function's body that the
# planner evaluates while estimating (exec_nested_level is still 0 then): our
# absurd.now() is STABLE, so `... <= absurd.now()` shows up as a "top-level"
# statement that no client sent. Such rows are listed apart, not summed.
PLANNER_EVALUATED = ("SELECT coalesce(nullif(current_setting(",)


def server_side(counter: ServerCounter | None, url: str, n: int) -> dict[str, float] | None:
    if counter is None:
        return None
    return {query: calls / n for query, calls in counter.read(url).items()}


def planner_evaluated(query: str) -> bool:
    return query.startswith(PLANNER_EVALUATED)


@dataclass
class Timing:
    """A timed run: items per second, and the client's CPU per item (this
    process, user + system: Python, the driver and its system calls)."""

    rate: float
    cpu_ms: float


def timed(n: int, fn: Callable[[], None]) -> Timing:
    began, cpu = time.perf_counter(), time.process_time()
    fn()
    elapsed, used = time.perf_counter() - began, time.process_time() - cpu
    return Timing(n / elapsed, used * 1000 / n)


class CountingCursor(psycopg.Cursor[Any]):
    """Counts every statement the original SDK sends (it uses ``cursor().execute``)."""

    executed = 0

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        CountingCursor.executed += 1
        return super().execute(query, params, **kwargs)


class Original(Side):
    """absurd-sdk 0.5.1: one client per queue (its queue is fixed at construction),
    each on a psycopg connection of its own in autocommit, shared by its threads."""

    name = "original"

    def __init__(self, url: str, loop: LoopThread) -> None:
        self.url = url
        self.loop = loop
        self.admin = psycopg.connect(url, autocommit=True)
        self.resumed: dict[str, float] = {}
        self.suspending = threading.Semaphore(0)
        self._waiter: tuple[orig.Absurd, psycopg.Connection[Any], str, Running] | None = None

    def client(self, queue: str, *, counting: bool = False) -> orig.Absurd:
        conn = psycopg.connect(
            self.url, autocommit=True, cursor_factory=CountingCursor if counting else None
        )
        app = orig.Absurd(conn, queue_name=queue)
        app.register_task(TASK)(three_steps)
        app.register_task(WAITER)(waiter(self.suspending, self.resumed))
        return app

    @staticmethod
    def conn(app: orig.Absurd) -> psycopg.Connection[Any]:
        return app._conn  # the connection we passed in

    def fresh(self, prefix: str) -> tuple[orig.Absurd, str]:
        queue = new_queue(prefix)
        app = self.client(queue)
        app.create_queue()
        return app, queue

    def drop(self, app: orig.Absurd, queue: str) -> None:
        app.drop_queue(queue)
        self.conn(app).close()

    def prespawn(self, app: orig.Absurd, n: int) -> None:
        with self.conn(app).transaction():
            for i in range(n):
                app.spawn(TASK, {"i": i})

    def completed(self, queue: str) -> int:
        query = sql.SQL("SELECT count(*) FROM absurd.{} WHERE state = 'completed'").format(
            sql.Identifier(f"t_{queue}")
        )
        row = self.admin.execute(query).fetchone()
        return int(row[0]) if row else 0

    def spawn_each(self, n: int) -> Timing:
        app, queue = self.fresh("o_spawn")
        app.spawn(TASK, {"i": -1})  # warm up

        def run() -> None:
            for i in range(n):
                app.spawn(TASK, {"i": i})

        timing = timed(n, run)
        self.drop(app, queue)
        return timing

    def spawn_one_transaction(self, n: int) -> Timing:
        app, queue = self.fresh("o_spawntx")
        app.spawn(TASK, {"i": -1})
        timing = timed(n, lambda: self.prespawn(app, n))
        self.drop(app, queue)
        return timing

    def worker(self, kind: str, concurrency: int, n: int) -> float:
        app, queue = self.fresh(f"o_{kind}{concurrency}")
        self.prespawn(app, n)
        began = time.perf_counter()
        if kind == "sync":
            running = self._start_sync(app, concurrency, THROUGHPUT_POLL)
        else:
            running = self._start_async(queue, concurrency)
        try:
            wait_until(lambda: self.completed(queue) >= n, f"original {kind} c={concurrency}")
            elapsed = time.perf_counter() - began
        finally:
            running.stop()
            running.join()
        self.drop(app, queue)
        return n / elapsed

    @staticmethod
    def _start_sync(app: orig.Absurd, concurrency: int, poll: float) -> Running:
        thread = threading.Thread(
            target=app.start_worker,
            kwargs={"concurrency": concurrency, "poll_interval": poll, "worker_id": "bench"},
            daemon=True,
        )
        thread.start()
        return Running(app.stop_worker, thread.join)

    def _start_async(self, queue: str, concurrency: int) -> Running:
        app = orig.AsyncAbsurd(self.url, queue_name=queue)
        app.register_task(TASK)(three_steps_async)

        future = self.loop.submit(
            app.start_worker(
                concurrency=concurrency, poll_interval=THROUGHPUT_POLL, worker_id="bench"
            )
        )

        def join() -> None:
            future.result(timeout=60)
            self.loop.submit(app.close()).result(timeout=60)

        return Running(app.stop_worker, join)

    def batch_loop(self, n: int) -> Timing:
        app, queue = self.fresh("o_batch")
        self.prespawn(app, n)
        deadline = time.monotonic() + DEADLINE

        def run() -> None:
            while self.completed(queue) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("original work_batch loop: not done")
                app.work_batch(worker_id="bench", batch_size=BATCH)

        timing = timed(n, run)
        self.drop(app, queue)
        return timing

    def start_waiter_worker(self) -> None:
        app, queue = self.fresh("o_wake")
        emitter = psycopg.connect(self.url, autocommit=True)
        running = self._start_sync(app, 1, WAKE_POLL)
        self._waiter = (app, emitter, queue, running)

    def wake_once(self, i: int) -> float:
        assert self._waiter is not None
        _, emitter_conn, queue, _ = self._waiter
        emitter = orig.Absurd(emitter_conn, queue_name=queue)
        event_name = f"go:{queue}:{i}"
        spawned = emitter.spawn(WAITER, {"event": event_name}, queue=queue)
        if not self.suspending.acquire(timeout=30):
            raise RuntimeError("original: the waiter never ran")

        def sleeping() -> bool:
            snapshot = emitter.fetch_task_result(str(spawned["task_id"]))
            return snapshot is not None and snapshot.state == "sleeping"

        wait_until(sleeping, "original: the waiter never suspended", 30)
        time.sleep(PHASE.uniform(0, WAKE_POLL))
        sent = time.perf_counter()
        emitter.emit_event(event_name, {"i": i})
        wait_until(lambda: event_name in self.resumed, "original: never resumed", 30)
        return (self.resumed[event_name] - sent) * 1000

    def stop_waiter_worker(self) -> None:
        if self._waiter is not None:
            app, emitter, queue, running = self._waiter
            running.stop()
            running.join()
            emitter.close()
            self.drop(app, queue)
            self._waiter = None

    def counts_per_task(
        self, n: int, counter: ServerCounter | None, *, worker: bool = False
    ) -> Counts:
        queue = new_queue("o_count")
        app = self.client(queue, counting=True)
        app.create_queue()
        self.prespawn(app, n)
        CountingCursor.executed = 0
        if counter is not None:
            counter.reset()
        if worker:
            running = self._start_sync(app, 1, THROUGHPUT_POLL)
            try:
                wait_until(lambda: self.completed(queue) >= n, "original: counted worker")
            finally:
                running.stop()
                running.join()
        else:
            app.work_batch(worker_id="bench", batch_size=n)
        statements = CountingCursor.executed / n
        server = server_side(counter, self.url, n)
        if self.completed(queue) != n:
            raise RuntimeError("original: the counted batch did not complete every task")
        self.drop(app, queue)
        # Autocommit: each statement is a transaction of its own.
        return Counts(statements, statements, server)

    def close(self) -> None:
        self.stop_waiter_worker()
        self.admin.close()


class Ours(Side):
    """absurd_sqla: one client (an engine with room for 16 threads) and one
    AsyncAbsurd (room for 32 tasks); a fresh queue per run."""

    name = "ours"

    def __init__(self, url: str, loop: LoopThread) -> None:
        self.url = url
        self.loop = loop
        self.engine = create_engine(
            make_url(url).set(drivername="postgresql+psycopg"), pool_size=20, max_overflow=10
        )
        discard_closed_connections(self.engine)  # as an engine made from a URL has
        self.app = Absurd(self.engine)
        self.resumed: dict[str, float] = {}
        self.suspending = threading.Semaphore(0)
        async_engine = create_async_engine(
            make_url(url).set(drivername="postgresql+psycopg_async"),
            pool_size=34,
            max_overflow=10,
        )
        discard_closed_connections(async_engine)
        self.async_app = AsyncAbsurd(async_engine)
        self._register()
        self._waiter: tuple[str, Running] | None = None

    def _register(self) -> None:
        self.app.register_task(TASK)(three_steps)
        self.app.register_task(WAITER)(waiter(self.suspending, self.resumed))
        self.async_app.register_task(TASK)(three_steps_async)

    def fresh(self, prefix: str) -> str:
        queue = new_queue(prefix)
        self.app.create_queue(queue)
        return queue

    def prespawn(self, queue: str, n: int) -> None:
        self.app.spawn_many([SpawnRequest(TASK, {"i": i}, queue=queue) for i in range(n)])

    def completed(self, queue: str) -> int:
        query = (
            select(func.count())
            .select_from(tasks)
            .where(tasks.c.queue_name == queue, tasks.c.state == "completed")
        )
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def spawn_each(self, n: int) -> Timing:
        queue = self.fresh("s_spawn")
        self.app.spawn(TASK, {"i": -1}, queue=queue)  # warm up

        def run() -> None:
            for i in range(n):
                self.app.spawn(TASK, {"i": i}, queue=queue)

        timing = timed(n, run)
        self.app.drop_queue(queue)
        return timing

    def spawn_one_transaction(self, n: int) -> Timing:
        queue = self.fresh("s_spawntx")
        self.app.spawn(TASK, {"i": -1}, queue=queue)

        def run() -> None:
            with Session(self.engine) as session, session.begin():
                for i in range(n):
                    self.app.spawn(TASK, {"i": i}, queue=queue, session=session)

        timing = timed(n, run)
        self.app.drop_queue(queue)
        return timing

    def worker(self, kind: str, concurrency: int, n: int) -> float:
        queue = self.fresh(f"s_{kind}{concurrency}")
        self.prespawn(queue, n)
        began = time.perf_counter()
        running = self._start(kind, concurrency, queue, THROUGHPUT_POLL)
        try:
            wait_until(lambda: self.completed(queue) >= n, f"ours {kind} c={concurrency}")
            elapsed = time.perf_counter() - began
        finally:
            running.stop()
            running.join()
        self.app.drop_queue(queue)
        return n / elapsed

    def _start(self, kind: str, concurrency: int, queue: str, poll: float) -> Running:
        kwargs: dict[str, Any] = {
            "concurrency": concurrency,
            "poll_interval": poll,
            "queue": queue,
            "worker_id": "bench",
            "handle_signals": False,
        }
        if kind == "async":
            future = self.loop.submit(self.async_app.start_worker(**kwargs))
            return Running(self.async_app.stop_worker, lambda: future.result(timeout=60))
        thread = threading.Thread(target=self.app.start_worker, kwargs=kwargs, daemon=True)
        thread.start()
        return Running(self.app.stop_worker, thread.join)

    def batch_loop(self, n: int) -> Timing:
        queue = self.fresh("s_batch")
        self.prespawn(queue, n)
        deadline = time.monotonic() + DEADLINE

        def run() -> None:
            while self.completed(queue) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("ours work_batch loop: not done")
                self.app.work_batch(worker_id="bench", batch_size=BATCH, queue=queue)

        timing = timed(n, run)
        self.app.drop_queue(queue)
        return timing

    def start_waiter_worker(self) -> None:
        queue = self.fresh("s_wake")
        self._waiter = (queue, self._start("sync", 1, queue, WAKE_POLL))

    def wake_once(self, i: int) -> float:
        assert self._waiter is not None
        queue, _ = self._waiter
        event_name = f"go:{queue}:{i}"
        spawned = self.app.spawn(WAITER, {"event": event_name}, queue=queue)
        if not self.suspending.acquire(timeout=30):
            raise RuntimeError("ours: the waiter never ran")

        def sleeping() -> bool:
            snapshot = self.app.fetch_task_result(spawned.task_id)
            return snapshot is not None and snapshot.state == "sleeping"

        wait_until(sleeping, "ours: the waiter never suspended", 30)
        time.sleep(PHASE.uniform(0, WAKE_POLL))
        sent = time.perf_counter()
        self.app.emit_event(event_name, {"i": i}, queue_name=queue)
        wait_until(lambda: event_name in self.resumed, "ours: never resumed", 30)
        return (self.resumed[event_name] - sent) * 1000

    def stop_waiter_worker(self) -> None:
        if self._waiter is not None:
            queue, running = self._waiter
            running.stop()
            running.join()
            self.app.drop_queue(queue)
            self._waiter = None

    def counts_per_task(
        self, n: int, counter: ServerCounter | None, *, worker: bool = False
    ) -> Counts:
        queue = self.fresh("s_count")
        self.prespawn(queue, n)
        statements = 0
        commits = 0

        def on_statement(conn: Connection, *args: Any) -> None:
            nonlocal statements, commits
            statements += 1
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT" or (
                conn.get_isolation_level() == "AUTOCOMMIT"
            ):
                commits += 1

        def on_commit(conn: Connection) -> None:
            nonlocal commits
            commits += 1

        event.listen(Engine, "before_cursor_execute", on_statement)
        event.listen(Engine, "commit", on_commit)
        if counter is not None:
            counter.reset()
        try:
            if worker:
                running = self._start("sync", 1, queue, THROUGHPUT_POLL)
                try:
                    wait_until(lambda: self.completed(queue) >= n, "ours: counted worker")
                finally:
                    running.stop()
                    running.join()
                claimed = n
            else:
                claimed = self.app.work_batch(worker_id="bench", batch_size=n, queue=queue)
        finally:
            event.remove(Engine, "before_cursor_execute", on_statement)
            event.remove(Engine, "commit", on_commit)
        server = server_side(counter, self.url, n)
        if claimed != n or self.completed(queue) != n:
            raise RuntimeError("ours: the counted batch did not complete every task")
        self.app.drop_queue(queue)
        return Counts(statements / n, commits / n, server)

    def close(self) -> None:
        self.stop_waiter_worker()
        self.loop.submit(self.async_app.close()).result(timeout=60)
        self.app.close()
        self.engine.dispose()


# -- the commit floor -------------------------------------------------------------


class Floor:
    """One-row INSERT + COMMIT transactions into a scratch table."""

    def __init__(self, url: str, bindir: Path | None, seconds: float) -> None:
        self.url = url
        self.seconds = seconds
        self.pgbench = self._find_pgbench(bindir)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS floor (id bigserial PRIMARY KEY, v int)")
        self._dir = Path(tempfile.mkdtemp(prefix="absurd-bench-"))
        self.script = self._dir / "insert.sql"
        self.script.write_text("INSERT INTO floor (v) VALUES (1);\n")

    @staticmethod
    def _find_pgbench(bindir: Path | None) -> str | None:
        for candidate in [bindir, *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]:
            if candidate is not None and (candidate / "pgbench").exists():
                return str(candidate / "pgbench")
        return shutil.which("pgbench")

    def python_loop(self, n: int) -> float:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("INSERT INTO floor (v) VALUES (%s)", (0,))

            def run() -> None:
                for i in range(n):
                    conn.execute("INSERT INTO floor (v) VALUES (%s)", (i,))

            return timed(n, run).rate

    def pgbench_tps(self, clients: int) -> float | None:
        if self.pgbench is None:
            return None
        target = make_url(self.url)
        out = subprocess.run(
            [
                self.pgbench,
                "-n",
                "-f",
                str(self.script),
                "-c",
                str(clients),
                "-j",
                str(min(clients, os.cpu_count() or 1)),
                "-T",
                str(max(1, round(self.seconds))),
                "-h",
                str(target.host),
                "-p",
                str(target.port),
                "-U",
                str(target.username),
                str(target.database),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
        if found is None:
            raise RuntimeError(f"unexpected pgbench output:\n{out.stdout}")
        return float(found.group(1))

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


# -- figures and the table ----------------------------------------------------------


@dataclass
class Figure:
    label: str
    unit: str
    lower_is_better: bool = False
    original: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    original_na: str | None = None  # why the original has no figure
    ours_na: str | None = None

    def record(self, side: str, value: float | None) -> None:
        if value is not None:
            self.values(side).append(value)

    def values(self, side: str) -> list[float]:
        return self.original if side == "original" else self.ours


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    decimals = {"ms": 1, "count": 2, "ms CPU": 3}.get(unit, 0)
    return f"{value:.{decimals}f}"


def print_table(figures: list[Figure], floor: list[Figure], notes: list[str]) -> None:
    width = max(len(f.label) for f in [*figures, *floor]) + 2
    print(f"\n{'figure':<{width}}{'unit':<9}{'original':>10}{'ours':>10}{'ratio':>9}")
    print("-" * (width + 38))
    for fig in figures:
        o, s = median(fig.original), median(fig.ours)
        ratio = f"{o / s if fig.lower_is_better else s / o:.2f}x" if o and s else "-"
        print(
            f"{fig.label:<{width}}{fig.unit:<9}{cell(o, fig.unit):>10}"
            f"{cell(s, fig.unit):>10}{ratio:>9}"
        )
    print(f"\n{'floor (no task system, same server)':<{width}}{'unit':<9}{'median':>10}")
    print("-" * (width + 19))
    for fig in floor:
        print(f"{fig.label:<{width}}{fig.unit:<9}{cell(median(fig.ours), fig.unit):>10}")
    for fig in [*figures, *floor]:
        for side, why in (("original", fig.original_na), ("ours", fig.ours_na)):
            if why:
                notes.append(f"{fig.label}, {side}: n/a: {why}")
    print()
    for note in notes:
        print(f"  * {note}")


def print_breakdown(breakdown: dict[str, dict[str, float]], limit: int = 10) -> None:
    """What reached the server per 3-step task, most frequent first."""
    for side, calls in breakdown.items():
        print(f"\n{side}: server statements per 3-step task (pg_stat_statements)")
        ranked = sorted(calls.items(), key=lambda item: -item[1])
        for query, per_task in ranked[:limit]:
            shown = query if len(query) <= 90 else query[:87] + "..."
            aside = "  [absurd.now() evaluated by the planner: not sent, not summed]"
            print(f"  {per_task:6.2f}  {shown}{aside if planner_evaluated(query) else ''}")
        if len(ranked) > limit:
            rest = sum(per_task for _, per_task in ranked[limit:])
            print(f"  {rest:6.2f}  ({len(ranked) - limit} more)")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_figure(
    fig: Figure, sides: list[Side], r: int, measure: Callable[[Side], float | None]
) -> None:
    order = sides if r % 2 == 0 else sides[::-1]
    for side in order:
        value = measure(side)
        fig.record(side.name, value)
        shown = "n/a" if value is None else f"{value:.1f}"
        progress(f"  round {r + 1}: {fig.label} [{side.name}] {shown} {fig.unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--spawns", type=int, default=1000, help="spawns per spawn figure")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per worker figure")
    parser.add_argument("--wake-rounds", type=int, default=20, help="emits timed per system")
    parser.add_argument("--floor-seconds", type=float, default=5.0, help="pgbench -T")
    parser.add_argument("--url", help="an existing server (default: a private one, fsync on)")
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument(
        "--no-pgss", action="store_true", help="do not load pg_stat_statements (server counts)"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.spawns, args.tasks = 1, 200, 200
        args.wake_rounds, args.floor_seconds = 5, 2.0

    started = time.perf_counter()
    with server(args.url, not args.no_pgss) as (admin_url, bindir):
        ours_url = database(admin_url, "absurd_ours")
        original_url = database(admin_url, "absurd_original")
        floor_url = database(admin_url, "bench_floor")
        migrate.upgrade(ours_url)
        schema = install_original_schema(original_url)

        with psycopg.connect(admin_url) as conn:
            settings = {
                name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                for name in (
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "full_page_writes",
                    "wal_sync_method",
                    "shared_buffers",
                )
            }
        print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        print(
            f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}"
        )
        print(
            f"PostgreSQL {settings['server_version']}: fsync={settings['fsync']}, "
            f"synchronous_commit={settings['synchronous_commit']}, "
            f"full_page_writes={settings['full_page_writes']}, "
            f"wal_sync_method={settings['wal_sync_method']}, "
            f"shared_buffers={settings['shared_buffers']}"
        )
        print(
            f"original: absurd-sdk {importlib.metadata.version('absurd-sdk')} ({schema}); "
            f"ours: absurd_sqla {importlib.metadata.version('absurd_sqla')}"
        )
        print(
            f"--rounds {args.rounds} --spawns {args.spawns} --tasks {args.tasks} "
            f"--wake-rounds {args.wake_rounds} --floor-seconds {args.floor_seconds:g}"
        )

        loop = LoopThread()
        original = Original(original_url, loop)
        ours = Ours(ours_url, loop)
        floor = Floor(floor_url, bindir, args.floor_seconds)
        counter = None if args.no_pgss else ServerCounter.connect(admin_url)
        sides: list[Side] = [original, ours]
        try:
            breakdown: dict[str, dict[str, float]] = {}
            figures, floor_figures = run_all(args, sides, floor, counter, breakdown)
            notes = [
                "ratio: ours/original for rates, original/ours for latency; > 1 = ours better",
                "the original's sync client runs all its worker threads on one psycopg "
                "connection (its design); ours uses a pooled connection per slot",
            ]
            print_table(figures, floor_figures, notes)
            print_breakdown(breakdown)
        finally:
            ours.close()
            original.close()
            floor.close()
            loop.close()
            if counter is not None:
                counter.close()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def run_all(
    args: argparse.Namespace,
    sides: list[Side],
    floor: Floor,
    counter: ServerCounter | None,
    breakdown: dict[str, dict[str, float]],
) -> tuple[list[Figure], list[Figure]]:
    n_spawn, n_tasks = args.spawns, args.tasks
    spawn_each = Figure(f"spawn, own commit each (N={n_spawn})", "spawns/s")
    spawn_tx = Figure(f"spawn x N in one transaction (N={n_spawn})", "spawns/s")
    workers = [
        (kind, c, Figure(f"{label} c={c}, 3-step tasks (N={n_tasks})", "tasks/s"))
        for kind, label, c in [
            *(("sync", "start_worker", c) for c in CONCURRENCY),
            *(("async", "AsyncAbsurd.start_worker", c) for c in CONCURRENCY),
        ]
    ]
    batch = Figure(f"work_batch({BATCH}) loop, 3-step tasks (N={n_tasks})", "tasks/s")
    floor_py = Figure("INSERT+COMMIT, psycopg loop c=1", "tps")
    floor_pg1 = Figure("INSERT+COMMIT, pgbench c=1", "tps")
    floor_pg8 = Figure("INSERT+COMMIT, pgbench c=8", "tps")
    if floor.pgbench is None:
        floor_pg1.ours_na = floor_pg8.ours_na = "no pgbench binary found"

    cpu_spawn = Figure("client CPU per spawn, own commit each", "ms CPU", lower_is_better=True)
    cpu_spawn_tx = Figure("client CPU per spawn, one transaction", "ms CPU", lower_is_better=True)
    cpu_task = Figure(f"client CPU per 3-step task, work_batch({BATCH})", "ms CPU", True)

    def with_cpu(cpu: Figure, measure: Callable[[Side], Timing]) -> Callable[[Side], float]:
        """The rate of ``measure``, its CPU per item recorded in ``cpu``."""

        def rate(side: Side) -> float:
            got = measure(side)
            cpu.record(side.name, got.cpu_ms)
            return got.rate

        return rate

    def spawns(side: Side) -> Timing:
        return side.spawn_each(n_spawn)

    def spawns_tx(side: Side) -> Timing:
        return side.spawn_one_transaction(n_spawn)

    def batches(side: Side) -> Timing:
        return side.batch_loop(n_tasks)

    for r in range(args.rounds):
        run_figure(spawn_each, sides, r, with_cpu(cpu_spawn, spawns))
        run_figure(spawn_tx, sides, r, with_cpu(cpu_spawn_tx, spawns_tx))
        for kind, c, fig in workers:
            run_figure(fig, sides, r, lambda s, k=kind, c=c: s.worker(k, c, n_tasks))
        run_figure(batch, sides, r, with_cpu(cpu_task, batches))
        # The floor belongs to neither system (kept in Figure.ours, printed apart).
        floor_py.ours.append(floor.python_loop(n_spawn))
        for fig, clients in ((floor_pg1, 1), (floor_pg8, 8)):
            tps = floor.pgbench_tps(clients)
            if tps is not None:
                fig.ours.append(tps)
        progress(
            f"  round {r + 1}: floor psycopg c=1 {floor_py.ours[-1]:.0f} tps"
            + "".join(
                f", pgbench {fig.label[-3:]} {fig.ours[-1]:.0f}"
                for fig in (floor_pg1, floor_pg8)
                if fig.ours
            )
        )

    wake = Figure(f"emit_event -> resumed, p50 of {args.wake_rounds}", "ms", lower_is_better=True)
    wake_p95 = Figure(
        f"emit_event -> resumed, p95 of {args.wake_rounds}", "ms", lower_is_better=True
    )
    latencies: dict[str, list[float]] = {side.name: [] for side in sides}
    for side in sides:
        side.start_waiter_worker()
    try:
        for i in range(args.wake_rounds):
            for side in sides if i % 2 == 0 else sides[::-1]:
                latencies[side.name].append(side.wake_once(i))
    finally:
        for side in sides:
            side.stop_waiter_worker()
    for side in sides:
        values = latencies[side.name]
        wake.record(side.name, statistics.median(values))
        if len(values) >= 2:
            wake_p95.record(side.name, statistics.quantiles(values, n=100, method="inclusive")[94])
        progress(f"  wake-up [{side.name}]: p50 {statistics.median(values):.1f} ms")

    stmts = Figure(f"client statements per 3-step task (work_batch({COUNT_TASKS}))", "count", True)
    commits = Figure(f"commits per 3-step task (work_batch({COUNT_TASKS}))", "count", True)
    at_server = Figure("server statements per 3-step task, incl. BEGIN/COMMIT", "count", True)
    if counter is None:
        at_server.original_na = at_server.ours_na = "pg_stat_statements is not loaded"
    worker_stmts = Figure(
        f"client statements per 3-step task (start_worker c=1, {COUNT_TASKS} tasks)",
        "count",
        True,
    )
    for side in sides:
        counts = side.counts_per_task(COUNT_TASKS, counter)
        stmts.record(side.name, counts.statements)
        commits.record(side.name, counts.commits)
        worker_stmts.record(
            side.name, side.counts_per_task(COUNT_TASKS, None, worker=True).statements
        )
        if counts.server is not None:
            sent = [v for q, v in counts.server.items() if not planner_evaluated(q)]
            at_server.record(side.name, sum(sent))
            breakdown[side.name] = counts.server

    # Client CPU per statement on the worker's hot path: a task's CPU in the
    # work_batch loop over the statements the client sends per task.
    cpu_statement = Figure("client CPU per statement, work_batch", "ms CPU", True)
    for side in sides:
        per_task = median(cpu_task.values(side.name))
        per_statement = median(stmts.values(side.name))
        if per_task is not None and per_statement:
            cpu_statement.record(side.name, per_task / per_statement)

    return [
        spawn_each,
        spawn_tx,
        *(fig for _, _, fig in workers),
        batch,
        wake,
        wake_p95,
        stmts,
        commits,
        worker_stmts,
        at_server,
        cpu_spawn,
        cpu_spawn_tx,
        cpu_task,
        cpu_statement,
    ], [floor_py, floor_pg1, floor_pg8]


if __name__ == "__main__":
    main()
