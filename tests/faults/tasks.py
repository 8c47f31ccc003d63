"""The task handlers every fault scenario runs, in-process and in worker processes.

``steps`` is the workhorse: ``steps`` pairs of a ``ctx.step`` (some work) and a
``ctx.transaction_step`` that inserts one row into ``fault_effects``, a table
with no constraint at all, so a duplicated effect shows up as a second row.
Every handler invocation also inserts a row into ``fault_starts`` on its own
connection (autocommit), so "no worker ever ran it" can be counted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from absurd_sqla import Absurd, Hooks
from absurd_sqla.context import TaskContext

EFFECT_PREFIX = "effect-"
BUSINESS_DDL = (
    # No primary key, no unique constraint: exactly-once must come from absurd.
    "CREATE TABLE fault_effects (task_id uuid NOT NULL, step text NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE fault_starts (task_id uuid NOT NULL, attempt int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    # For spawn(session=) ended by a constraint checked only at COMMIT.
    "CREATE TABLE fault_parents (id int PRIMARY KEY)",
    "CREATE TABLE fault_children (id serial PRIMARY KEY, parent_id int NOT NULL "
    "REFERENCES fault_parents (id) DEFERRABLE INITIALLY DEFERRED)",
)

# Race points of in-process handlers (empty in worker processes): task id -> the
# attempt that stops at its race point. There the handler puts (task id, a
# Barrier(2)) on MEETINGS and waits at the barrier for whoever takes it (the
# canceller in scenarios.cancel_races), so both sides act at the same moment.
RACE_ATTEMPT: dict[str, int] = {}
MEETINGS: queue.Queue[tuple[str, threading.Barrier]] = queue.Queue()
BARRIER_TIMEOUT = 15.0


def effect_name(i: int) -> str:
    return f"{EFFECT_PREFIX}{i}"


Wrap = Callable[[Any, Callable[[], Any]], Any]


def build_app(url: str, *, wrap_task: Wrap | None = None) -> Absurd:
    app = Absurd(url, hooks=Hooks(wrap_task=wrap_task))
    # pre_ping: a dead pooled connection of this bookkeeping engine must not
    # fail a handler (that would be the harness's fault, not absurd's).
    starts: Engine = create_engine(
        app.engine.url, isolation_level="AUTOCOMMIT", pool_size=2, pool_pre_ping=True
    )

    def record_start(ctx: TaskContext) -> None:
        with starts.connect() as conn:
            conn.execute(
                text("INSERT INTO fault_starts (task_id, attempt) VALUES (:t, :a)"),
                {"t": ctx.task_id, "a": ctx.attempt},
            )

    def meet(ctx: TaskContext) -> None:
        """On the attempt a race scenario chose, meet the other side."""
        if RACE_ATTEMPT.get(str(ctx.task_id)) == ctx.attempt:
            barrier = threading.Barrier(2)
            MEETINGS.put((str(ctx.task_id), barrier))
            barrier.wait(BARRIER_TIMEOUT)

    @app.register_task("steps")
    def steps(params: dict[str, Any], ctx: TaskContext) -> int:
        """params: steps (pairs), work (seconds of "work" per step), fail_until
        (raise on attempts below it), race (where to meet the canceller)."""
        record_start(ctx)
        if ctx.attempt < params.get("fail_until", 0):
            meet(ctx)  # race "fail": the canceller races this failure (and its retry)
            raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
        work = float(params.get("work", 0.0))
        for i in range(int(params["steps"])):
            if params.get("race") == "checkpoint" and i == 1:
                meet(ctx)  # the canceller races this checkpoint
            ctx.step(f"work-{i}", lambda i=i: _work(work, i))
            ctx.transaction_step(effect_name(i), lambda session, i=i: _effect(session, ctx, i))
        if params.get("race") == "complete":
            meet(ctx)  # the canceller races the completion
        return int(params["steps"])

    return app


def _work(seconds: float, i: int) -> int:
    if seconds > 0:
        time.sleep(seconds)  # stands in for a step's I/O, not for a condition
    return i


def _effect(session: Session, ctx: TaskContext, i: int) -> None:
    session.execute(
        text("INSERT INTO fault_effects (task_id, step) VALUES (:t, :s)"),
        {"t": ctx.task_id, "s": effect_name(i)},
    )
