"""The worker's log lines against a real PostgreSQL, for ``Absurd`` and
``AsyncAbsurd``: every record about a run carries ``task_id``, ``run_id``,
``task_name``, ``queue`` and ``attempt``; a completed task is one INFO line; a
failure names the retry the database scheduled (time and attempt) or says it
was final; a worker logs a start banner without the database password and warns
when its queue does not exist."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url

from absurd_sqla import Absurd
from absurd_sqla._logs import FIELDS
from absurd_sqla.context import TaskContext
from absurd_sqla.context_async import AsyncTaskContext
from absurd_sqla.models import runs
from absurd_sqla.testing import FakeClock
from tests.internals import claim, sweep_expired
from tests.support import (
    DEADLINE,
    async_app_for,
    async_worker_task,
    run_async,
    wait_until,
    worker_thread,
)

RETRY = {"kind": "fixed", "base_seconds": 30}
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"


@pytest.fixture(autouse=True)
def capture(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="absurd_sqla")
    return caplog


def ours(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("absurd_sqla") and words in r.getMessage()
    ]


def one(caplog: pytest.LogCaptureFixture, words: str) -> logging.LogRecord:
    found = ours(caplog, words)
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    return found[0]


def assert_about(
    record: logging.LogRecord, task_id: Any, run_id: Any, name: str, attempt: int
) -> None:
    assert {f: getattr(record, f) for f in FIELDS} == {
        "task_id": str(task_id),
        "run_id": str(run_id),
        "task_name": name,
        "queue": "default",
        "attempt": attempt,
    }


async def eventually(condition: Callable[[], Any], message: str) -> None:
    """Poll ``condition`` until truthy, yielding to the loop; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE}s: {message}")
        await asyncio.sleep(0.01)


def run_row(engine: Engine, task_id: Any, attempt: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(runs).where(runs.c.task_id == task_id, runs.c.attempt == attempt)
        ).one()


def check_outcomes(
    caplog: pytest.LogCaptureFixture, engine: Engine, spawned: dict[str, Any]
) -> None:
    """The lines of the scenario both outcome tests run: "ok" completes, "flaky"
    fails once (retried in 30 s), "doomed" fails both its attempts."""
    done = one(caplog, "completed in")
    assert done.levelno == logging.INFO
    assert re.fullmatch(
        rf"task ok \({spawned['ok'].task_id}\) completed in \d+\.\d\d s, attempt 1",
        done.getMessage(),
    )
    assert_about(done, spawned["ok"].task_id, spawned["ok"].run_id, "ok", 1)

    retry = one(caplog, "task flaky")
    assert retry.levelno == logging.WARNING and retry.exc_info is None
    second = run_row(engine, spawned["flaky"].task_id, 2)
    at = second.available_at.astimezone(UTC).isoformat(timespec="milliseconds")
    assert retry.getMessage() == (
        f"task flaky ({spawned['flaky'].task_id}) failed: ValueError: boom; "
        f"will retry at {at}, attempt 2 of 3"
    )
    assert_about(retry, spawned["flaky"].task_id, spawned["flaky"].run_id, "flaky", 1)

    final = one(caplog, "failed permanently")
    assert final.levelno == logging.ERROR
    assert final.getMessage() == (
        f"task doomed ({spawned['doomed'].task_id}) failed permanently after 2 attempts: "
        "ValueError: boom"
    )
    assert final.exc_info is not None and final.exc_info[0] is ValueError  # the traceback
    doomed = spawned["doomed"].task_id
    assert_about(final, doomed, run_row(engine, doomed, 2).run_id, "doomed", 2)
    # The first failure of "doomed" was a retry, at once (no retry strategy).
    (first,) = [r for r in ours(caplog, "task doomed") if "will retry" in r.getMessage()]
    assert re.search(rf"will retry at {ISO}, attempt 2 of 2$", first.getMessage())


def test_outcome_lines_of_a_sync_app(app: Absurd, clean_db: Engine, capture: Any) -> None:
    @app.register_task("ok")
    def ok(params: Any, ctx: TaskContext) -> str:
        return ctx.step("s", lambda: "done")

    @app.register_task("flaky", max_attempts=3, retry_strategy=RETRY)
    @app.register_task("doomed", max_attempts=2)
    def boom(params: Any, ctx: TaskContext) -> None:
        raise ValueError("boom")

    spawned = {name: app.spawn(name, {}) for name in ("ok", "flaky", "doomed")}
    while app.work_batch(batch_size=10):
        pass
    check_outcomes(capture, clean_db, spawned)


@run_async
async def test_outcome_lines_of_an_async_app(
    clean_db: Engine, database_url: str, capture: Any
) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("ok")
        async def ok(params: Any, ctx: AsyncTaskContext) -> str:
            async def s() -> str:
                return "done"

            return await ctx.step("s", s)

        @app.register_task("flaky", max_attempts=3, retry_strategy=RETRY)
        @app.register_task("doomed", max_attempts=2)
        async def boom(params: Any, ctx: AsyncTaskContext) -> None:
            raise ValueError("boom")

        spawned = {name: await app.spawn(name, {}) for name in ("ok", "flaky", "doomed")}
        while await app.work_batch(batch_size=10):
            pass
    check_outcomes(capture, clean_db, spawned)


def test_a_suspended_run_logs_at_debug_with_its_fields(app: Absurd, capture: Any) -> None:
    @app.register_task("napper")
    def napper(params: Any, ctx: TaskContext) -> None:
        ctx.sleep_for("nap", 3600)

    spawned = app.spawn("napper", {})
    app.work_batch()
    record = one(capture, "suspended")
    assert record.levelno == logging.DEBUG
    assert record.getMessage().startswith(
        f"task napper ({spawned.task_id}) suspended, attempt 1: sleeping until "
    )
    assert_about(record, spawned.task_id, spawned.run_id, "napper", 1)


def test_a_lapsed_lease_is_logged_per_run_by_the_sweep(
    app: Absurd, clean_db: Engine, clock: FakeClock, capture: Any
) -> None:
    @app.register_task("slow", max_attempts=2)
    def slow(params: Any, ctx: TaskContext) -> None:
        raise AssertionError("never run")

    spawned = app.spawn("slow", {})
    for attempt in (1, 2):
        (run,) = claim(app, "default", "w", 10, 1)
        assert run.attempt == attempt
        clock.advance(11)
        assert sweep_expired(app, "default") == 1
    retry, final = ours(capture, "task slow")
    assert retry.levelno == logging.WARNING
    assert re.fullmatch(
        rf"task slow \({spawned.task_id}\) failed: \$ClaimTimeout: the worker's lease on this "
        rf"run expired before it finished; will retry at {ISO}, attempt 2 of 2",
        retry.getMessage(),
    )
    assert_about(retry, spawned.task_id, spawned.run_id, "slow", 1)
    assert final.levelno == logging.ERROR
    assert "failed permanently after 2 attempts: $ClaimTimeout" in final.getMessage()
    assert final.attempt == 2 and final.task_id == str(spawned.task_id)


def test_records_not_about_a_run_carry_the_queue_and_none_for_the_rest(
    app: Absurd, capture: Any
) -> None:
    app.register_task("noop")(lambda params, ctx: None)
    with worker_thread(app, worker_id="plain", poll_interval=0.05):
        wait_until(lambda: ours(capture, "worker plain starting"), "the banner")
    banner = one(capture, "worker plain starting")
    assert {f: getattr(banner, f) for f in FIELDS} == {
        "task_id": None,
        "run_id": None,
        "task_name": None,
        "queue": "default",
        "attempt": None,
    }
    for record in capture.records:  # every record of ours has every field
        if record.name.startswith("absurd_sqla"):
            assert all(hasattr(record, f) for f in FIELDS), record.getMessage()


# -- the start banner and the missing queue ------------------------------------


def secret_url(database_url: str) -> tuple[str, str]:
    """The test database's URL with a password (the local server trusts any)."""
    url = make_url(database_url)
    if url.password is None:
        url = url.set(password="s3cret-pw")
    return url.render_as_string(hide_password=False), str(url.password)


def check_banner(record: logging.LogRecord, database_url: str, password: str) -> None:
    url = make_url(database_url)
    message = record.getMessage()
    assert record.levelno == logging.INFO
    assert message.startswith("worker banner-worker starting: queue 'default', concurrency 3,")
    assert "2 task(s) registered (alpha, beta)" in message
    assert f"database {url.username}@{url.host}:{url.port}/{url.database}" in message
    assert password not in message
    assert record.queue == "default" and record.task_id is None


def test_a_sync_worker_logs_a_banner_without_the_password(
    clean_db: Engine, database_url: str, capture: Any
) -> None:
    url, password = secret_url(database_url)
    engine = create_engine(url)
    app = Absurd(engine)
    try:
        app.create_queue()
        for name in ("beta", "alpha"):
            app.register_task(name)(lambda params, ctx: None)
        with worker_thread(app, worker_id="banner-worker", concurrency=3, poll_interval=0.05):
            wait_until(lambda: ours(capture, "starting:"), "the banner")
        check_banner(one(capture, "starting:"), database_url, password)
        assert not ours(capture, "does not exist")
    finally:
        app.close()
        engine.dispose()


@run_async
async def test_an_async_worker_logs_a_banner_without_the_password(
    clean_db: Engine, database_url: str, capture: Any
) -> None:
    url, password = secret_url(database_url)
    async with async_app_for(url) as app:
        for name in ("beta", "alpha"):

            async def handler(params: Any, ctx: AsyncTaskContext) -> None:
                return None

            app.register_task(name)(handler)
        async with async_worker_task(app, worker_id="banner-worker", concurrency=3):
            await eventually(lambda: ours(capture, "starting:"), "the banner")
    check_banner(one(capture, "starting:"), database_url, password)
    assert not ours(capture, "does not exist")


def check_missing_queue(caplog: pytest.LogCaptureFixture) -> None:
    record = one(caplog, "does not exist")
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "worker lost-worker serves queue 'nowhere', which does not exist: it will claim "
        "nothing until the queue is created (create_queue('nowhere'))"
    )
    assert record.queue == "nowhere" and record.run_id is None


def test_a_sync_worker_on_a_missing_queue_warns_at_start(app: Absurd, capture: Any) -> None:
    with worker_thread(app, worker_id="lost-worker", queue="nowhere", poll_interval=0.05):
        wait_until(lambda: ours(capture, "does not exist"), "the warning")
    check_missing_queue(capture)


@run_async
async def test_an_async_worker_on_a_missing_queue_warns_at_start(
    clean_db: Engine, database_url: str, capture: Any
) -> None:
    async with (
        async_app_for(database_url) as app,
        async_worker_task(app, worker_id="lost-worker", queue="nowhere"),
    ):
        await eventually(lambda: ours(capture, "does not exist"), "the warning")
    check_missing_queue(capture)


def test_a_stop_before_start_still_returns_at_once(app: Absurd, capture: Any) -> None:
    """The start-up checks do not get in the way of the "start, stop" race."""
    app.stop_worker()
    app.start_worker(worker_id="early", queue="nowhere")  # returns: the stop was pending
    assert not ours(capture, "does not exist")


@run_async
async def test_a_stop_before_an_async_start_still_returns_at_once(
    clean_db: Engine, database_url: str, capture: Any
) -> None:
    async with async_app_for(database_url) as app:
        app.stop_worker()
        await app.start_worker(worker_id="early", queue="nowhere")
    assert not ours(capture, "does not exist")
