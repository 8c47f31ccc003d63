"""``absurd_sqla.get_current_context()``: the running task's context inside a
handler (and code it calls), None outside, never a neighbour's."""

from __future__ import annotations

import threading
from typing import Any

from absurd_sqla import Absurd, Hooks, TaskContext, get_current_context
from absurd_sqla.testing import run_until_idle
from tests.support import wait_until


def helper_deep_inside() -> str:
    ctx = get_current_context()
    assert ctx is not None
    return str(ctx.task_id)


def test_inside_a_handler_it_is_the_running_context(app: Absurd) -> None:
    seen: list[Any] = []

    @app.register_task("who")
    def who(params: Any, ctx: TaskContext) -> str:
        seen.append(get_current_context() is ctx)
        return helper_deep_inside()

    assert get_current_context() is None
    spawned = app.spawn("who", {})
    run_until_idle(app)
    assert seen == [True]
    assert get_current_context() is None  # reset after the handler
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.result == str(spawned.task_id)


def test_reset_after_a_failing_or_suspending_handler(app: Absurd) -> None:
    @app.register_task("fails", max_attempts=1)
    def fails(params: Any, ctx: TaskContext) -> None:
        raise RuntimeError("boom")

    @app.register_task("sleeps")
    def sleeps(params: Any, ctx: TaskContext) -> None:
        ctx.sleep_for("nap", 3600)

    app.spawn("fails", {})
    app.spawn("sleeps", {})
    assert run_until_idle(app) == 2
    assert get_current_context() is None


def test_a_wrap_hook_sees_the_context_too(clean_db: Any) -> None:
    seen: list[bool] = []

    def wrap(ctx: Any, call: Any) -> Any:
        seen.append(get_current_context() is ctx)
        return call()

    app = Absurd(clean_db, hooks=Hooks(wrap_task=wrap))
    app.create_queue()
    app.register_task("t")(lambda params, ctx: None)
    app.spawn("t", {})
    run_until_idle(app)
    assert seen == [True]


def test_concurrent_handlers_each_see_their_own(app: Absurd) -> None:
    """Two handlers in flight at once in a worker's threads: each sees itself."""
    both_in = threading.Barrier(2, timeout=10)
    results: dict[str, bool] = {}

    @app.register_task("pair")
    def pair(params: Any, ctx: TaskContext) -> None:
        both_in.wait()  # both handlers are running now
        current = get_current_context()
        results[params["name"]] = current is ctx and current.task_id == ctx.task_id

    app.spawn("pair", {"name": "a"})
    app.spawn("pair", {"name": "b"})
    worker = threading.Thread(
        target=app.start_worker, kwargs={"concurrency": 2, "poll_interval": 0.05}
    )
    worker.start()
    try:
        wait_until(lambda: len(results) == 2, "both handlers ran")
    finally:
        app.stop_worker()
        worker.join(10)
    assert results == {"a": True, "b": True}
