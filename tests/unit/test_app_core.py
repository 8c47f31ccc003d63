"""``AppCore`` without a database: registry, per-task defaults, spawn
batches, task-id parameters and the checks on what statements return."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from absurd_sqla import (
    Hooks,
    InvalidArgument,
    QueueMismatch,
    QueueNotFound,
    SpawnRequest,
    SpawnResult,
    TaskAlreadyRegistered,
    TaskNotFound,
    TaskStateError,
)
from absurd_sqla._app import AppCore, WorkerSettings


def handler(params: Any, ctx: Any) -> None:
    return None


def test_defaults_come_from_the_task_then_the_app() -> None:
    core = AppCore("main", default_max_attempts=3)
    core.register("known", handler, queue="q", retry_strategy={"kind": "fixed"})
    known = core.defaults_for("known", None)
    assert (known.queue, known.max_attempts, known.retry_strategy) == ("q", 3, {"kind": "fixed"})
    assert core.defaults_for("known", "elsewhere").queue == "elsewhere"
    unknown = core.defaults_for("unknown", None)
    assert (unknown.queue, unknown.max_attempts, unknown.retry_strategy) == ("main", 3, None)


def test_a_name_registers_once() -> None:
    core = AppCore()
    core.register("t", handler)
    with pytest.raises(TaskAlreadyRegistered):
        core.register("t", handler)
    assert core.registry["t"].handler is handler


def test_spawn_batches_group_by_queue_in_a_fixed_order_and_keep_positions() -> None:
    core = AppCore()
    core.register("b-task", handler, queue="b")
    batches = core.spawn_batches(
        [SpawnRequest("b-task", 1), SpawnRequest("x", 2), SpawnRequest("b-task", 3, queue="a")]
    )
    assert [(batch.queue, batch.positions) for batch in batches] == [
        ("a", [2]),
        ("b", [0]),
        ("default", [1]),
    ]
    params = batches[1].params
    assert params["task_name"] == ["b-task"] and params["channel"] == "absurd.b"
    assert params["params"] == ["1"] and params["queue"] == "b"
    assert params["task_id"] == [batches[1].rows[0]["task_id"]]


def test_spawn_batches_apply_the_before_spawn_hook_and_validate_everything_first() -> None:
    seen: list[str] = []

    def hook(request: SpawnRequest) -> SpawnRequest:
        seen.append(request.task_name)
        return SpawnRequest(request.task_name, request.params, headers={"traced": True})

    core = AppCore(hooks=Hooks(before_spawn=hook))
    (batch,) = core.spawn_batches([SpawnRequest("a"), SpawnRequest("b")])
    assert seen == ["a", "b"] and batch.rows[1]["headers"] == '{"traced":true}'
    with pytest.raises(InvalidArgument):
        core.spawn_batches([SpawnRequest("ok"), "not a request"])  # type: ignore[list-item]


def test_missing_queues_and_unmatched_rows_raise_queue_not_found() -> None:
    core = AppCore()
    (batch,) = core.spawn_batches([SpawnRequest("t", idempotency_key="k")])
    with pytest.raises(QueueNotFound):
        core.check_queues_exist([batch], [])
    with pytest.raises(QueueNotFound):
        core.spawn_results(batch, inserted=[], existing=[])
    existing = SimpleNamespace(
        idempotency_key="k", task_id=uuid.uuid4(), last_run_id=uuid.uuid4(), attempts=2
    )
    ((position, result),) = core.spawn_results(batch, inserted=[], existing=[existing])
    assert position == 0
    assert result == SpawnResult(existing.task_id, existing.last_run_id, 2, False)


def test_task_params_take_any_queue_unless_one_is_named() -> None:
    task = uuid.uuid4()
    assert AppCore.task_params(str(task), None) == {"task": task, "queue": None}
    assert AppCore.task_params(task, "q") == {"task": task, "queue": "q"}
    with pytest.raises(InvalidArgument):
        AppCore.task_params("nope", None)
    with pytest.raises(InvalidArgument):
        AppCore.task_params(task, "bad queue")


def test_check_found_and_retryable() -> None:
    task = uuid.uuid4()
    params = {"task": task, "queue": "q"}
    with pytest.raises(TaskNotFound, match=f"task {task} not found"):
        AppCore.check_found(params, None, None)
    with pytest.raises(QueueMismatch) as info:
        AppCore.check_found(params, "failed", "other")
    assert (info.value.task_id, info.value.queue) == (task, "other")
    AppCore.check_found(params, "failed", "q")
    AppCore.check_found({"task": task, "queue": None}, "failed", "other")
    with pytest.raises(TaskStateError):
        AppCore.check_retryable(params, "completed", "q")


def test_worker_settings_are_checked() -> None:
    settings = WorkerSettings.checked("q", "w", 0, 2, 3, 0.5)
    assert (settings.claim_timeout, settings.batch_size, settings.concurrency) == (0.0, 2, 3)
    for bad in [("q", "w", 1, 0), ("q", "", 1, 1), ("q", "w", "1", 1), ("q", "w", 1, 1, 1, 0)]:
        with pytest.raises(InvalidArgument):
            WorkerSettings.checked(*bad)
