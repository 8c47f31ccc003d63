"""A database outage neither floods the log nor stops the worker: one warning
when it goes away, one line when it is back, growing pauses in between."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from absurd_sqla import Absurd, TaskContext, migrate
from absurd_sqla._outage import OUTAGE_BACKOFF_MAX, Outage
from tests.support import DEADLINE, wait_until


@pytest.fixture
def outage_app(fresh_database: str) -> Iterator[tuple[Absurd, Any]]:
    """An app on a database of its own, and ``set_reachable(bool)`` for it."""
    migrate.upgrade(fresh_database)
    url = make_url(fresh_database)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def set_reachable(reachable: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS {str(reachable).lower()}'
            )
            if not reachable:  # and drop every session it has, the worker's included
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": url.database},
                )

    app = Absurd(fresh_database)
    app.create_queue()
    try:
        yield app, set_reachable
    finally:
        set_reachable(True)
        app.close()
        admin.dispose()


def records(caplog: pytest.LogCaptureFixture, level: int, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("absurd_sqla") and r.levelno == level and words in r.getMessage()
    ]


def test_an_outage_logs_once_backs_off_and_recovers(
    outage_app: tuple[Absurd, Any], caplog: pytest.LogCaptureFixture
) -> None:
    app, set_reachable = outage_app
    caplog.set_level(logging.DEBUG, logger="absurd_sqla")

    @app.register_task("ping")
    def ping(params: Any, ctx: TaskContext) -> str:
        return "pong"

    worker = threading.Thread(target=app.start_worker, kwargs={"poll_interval": 0.01}, daemon=True)
    worker.start()
    try:
        first = app.spawn("ping", {})
        assert app.await_task_result(first.task_id, timeout=DEADLINE).result == "pong"
        set_reachable(False)
        # Ten failed attempts at a fixed 10 ms poll would take 0.1 s; with the
        # backoff they take 0.01 * (2^10 - 1) s, and every one of them is quiet.
        wait_until(lambda: len(records(caplog, logging.DEBUG, "still failing")) >= 6, "6 retries")
        set_reachable(True)
        back = wait_until(
            lambda: records(caplog, logging.WARNING, "database is back"), "the worker is back"
        )
        second = app.spawn("ping", {})
        assert app.await_task_result(second.task_id, timeout=DEADLINE).result == "pong"
    finally:
        app.stop_worker()
        worker.join(DEADLINE)
    assert len(records(caplog, logging.WARNING, "database unreachable")) == 1
    assert len(back) == 1
    assert len(records(caplog, logging.WARNING, "LISTEN")) <= 2  # failed once, back once
    ours = [r for r in caplog.records if r.name.startswith("absurd_sqla")]
    assert [r.getMessage() for r in ours if r.levelno >= logging.ERROR] == []
    # The loop backed off: far fewer attempts than 10 ms polls over the outage.
    attempts = len(records(caplog, logging.DEBUG, "still failing")) + 1
    assert attempts <= 12


def test_the_backoff_doubles_up_to_a_cap_and_resets() -> None:
    outage = Outage(first_delay=0.25)
    assert outage.failed(100.0) == (True, 0.25)
    assert outage.failed(100.3) == (False, 0.5)
    assert outage.failed(100.9) == (False, 1.0)
    for _ in range(20):
        _, delay = outage.failed(101.0)
    assert delay == OUTAGE_BACKOFF_MAX
    assert outage.recovered(110.0) == (10.0, 23)
    assert outage.recovered(111.0) is None
    assert outage.failed(120.0) == (True, 0.25)
