"""Statements and transactions per 3-step task, counted, so that a regression
on the hot path shows in CI (speed itself is measured in bench/, never
asserted here).

Counted at the client: every statement sent (``before_cursor_execute``), and
every transaction committed: a statement on an AUTOCOMMIT connection is one, a
``commit`` of an explicit transaction is one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from absurd_sqla import Absurd, TaskContext
from tests.support import count_tasks, wait_until, worker_thread

TASKS = 20
# As measured when pinned (3-step tasks through one work_batch of TASKS): lower
# is welcome, higher is a regression to explain and re-pin.
STATEMENTS_PER_TASK = 5.05  # start, 3 checkpoints, complete; + the batch's sweep and claim
COMMITS_PER_TASK = 5.05
STATEMENTS_PER_SPAWN = 1
# Under start_worker at concurrency 1 (pinned at 4.2-4.3 with 40 tasks): 3
# checkpoints and a completion that claims the slot's next run; + the worker's
# start-up, its first claim, its sweeps and the idle look after the last task.
WORKER_STATEMENTS_PER_TASK = 4.5
WORKER_TASKS = 40


@dataclass
class Counts:
    statements: list[str] = field(default_factory=list)
    commits: int = 0

    def reset(self) -> None:
        self.statements.clear()
        self.commits = 0


@pytest.fixture
def counts(clean_db: Engine) -> Iterator[Counts]:
    found = Counts()

    def statement(conn: Connection, cursor: Any, sql: str, *args: Any) -> None:
        found.statements.append(sql)
        if conn.get_isolation_level() == "AUTOCOMMIT" or (
            conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        ):
            found.commits += 1

    def commit(conn: Connection) -> None:
        found.commits += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Engine, "commit", commit)
    yield found
    event.remove(Engine, "before_cursor_execute", statement)
    event.remove(Engine, "commit", commit)


def three_steps(params: Any, ctx: TaskContext) -> int:
    a = ctx.step("one", lambda: 1)
    b = ctx.step("two", lambda: a + 1)
    return ctx.step("three", lambda: b + 1)


def test_a_spawn_is_one_statement(app: Absurd, counts: Counts) -> None:
    counts.reset()
    app.spawn("three", {})
    assert len(counts.statements) == STATEMENTS_PER_SPAWN, counts.statements
    assert counts.commits == 1


def test_statements_and_commits_per_three_step_task(app: Absurd, counts: Counts) -> None:
    app.register_task("three")(three_steps)
    for _ in range(TASKS):
        app.spawn("three", {})
    counts.reset()
    assert app.work_batch("w", batch_size=TASKS) == TASKS
    statements = len(counts.statements) / TASKS
    commits = counts.commits / TASKS
    print(f"per 3-step task: {statements:.2f} statements, {commits:.2f} commits")
    assert statements <= STATEMENTS_PER_TASK, counts.statements[:8]
    assert commits <= COMMITS_PER_TASK, counts.commits
    assert commits >= 1  # the counting itself works


def test_statements_per_three_step_task_under_start_worker(app: Absurd, clean_db: Engine) -> None:
    """A worker with work queued: each completion claims the slot's next run,
    so a task costs its checkpoints and its completion, nothing more."""
    app.register_task("three")(three_steps)
    for _ in range(WORKER_TASKS):
        app.spawn("three", {})
    sent: list[str] = []

    def statement(conn: Connection, cursor: Any, sql: str, *args: Any) -> None:
        sent.append(sql)

    # Watched from an engine of its own, whose statements are not counted.
    observer = create_engine(clean_db.url, poolclass=NullPool)
    event.listen(app.engine, "before_cursor_execute", statement)
    try:
        with worker_thread(app, concurrency=1, poll_interval=30):
            wait_until(
                lambda: count_tasks(observer, state="completed") == WORKER_TASKS, "all completed"
            )
    finally:
        event.remove(app.engine, "before_cursor_execute", statement)
        observer.dispose()
    per_task = len(sent) / WORKER_TASKS
    print(f"per 3-step task under start_worker: {per_task:.2f} statements")
    assert per_task <= WORKER_STATEMENTS_PER_TASK, sent[:12]
