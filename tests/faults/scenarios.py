"""The fault scenarios, each a function of its size: the tests run them small,
``bench/faults.py`` at full size. Each returns a :class:`Result`: the
invariants' :class:`~tests.faults.invariants.Findings` plus what the scenario
measured. None of them asserts; the caller does (``result.findings.assert_ok()``).

Every wait has a deadline (``harness.poll``). Random fault timing comes from a
seeded ``random.Random`` so a failing run can be replayed with its seed.
"""

from __future__ import annotations

import queue
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from absurd_sqla import Absurd, SpawnRequest
from absurd_sqla.errors import TaskSignal
from tests.faults import invariants, tasks
from tests.faults.harness import (
    FaultCluster,
    WorkerFleet,
    poll,
    terminate,
    with_application_name,
    worker_backends,
)
from tests.faults.invariants import Findings

# Chaos costs attempts on purpose (a SIGKILL fails every run its worker held), so
# the load scenarios give tasks room; "completed" is still what is asserted.
CHAOS_MAX_ATTEMPTS = 25
STOP_TIMEOUT = 15.0  # a worker must exit this soon after SIGTERM


@dataclass
class Result:
    scenario: str
    tasks: int
    findings: Findings
    faults: int = 0  # kills, restarts, terminations or cancels injected
    recover_seconds: float | None = None  # last fault -> every task settled (None: never)
    elapsed: float = 0.0
    measured: dict[str, Any] = field(default_factory=dict)
    worker_logs: str = ""

    def describe(self) -> str:
        return (
            f"{self.scenario}: {self.tasks} tasks, {self.faults} faults, "
            f"recovered in {self.recover_seconds}, findings {self.findings}, "
            f"measured {self.measured}\n{self.worker_logs[-6000:]}"
        )


@contextmanager
def _database(cluster: FaultCluster) -> Iterator[tuple[str, Engine, int]]:
    """A fresh database, an engine on it, and the server-log offset at the start."""
    url = cluster.new_database()
    engine = create_engine(url, pool_pre_ping=True)
    try:
        yield url, engine, cluster.log_offset()
    finally:
        engine.dispose()


def _spawn_steps(app: Absurd, count: int, steps: int, work: float) -> list[uuid.UUID]:
    requests = [
        SpawnRequest("steps", {"steps": steps, "work": work}, max_attempts=CHAOS_MAX_ATTEMPTS)
        for _ in range(count)
    ]
    ids: list[uuid.UUID] = []
    for start in range(0, count, 500):
        ids += [r.task_id for r in app.spawn_many(requests[start : start + 500])]
    return ids


def _settle(engine: Engine, total: int, timeout: float, last_fault: float) -> float | None:
    """Wait until ``total`` tasks are terminal; seconds since ``last_fault``, or None."""
    done = poll(lambda: invariants.settled_count(engine) >= total, timeout)
    return round(time.monotonic() - last_fault, 2) if done else None


def _finish(
    name: str,
    cluster: FaultCluster,
    engine: Engine,
    log_offset: int,
    *,
    spawned: int,
    faults: int,
    recover: float | None,
    started: float,
    fleet: WorkerFleet | None = None,
    allowed: tuple[str, ...] = ("completed",),
    measured: dict[str, Any] | None = None,
    extra: list[str] | None = None,
) -> Result:
    problems = list(extra or [])
    logs = ""
    if fleet is not None:
        stuck = fleet.stop(STOP_TIMEOUT)
        if stuck:
            problems.append(f"worker(s) {stuck} still running {STOP_TIMEOUT}s after SIGTERM")
        logs = fleet.logs()
    if recover is None:
        problems.append("the tasks did not settle before the deadline")
    findings = invariants.check(
        engine,
        spawned=spawned,
        deadlocks=cluster.deadlocks_since(log_offset),
        allowed=allowed,
    )
    findings.extra += problems
    return Result(
        name,
        spawned,
        findings,
        faults,
        recover,
        round(time.monotonic() - started, 2),
        measured or {},
        logs,
    )


# -- 1. worker processes SIGKILLed mid-step -------------------------------------------


def sigkill_workers(
    cluster: FaultCluster,
    *,
    tasks_count: int = 300,
    steps: int = 4,
    work: float = 0.02,
    workers: int = 3,
    concurrency: int = 4,
    claim_timeout: float = 3.0,
    kills: int = 10,
    kill_interval: tuple[float, float] = (0.5, 1.0),
    settle_timeout: float = 60.0,
    seed: int = 1,
) -> Result:
    """Worker processes under load, one SIGKILLed (and replaced) every
    ``kill_interval`` seconds, ``kills`` times; then the survivors finish."""
    rng = random.Random(seed)
    started = time.monotonic()
    with _database(cluster) as (url, engine, offset), tempfile.TemporaryDirectory() as logs:
        client = Absurd(engine)
        fleet = WorkerFleet(url, Path(logs), concurrency, claim_timeout).start(workers)
        try:
            total = len(_spawn_steps(client, tasks_count, steps, work))
            last_fault = time.monotonic()
            for _ in range(kills):
                # The fault schedule: the next kill is due after a random interval,
                # sooner if every task is already done (then there is nothing to hit).
                if poll(
                    lambda: invariants.settled_count(engine) >= total, rng.uniform(*kill_interval)
                ):
                    break
                fleet.kill_one(rng)
                last_fault = time.monotonic()
            recover = _settle(engine, total, settle_timeout, last_fault)
        except BaseException:
            fleet.stop(STOP_TIMEOUT)
            raise
        return _finish(
            "sigkill-workers",
            cluster,
            engine,
            offset,
            spawned=total,
            faults=fleet.killed,
            recover=recover,
            started=started,
            fleet=fleet,
        )


# -- 2. the server restarted (immediate) under load -----------------------------------


def restart_server(
    cluster: FaultCluster,
    *,
    tasks_count: int = 200,
    steps: int = 4,
    work: float = 0.02,
    workers: int = 2,
    concurrency: int = 4,
    claim_timeout: float = 3.0,
    restarts: int = 2,
    settle_timeout: float = 60.0,
) -> Result:
    """``pg_ctl restart -m immediate`` while workers run: after each
    1/(restarts+1) of the tasks has finished, the server crashes and comes back."""
    started = time.monotonic()
    with _database(cluster) as (url, engine, offset), tempfile.TemporaryDirectory() as logs:
        client = Absurd(engine)
        fleet = WorkerFleet(url, Path(logs), concurrency, claim_timeout).start(workers)
        done = 0
        try:
            total = len(_spawn_steps(client, tasks_count, steps, work))
            last_fault = time.monotonic()
            for n in range(1, restarts + 1):
                target = total * n // (restarts + 1)
                if not poll(lambda t=target: invariants.settled_count(engine) >= t, settle_timeout):
                    break
                cluster.pg.restart("immediate")
                done += 1
                last_fault = time.monotonic()
            recover = _settle(engine, total, settle_timeout, last_fault)
        except BaseException:
            fleet.stop(STOP_TIMEOUT)
            raise
        client.close()
        result = _finish(
            "restart-server",
            cluster,
            engine,
            offset,
            spawned=total,
            faults=done,
            recover=recover,
            started=started,
            fleet=fleet,
        )
        if done < restarts:
            result.findings.extra.append(f"only {done} of {restarts} restarts happened")
        return result


# -- 3. worker backends terminated mid-claim and mid-checkpoint -----------------------


def terminate_backends(
    cluster: FaultCluster,
    *,
    tasks_count: int = 200,
    steps: int = 4,
    work: float = 0.01,
    workers: int = 2,
    concurrency: int = 4,
    claim_timeout: float = 3.0,
    terminations: int = 40,
    interval: tuple[float, float] = (0.05, 0.15),
    settle_timeout: float = 60.0,
    seed: int = 3,
) -> Result:
    """``pg_terminate_backend`` on the workers' connections (found by their
    application_name) in a loop: busy ones first (active or in a transaction:
    mid-claim, mid-checkpoint), else any (an idle pooled connection)."""
    rng = random.Random(seed)
    started = time.monotonic()
    hit: Counter[str] = Counter()
    with _database(cluster) as (url, engine, offset), tempfile.TemporaryDirectory() as logs:
        client = Absurd(engine)
        fleet = WorkerFleet(url, Path(logs), concurrency, claim_timeout).start(workers)
        try:
            total = len(_spawn_steps(client, tasks_count, steps, work))
            last_fault = time.monotonic()
            while sum(hit.values()) < terminations:
                if poll(lambda: invariants.settled_count(engine) >= total, rng.uniform(*interval)):
                    break
                backends = worker_backends(engine)
                busy = [b for b in backends if b[1] in ("active", "idle in transaction")]
                pool = busy or backends
                if not pool:
                    continue
                pid, state, query = rng.choice(pool)
                if terminate(engine, [pid]):
                    hit[_kind(state, query)] += 1
                    last_fault = time.monotonic()
            recover = _settle(engine, total, settle_timeout, last_fault)
        except BaseException:
            fleet.stop(STOP_TIMEOUT)
            raise
        return _finish(
            "terminate-backends",
            cluster,
            engine,
            offset,
            spawned=total,
            faults=sum(hit.values()),
            recover=recover,
            started=started,
            fleet=fleet,
            measured={"terminated": dict(hit)},
        )


def _kind(state: str, query: str) -> str:
    """What a terminated backend was doing, from pg_stat_activity."""
    if state not in ("active", "idle in transaction"):
        return "idle"
    if "SKIP LOCKED" in query:
        return "claim"
    if "checkpoints" in query or "fault_effects" in query:
        return "checkpoint"
    return "other-busy"


# -- 4. cancel racing complete / fail / retry / checkpoint -----------------------------

RACES = ("complete", "checkpoint", "fail", "retried-complete", "retry-wait", "pending")


def cancel_races(
    cluster: FaultCluster,
    *,
    rounds: int = 30,
    concurrency: int = 8,
    cancellers: int = 8,
    settle_timeout: float = 60.0,
) -> Result:
    """Per round, one task per race in ``RACES`` plus one left alone. A raced
    handler meets a canceller at a Barrier at its race point, then both go:

    * complete: the handler returns (complete_run) while cancel_task runs;
    * checkpoint: the handler writes its next checkpoint while cancel_task runs;
    * fail: attempt 1 raises (fail_run inserts attempt 2) while cancel_task runs;
    * retried-complete: attempt 1 fails; attempt 2 completes while cancel_task runs;
    * retry-wait: attempt 1 raises with a one-hour retry delay while cancel_task runs;
    * pending: cancel_task races the claim (no barrier).

    Checked besides the invariants: cancel_task never raises; it returns True
    exactly when the task ends cancelled (False: it had completed); the "alone"
    tasks and the retry-wait ones end completed / cancelled respectively.
    ``measured["lease_lost"]`` counts handlers stopped with LeaseLost (leases
    are 60 s, so only a cancel can have fenced them: it should be CancelledTask).
    """
    started = time.monotonic()
    tasks.RACE_ATTEMPT.clear()
    _drain(tasks.MEETINGS)
    signals: dict[str, list[str]] = {}
    signals_lock = threading.Lock()

    def wrap(ctx: Any, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except TaskSignal as sig:
            with signals_lock:
                signals.setdefault(str(ctx.task_id), []).append(f"{type(sig).__name__}:{sig}")
            raise

    with _database(cluster) as (url, engine, offset):
        app = tasks.build_app(url, wrap_task=wrap)
        kinds: dict[str, str] = {}
        requests: list[SpawnRequest] = []
        plan = [*RACES, "alone"] * rounds
        for race in plan:
            params: dict[str, Any] = {"steps": 3}
            retry: dict[str, Any] | None = None
            if race in ("fail", "retried-complete", "retry-wait"):
                params["fail_until"] = 2
            if race == "retry-wait":
                retry = {"kind": "fixed", "base_seconds": 3600}
            if race in ("complete", "retried-complete"):
                params["race"] = "complete"
            if race == "checkpoint":
                params["race"] = "checkpoint"
            requests.append(SpawnRequest("steps", params, max_attempts=3, retry_strategy=retry))
        spawned = [r.task_id for r in app.spawn_many(requests)]
        pending: list[str] = []
        for task_id, race in zip(spawned, plan, strict=True):
            kinds[str(task_id)] = race
            if race == "retried-complete":
                tasks.RACE_ATTEMPT[str(task_id)] = 2
            elif race == "pending":
                pending.append(str(task_id))
            elif race != "alone":
                tasks.RACE_ATTEMPT[str(task_id)] = 1
        raced = len(tasks.RACE_ATTEMPT) + len(pending)
        outcomes: dict[str, Any] = {}  # task id -> cancel_task's return value, or its error
        lock = threading.Lock()

        def cancel(task_id: str) -> None:
            try:
                value: Any = app.cancel_task(task_id)
            except Exception as exc:
                value = exc
            with lock:
                outcomes[task_id] = value

        def canceller() -> None:
            deadline = time.monotonic() + settle_timeout
            while time.monotonic() < deadline:
                with lock:
                    if len(outcomes) >= raced:
                        return
                try:
                    task_id, barrier = tasks.MEETINGS.get(timeout=0.1)
                except queue.Empty:
                    continue
                with suppress(threading.BrokenBarrierError):
                    barrier.wait(tasks.BARRIER_TIMEOUT)
                cancel(task_id)

        worker = threading.Thread(
            target=app.start_worker,
            kwargs={"worker_id": "racer", "claim_timeout": 60, "concurrency": concurrency},
            daemon=True,
        )
        with ThreadPoolExecutor(cancellers) as pool, ThreadPoolExecutor(2) as direct:
            futures = [pool.submit(canceller) for _ in range(cancellers)]
            worker.start()
            futures += [direct.submit(cancel, task_id) for task_id in pending]
            for future in futures:
                future.result(settle_timeout + 5)
        last_fault = time.monotonic()
        recover = _settle(engine, len(spawned), settle_timeout, last_fault)
        _stop_thread_worker(app, worker)
        tasks.RACE_ATTEMPT.clear()

        extra = _judge_cancels(engine, kinds, outcomes, raced, signals)
        if worker.is_alive():
            extra.append(f"the worker did not stop within {STOP_TIMEOUT}s of stop_worker()")
        app.close()
        return _finish(
            "cancel-races",
            cluster,
            engine,
            offset,
            spawned=len(spawned),
            faults=len(outcomes),
            recover=recover,
            started=started,
            allowed=("completed", "cancelled"),
            measured={
                "cancel_returned": dict(Counter(str(v) for v in outcomes.values())),
                # With 60 s leases only a cancel can fence a handler: it must see
                # CancelledTask, never LeaseLost (asserted by the caller).
                "lease_lost": lease_lost_by_kind(kinds, signals),
            },
            extra=extra,
        )


def _judge_cancels(
    engine: Engine,
    kinds: dict[str, str],
    outcomes: dict[str, Any],
    raced: int,
    signals: dict[str, list[str]],
) -> list[str]:
    with engine.connect() as conn:
        states = {
            str(k): v for k, v in conn.execute(text("SELECT task_id, state FROM absurd.tasks"))
        }
    problems = []
    if len(outcomes) != raced:
        problems.append(f"only {len(outcomes)} of {raced} cancels ran (a race point was missed)")
    for task_id, value in outcomes.items():
        state = states.get(task_id)
        if isinstance(value, Exception):
            problems.append(f"cancel_task({kinds[task_id]}) raised {value!r:.300}")
        elif value is True and state != "cancelled":
            problems.append(f"cancel_task({kinds[task_id]}) returned True, task is {state}")
        elif value is False and state != "completed":
            problems.append(f"cancel_task({kinds[task_id]}) returned False, task is {state}")
    for task_id, kind in kinds.items():
        if kind == "alone" and states.get(task_id) != "completed":
            problems.append(f"an uncancelled task ended {states.get(task_id)}")
        if kind == "retry-wait" and states.get(task_id) != "cancelled":
            problems.append(f"a task cancelled in its retry delay ended {states.get(task_id)}")
    return problems


def lease_lost_by_kind(kinds: dict[str, str], signals: dict[str, list[str]]) -> dict[str, int]:
    """Races whose handler was stopped with LeaseLost rather than CancelledTask."""
    lost = [t for t, seen in signals.items() if any(s.startswith("LeaseLost:") for s in seen)]
    return dict(Counter(kinds[t] for t in lost))


def _drain(q: queue.Queue[Any]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _stop_thread_worker(app: Absurd, worker: threading.Thread) -> None:
    """stop_worker() until the thread ends, for at most STOP_TIMEOUT seconds."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while worker.is_alive() and time.monotonic() < deadline:
        app.stop_worker()
        worker.join(0.05)


# -- 5. spawn(session=) ended without a commit ------------------------------------------

ABORTS = ("rollback", "exception", "killed-connection", "deferred-constraint")


class _Abort(Exception):
    pass


def spawn_in_session(
    cluster: FaultCluster,
    *,
    rounds: int = 25,
    concurrency: int = 4,
    settle_timeout: float = 60.0,
) -> Result:
    """While a worker runs, each round spawns with ``session=`` in transactions
    ended by: a rollback, an exception inside ``with session.begin()``, the
    session's backend terminated before COMMIT, a DEFERRABLE INITIALLY DEFERRED
    foreign key failing at COMMIT; and one committed spawn.

    Asserted besides the invariants: each aborted COMMIT raised what it should;
    no aborted task exists, and no handler ever started for one; each committed
    task's handler started exactly once.
    """
    started = time.monotonic()
    with _database(cluster) as (url, engine, offset):
        app = tasks.build_app(url)
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        named = create_engine(with_application_name(url, "absurd-fault-spawner"))
        aborted: list[str] = []
        committed: list[str] = []
        extra: list[str] = []
        worker = threading.Thread(
            target=app.start_worker,
            kwargs={"worker_id": "spawn-worker", "claim_timeout": 60, "concurrency": concurrency},
            daemon=True,
        )
        worker.start()
        try:
            for _ in range(rounds):
                for how in ABORTS:
                    task_id, error = _aborted_spawn(app, named, admin, how)
                    aborted.append(task_id)
                    if error:
                        extra.append(f"{how}: {error}")
                with Session(engine) as session, session.begin():
                    params = {"steps": 2}
                    committed.append(str(app.spawn("steps", params, session=session).task_id))
            recover = _settle(engine, len(committed), settle_timeout, time.monotonic())
        finally:
            _stop_thread_worker(app, worker)
        if worker.is_alive():
            extra.append(f"the worker did not stop within {STOP_TIMEOUT}s of stop_worker()")
        with engine.connect() as conn:
            existing = conn.scalar(
                text("SELECT count(*) FROM absurd.tasks WHERE task_id::text = ANY(:ids)"),
                {"ids": aborted},
            )
            started_aborted = conn.scalar(
                text("SELECT count(*) FROM fault_starts WHERE task_id::text = ANY(:ids)"),
                {"ids": aborted},
            )
            starts = dict(
                conn.execute(
                    text("SELECT task_id::text, count(*) FROM fault_starts GROUP BY task_id")
                ).all()
            )
        if existing:
            extra.append(f"{existing} aborted spawn(s) left a task")
        if started_aborted:
            extra.append(f"a handler started {started_aborted} time(s) for aborted spawns")
        runs_of_committed = Counter(starts.get(t, 0) for t in committed)
        if set(runs_of_committed) != {1}:
            extra.append(f"committed tasks ran (times: tasks) {dict(runs_of_committed)}")
        admin.dispose()
        named.dispose()
        app.close()
        return _finish(
            "spawn-in-session",
            cluster,
            engine,
            offset,
            spawned=len(committed),
            faults=len(aborted),
            recover=recover,
            started=started,
            measured={"aborted": len(aborted), "committed": len(committed)},
            extra=extra,
        )


def _aborted_spawn(app: Absurd, named: Engine, admin: Engine, how: str) -> tuple[str, str]:
    """Spawn in a transaction that ``how`` ends without a commit; (task id, error
    text if the transaction did not end the way it should)."""
    task_id = ""
    if how == "rollback":
        with Session(named) as session:
            session.begin()
            task_id = str(app.spawn("steps", {"steps": 1}, session=session).task_id)
            session.rollback()
        return task_id, ""
    if how == "exception":
        try:
            with Session(named) as session, session.begin():
                task_id = str(app.spawn("steps", {"steps": 1}, session=session).task_id)
                raise _Abort
        except _Abort:
            return task_id, ""
        return task_id, "the exception did not propagate"
    if how == "killed-connection":
        with Session(named) as session:
            session.begin()
            pid = session.scalar(text("SELECT pg_backend_pid()"))
            task_id = str(app.spawn("steps", {"steps": 1}, session=session).task_id)
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            gone = poll(lambda: not _backend_alive(admin, pid), 10.0)
            try:
                session.commit()
            except DBAPIError as exc:
                session.rollback()
                if not isinstance(exc.orig, psycopg.OperationalError):
                    return task_id, f"COMMIT raised {exc!r:.200}"
                return task_id, "" if gone else "the backend outlived its termination"
            return task_id, "COMMIT on a terminated connection succeeded"
    if how == "deferred-constraint":
        with Session(named) as session:
            session.begin()
            # A child of a parent that does not exist: checked only at COMMIT.
            session.execute(text("INSERT INTO fault_children (parent_id) VALUES (-1)"))
            task_id = str(app.spawn("steps", {"steps": 1}, session=session).task_id)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                return task_id, ""
            return task_id, "COMMIT with a violated deferred constraint succeeded"
    raise ValueError(how)


def _backend_alive(admin: Engine, pid: int) -> bool:
    with admin.connect() as conn:
        return bool(
            conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
        )


# -- pooled connections that die while idle ---------------------------------------------

INPROC_APPLICATION_NAME = "absurd-fault-inproc"


def idle_connections_die(
    cluster: FaultCluster,
    *,
    how: str = "terminate",
    tasks_count: int = 6,
    settle_timeout: float = 30.0,
) -> Result:
    """Each task (``max_attempts=1``) stops after its first checkpoints, while
    every connection of its worker's pool is idle; those connections are then
    killed (``how``: pg_terminate_backend on the idle ones, or an immediate
    restart of the server) and the task goes on. A dead idle connection must not
    cost an attempt, so every task must still complete on attempt 1."""
    if how not in ("terminate", "restart"):
        raise ValueError(how)
    started = time.monotonic()
    tasks.RACE_ATTEMPT.clear()
    _drain(tasks.MEETINGS)
    with _database(cluster) as (url, engine, offset):
        app = tasks.build_app(with_application_name(url, INPROC_APPLICATION_NAME))
        spawned = [
            r.task_id
            for r in app.spawn_many(
                SpawnRequest("steps", {"steps": 3, "race": "checkpoint"}, max_attempts=1)
                for _ in range(tasks_count)
            )
        ]
        for task_id in spawned:
            tasks.RACE_ATTEMPT[str(task_id)] = 1
        worker = threading.Thread(
            target=app.start_worker,
            # One slot: while its handler is paused, nothing of the worker runs a
            # statement, so every connection the faults kill is idle.
            kwargs={"worker_id": "idle-conns", "claim_timeout": 60, "concurrency": 1},
            daemon=True,
        )
        worker.start()
        faults = 0
        extra: list[str] = []
        last_fault = time.monotonic()
        try:
            for _ in spawned:
                try:
                    _, barrier = tasks.MEETINGS.get(timeout=settle_timeout)
                except queue.Empty:
                    extra.append("a task never reached its pause point")
                    break
                if how == "restart":
                    cluster.pg.restart("immediate")
                    faults += 1
                else:
                    faults += _terminate_idle(engine, INPROC_APPLICATION_NAME)
                last_fault = time.monotonic()
                with suppress(threading.BrokenBarrierError):
                    barrier.wait(tasks.BARRIER_TIMEOUT)
            recover = _settle(engine, len(spawned), settle_timeout, last_fault)
        finally:
            _stop_thread_worker(app, worker)
            tasks.RACE_ATTEMPT.clear()
        if worker.is_alive():
            extra.append(f"the worker did not stop within {STOP_TIMEOUT}s of stop_worker()")
        app.close()
        return _finish(
            f"idle-connections-{how}",
            cluster,
            engine,
            offset,
            spawned=len(spawned),
            faults=faults,
            recover=recover,
            started=started,
            extra=extra,
        )


def _terminate_idle(engine: Engine, application_name: str) -> int:
    """Terminate the idle backends of ``application_name``; wait until they are gone."""
    with engine.connect() as conn:
        pids = list(
            conn.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = :name AND state = 'idle'"
                ),
                {"name": application_name},
            )
        )
    terminate(engine, pids)

    def gone() -> bool:
        with engine.connect() as conn:
            return not conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"), {"p": pids}
            )

    poll(gone, 10.0)
    return len(pids)


SCENARIOS: dict[str, Callable[..., Result]] = {
    "sigkill-workers": sigkill_workers,
    "restart-server": restart_server,
    "terminate-backends": terminate_backends,
    "cancel-races": cancel_races,
    "spawn-in-session": spawn_in_session,
    "idle-connections": idle_connections_die,
}
