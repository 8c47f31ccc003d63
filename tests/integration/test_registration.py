"""``register_task``: per-task defaults that every spawn uses unless it
overrides them, the original SDK's ``default_*`` names, and one handler per name."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text

from absurd_sqla import (
    Absurd,
    InvalidArgument,
    SpawnRequest,
    TaskAlreadyRegistered,
    TaskContext,
)
from absurd_sqla.testing import FakeClock, run_until_idle

FIXED = {"kind": "fixed", "base_seconds": 60}


def task_row(engine: Engine, task_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT * FROM absurd.tasks WHERE task_id = :t"), {"t": task_id}
        ).one()


def test_task_defaults_apply_to_every_spawn_unless_overridden(app: Absurd) -> None:
    app.create_queue("mail")

    @app.register_task(
        "send",
        queue="mail",
        max_attempts=4,
        retry_strategy=FIXED,
        cancellation={"max_delay": 30},
    )
    def send(params: Any, ctx: TaskContext) -> None:
        return None

    row = task_row(app.engine, app.spawn("send", {}).task_id)
    assert (row.queue_name, row.max_attempts, row.retry_strategy, row.cancellation) == (
        "mail",
        4,
        FIXED,
        {"max_delay": 30},
    )
    # spawn_many and ctx.spawn go through the same defaults.
    (many,) = app.spawn_many([SpawnRequest("send", {})])
    assert task_row(app.engine, many.task_id).retry_strategy == FIXED

    exponential = {"kind": "exponential", "base_seconds": 1, "factor": 3}
    overridden = app.spawn("send", {}, queue="default", max_attempts=1, retry_strategy=exponential)
    row = task_row(app.engine, overridden.task_id)
    assert (row.queue_name, row.max_attempts, row.retry_strategy, row.cancellation) == (
        "default",
        1,
        exponential,
        {"max_delay": 30},
    )


def test_a_registered_retry_strategy_delays_the_retry(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("flaky", retry_strategy=FIXED, max_attempts=2)
    def flaky(params: Any, ctx: TaskContext) -> None:
        raise RuntimeError("boom")

    spawned = app.spawn("flaky", {})
    assert run_until_idle(app) == 1
    with app.engine.connect() as conn:
        delay = conn.scalar(
            text(
                "SELECT extract(epoch FROM available_at - absurd.now()) FROM absurd.runs "
                "WHERE task_id = :t AND attempt = 2"
            ),
            {"t": spawned.task_id},
        )
    assert delay == pytest.approx(60, abs=1)
    assert run_until_idle(app) == 0  # not due yet
    clock.advance(61)
    assert run_until_idle(app) == 1
    assert task_row(app.engine, spawned.task_id).state == "failed"


def test_the_original_sdks_default_names_still_work(app: Absurd) -> None:
    @app.register_task("old", default_max_attempts=7, default_cancellation={"max_duration": 9})
    def old(params: Any, ctx: TaskContext) -> None:
        return None

    row = task_row(app.engine, app.spawn("old", {}).task_id)
    assert (row.max_attempts, row.cancellation) == (7, {"max_duration": 9})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 2, "default_max_attempts": 3},
        {"cancellation": {"max_delay": 1}, "default_cancellation": {"max_delay": 2}},
    ],
)
def test_both_spellings_at_once_are_refused(app: Absurd, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        app.register_task("t", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry_strategy": {"kind": "sometimes"}},
        {"retry_strategy": "fixed"},
        {"queue": "bad queue"},
    ],
)
def test_bad_task_defaults_are_refused(app: Absurd, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        app.register_task("t", **kwargs)(lambda params, ctx: None)
    assert app.spawn("t", {}).created  # nothing was registered: app defaults apply


def test_registering_a_name_twice_is_an_error_and_keeps_the_first(app: Absurd) -> None:
    @app.register_task("once")
    def first(params: Any, ctx: TaskContext) -> str:
        return "first"

    with pytest.raises(TaskAlreadyRegistered, match="'once' is already registered"):

        @app.register_task("once")
        def second(params: Any, ctx: TaskContext) -> str:
            return "second"

    spawned = app.spawn("once", {})
    run_until_idle(app)
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == "first"


def test_a_handler_must_be_callable(app: Absurd) -> None:
    with pytest.raises(InvalidArgument, match="must be callable"):
        app.register_task("t")("not a function")  # type: ignore[type-var]
