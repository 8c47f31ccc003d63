"""An idle worker wakes when the next run comes due (a sleep ending, a retry
delay, a run_after), not a poll interval later. Here the poll interval and the
sweep timer are two minutes, so nothing but that wake-up can resume a 0.3 s
sleep within the test's deadline, on either runtime."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import Engine

import absurd_sqla.worker
import absurd_sqla.worker_async
from absurd_sqla import Absurd, TaskContext
from absurd_sqla._runtime import DUE_SLACK, idle_timeout
from tests.support import async_app_for, run_async, wait_until, worker_thread

POLL = 120.0  # far longer than the test may take: only the timer can wake the worker
LATE = 5.0  # resumed later than this after coming due would mean a poll, not the timer


@pytest.fixture(autouse=True)
def no_sweep_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's 1 s tick also claims; take it out of the way."""
    monkeypatch.setattr(absurd_sqla.worker, "SWEEP_INTERVAL", POLL)
    monkeypatch.setattr(absurd_sqla.worker_async, "SWEEP_INTERVAL", POLL)


def test_idle_timeout_takes_the_nearest_of_poll_sweep_and_due() -> None:
    assert idle_timeout(0.25, 1.0, None) == 0.25
    assert idle_timeout(30, 1.0, None) == 1.0
    assert idle_timeout(30, 1.0, 0.2) == 0.2 + DUE_SLACK
    assert idle_timeout(30, 1.0, -0.5) == DUE_SLACK  # already due
    assert idle_timeout(30, -1.0, 0.2) == 0.0  # the sweep is late


def test_a_sleep_resumes_when_due_not_a_poll_later(app: Absurd) -> None:
    resumed: list[float] = []

    @app.register_task("nap")
    def nap(params: Any, ctx: TaskContext) -> None:
        ctx.sleep_for("nap", 0.3)
        resumed.append(time.monotonic())

    with worker_thread(app, poll_interval=POLL):
        start = time.monotonic()
        spawned = app.spawn("nap", {})
        wait_until(lambda: app.get_task(spawned.task_id).state == "completed", "resumed")
    assert resumed and resumed[0] - start < 0.3 + LATE


def test_a_retry_delay_ends_on_time(app: Absurd) -> None:
    @app.register_task("flaky", retry_strategy={"kind": "fixed", "base_seconds": 0.3})
    def flaky(params: Any, ctx: TaskContext) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return "ok"

    with worker_thread(app, poll_interval=POLL):
        start = time.monotonic()
        spawned = app.spawn("flaky", {})
        wait_until(lambda: app.get_task(spawned.task_id).state == "completed", "retried")
    assert time.monotonic() - start < 0.3 + LATE


@run_async
async def test_the_async_worker_wakes_when_a_sleep_is_due(
    clean_db: Engine, database_url: str
) -> None:
    async with async_app_for(database_url) as app:
        resumed: list[float] = []

        @app.register_task("nap")
        async def nap(params: Any, ctx: Any) -> None:
            await ctx.sleep_for("nap", 0.3)
            resumed.append(time.monotonic())

        worker = asyncio.create_task(app.start_worker(poll_interval=POLL))
        try:
            start = time.monotonic()
            await app.spawn("nap", {})
            deadline = start + 0.3 + LATE
            while not resumed and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # polls the condition; the assertion is the bound
        finally:
            app.stop_worker()
            await asyncio.wait_for(worker, 30)
        assert resumed and resumed[0] - start < 0.3 + LATE
