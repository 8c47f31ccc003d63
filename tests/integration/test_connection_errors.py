"""Connections that die: real connection loss against the real PostgreSQL.

Backends are killed with ``pg_terminate_backend`` from another connection and
the test waits until ``pg_stat_activity`` no longer lists them; no sleep stands
in for a condition.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from absurd_sqla import Absurd
from absurd_sqla.context import TaskContext
from absurd_sqla.testing import run_until_idle
from tests.support import run_states, task_state, wait_until

# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def url_app(clean_db: Engine, database_url: str) -> Iterator[Absurd]:
    """An app built from a URL (so absurd_sqla makes its engine), whose backends
    carry an application_name of their own in ``pg_stat_activity``."""
    name = f"absurd-test-{uuid.uuid4().hex[:8]}"
    app = Absurd(f"{database_url}?application_name={name}")
    app.create_queue()
    yield app
    app.close()


def app_backends(observer: Engine, app: Absurd) -> list[int]:
    """The pids of the app's backends, as the server lists them."""
    name = app.engine.url.query["application_name"]
    with observer.connect() as conn:
        return list(
            conn.scalars(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": name},
            )
        )


def terminate(observer: Engine, pids: list[int]) -> None:
    """Kill the backends from another connection and wait until they are gone."""
    with observer.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def gone() -> bool:
        with observer.connect() as conn:
            alive = conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": pids},
            )
        return alive == 0

    wait_until(gone, f"backends {pids} terminated")


# -- A: an idle pooled connection that died --------------------------------------------


def test_an_idle_pooled_connection_that_died_costs_no_attempt(
    url_app: Absurd, clean_db: Engine
) -> None:
    """An engine absurd_sqla builds from a URL pings a pooled connection before
    handing it out: one that died while idle is replaced, not handed to a task.
    ``transaction_step`` is not retried on a lost connection, so only the ping
    can save this ``max_attempts=1`` task."""
    killed: list[int] = []

    @url_app.register_task("innocent", max_attempts=1)
    def innocent(params: Any, ctx: TaskContext) -> Any:
        # The claim has returned its connection: every pooled one is idle now.
        killed.extend(app_backends(clean_db, url_app))
        terminate(clean_db, killed)
        return ctx.transaction_step("write", lambda s: s.execute(text("SELECT 42")).scalar_one())

    spawned = url_app.spawn("innocent")
    assert run_until_idle(url_app) == 1
    assert killed, "the app's pool held no idle connection to kill"
    assert run_states(clean_db, spawned.task_id) == ["completed"]
    assert task_state(clean_db, spawned.task_id) == "completed"
    snapshot = url_app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == 42
