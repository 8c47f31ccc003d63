"""The inspection API (``list_tasks``, ``get_task``, ``queue_stats``, a cancel's
reason) against a real PostgreSQL, on ``Absurd`` and ``AsyncAbsurd``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from absurd_sqla import (
    Absurd,
    InvalidArgument,
    QueueNotFound,
    SpawnRequest,
    TaskContext,
    TaskNotFound,
    TaskPage,
)
from absurd_sqla.testing import FakeClock
from tests.internals import claim, sweep_expired
from tests.support import async_app_for, run_async


def all_pages(app: Absurd, **filters: Any) -> list[TaskPage]:
    pages = [app.list_tasks(**filters)]
    while pages[-1].next_cursor is not None:
        pages.append(app.list_tasks(after=pages[-1].next_cursor, **filters))
    return pages


@pytest.fixture
def mixed(app: Absurd) -> dict[str, list[uuid.UUID]]:
    """Five "a" tasks on the default queue, three "b" on "other", spawned in order:
    the first "a" completed, the second failed for good, the rest pending."""
    app.create_queue("other")

    @app.register_task("a", max_attempts=1)
    def a(params: Any, ctx: TaskContext) -> Any:
        if params["i"] == 1:
            raise RuntimeError("a1 broke")
        return params["i"]

    ids = {"a": [], "b": []}  # type: dict[str, list[uuid.UUID]]
    for i in range(5):
        ids["a"].append(app.spawn("a", {"i": i}).task_id)
    for i in range(3):
        ids["b"].append(app.spawn("b", {"i": i}, queue="other").task_id)
    assert app.work_batch("w", batch_size=2) == 2
    return ids


def test_list_tasks_newest_first_across_queues_with_pages(
    app: Absurd, mixed: dict[str, list[uuid.UUID]]
) -> None:
    spawned = mixed["a"] + mixed["b"]
    listed = app.list_tasks()
    assert [t.task_id for t in listed] == spawned[::-1]
    assert listed.next_cursor is None

    pages = all_pages(app, limit=3)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [t.task_id for p in pages for t in p] == spawned[::-1]
    assert pages[0].next_cursor == pages[0][-1].task_id

    exact = all_pages(app, limit=4)  # a full last page: no empty page after it
    assert [len(p) for p in exact] == [4, 4]


def test_list_tasks_summaries(app: Absurd, mixed: dict[str, list[uuid.UUID]]) -> None:
    by_id = {t.task_id: t for t in app.list_tasks()}
    done, failed, pending = (by_id[mixed["a"][i]] for i in range(3))
    assert (done.state, done.task_name, done.queue_name, done.attempts) == (
        "completed",
        "a",
        "default",
        1,
    )
    assert done.started_at is not None and done.finished_at is not None
    assert failed.state == "failed" and failed.max_attempts == 1
    assert pending.state == "pending" and pending.started_at is None
    assert pending.waiting_for is None  # due now: waits for nothing but a worker
    # created_at comes from the UUIDv7 id: the spawning client's clock.
    assert abs(pending.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert done.created_at <= failed.created_at <= pending.created_at


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"queue": "other"}, lambda ids: ids["b"]),
        ({"task_name": "a"}, lambda ids: ids["a"]),
        ({"state": "completed"}, lambda ids: ids["a"][:1]),
        ({"state": "failed"}, lambda ids: ids["a"][1:2]),
        ({"state": "pending", "queue": "default"}, lambda ids: ids["a"][2:]),
        ({"queue": "other", "task_name": "a"}, lambda ids: []),
    ],
)
def test_list_tasks_filters(
    app: Absurd, mixed: dict[str, list[uuid.UUID]], filters: dict[str, Any], expected: Any
) -> None:
    pages = all_pages(app, limit=2, **filters)
    assert [t.task_id for p in pages for t in p] == expected(mixed)[::-1]


def test_list_tasks_since(app: Absurd, mixed: dict[str, list[uuid.UUID]]) -> None:
    everything = list(app.list_tasks())
    cut = everything[3].created_at
    recent = app.list_tasks(since=cut)
    assert [t.task_id for t in recent] == [t.task_id for t in everything if t.created_at >= cut]
    assert len(recent) >= 4
    assert len(app.list_tasks(since=timedelta(hours=1))) == len(everything)
    assert len(app.list_tasks(since=datetime.now(UTC) + timedelta(hours=1))) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "done"},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "10"},
        {"since": datetime(2026, 1, 1)},  # naive
        {"since": "yesterday"},
        {"after": "not-a-uuid"},
        {"queue": "bad queue!"},
        {"task_name": ""},
    ],
)
def test_list_tasks_refuses_bad_filters(app: Absurd, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        app.list_tasks(**kwargs)


def test_what_a_live_task_waits_for(app: Absurd, clock: FakeClock) -> None:
    @app.register_task("waits-event")
    def waits_event(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event("go", timeout=60)

    @app.register_task("sleeps")
    def sleeps(params: Any, ctx: TaskContext) -> None:
        ctx.sleep_for("nap", 300)

    @app.register_task("child")
    def child(params: Any, ctx: TaskContext) -> str:
        return "ok"

    @app.register_task("parent")
    def parent(params: Any, ctx: TaskContext) -> Any:
        spawned = ctx.spawn("child", {})
        return ctx.await_task_result(spawned.task_id)

    @app.register_task("flaky", retry_strategy={"kind": "fixed", "base_seconds": 90})
    def flaky(params: Any, ctx: TaskContext) -> None:
        raise RuntimeError("not yet")

    now = clock.now()
    ids = {name: app.spawn(name, {}).task_id for name in ("waits-event", "sleeps", "parent")}
    ids["flaky"] = app.spawn("flaky", {}).task_id
    assert app.work_batch("w", batch_size=4) == 4
    by_id = {t.task_id: t for t in app.list_tasks()}

    event = by_id[ids["waits-event"]].waiting_for
    assert event is not None and (event.kind, event.event_name) == ("event", "go")
    assert event.until is not None and event.until - now == timedelta(seconds=60)

    nap = by_id[ids["sleeps"]].waiting_for
    assert nap is not None and nap.kind == "sleep"
    assert nap.until is not None and nap.until - now == timedelta(seconds=300)

    on_child = by_id[ids["parent"]].waiting_for
    child_id = app.get_task(ids["parent"]).children[0].task_id
    assert on_child is not None and (on_child.kind, on_child.task_id) == ("task", child_id)

    retry = by_id[ids["flaky"]].waiting_for
    assert retry is not None and retry.kind == "scheduled"
    assert retry.until is not None and retry.until - now == timedelta(seconds=90)
    assert by_id[ids["flaky"]].attempts == 2

    clock.advance(91)  # the retry is due: no longer "scheduled"
    assert app.get_task(ids["flaky"]).waiting_for is None


def test_get_task_shows_runs_checkpoints_and_failure(app: Absurd) -> None:
    @app.register_task("two-tries", max_attempts=3, retry_strategy={"kind": "none"})
    def two_tries(params: Any, ctx: TaskContext) -> Any:
        first = ctx.step("first", lambda: {"n": 1})
        if ctx.attempt == 1:
            raise ValueError("first attempt fails")
        return {"first": first, "second": ctx.step("second", lambda: 2)}

    spawned = app.spawn("two-tries", {"order": 7}, headers={"trace": "t-1"})
    assert app.work_batch("worker-one") == 1
    assert app.work_batch("worker-two") == 1
    task = app.get_task(str(spawned.task_id))  # a string id works too

    assert (task.task_name, task.state, task.attempts, task.max_attempts) == (
        "two-tries",
        "completed",
        2,
        3,
    )
    assert task.params == {"order": 7} and task.headers == {"trace": "t-1"}
    assert task.result == {"first": {"n": 1}, "second": 2} and task.failure is None
    assert task.parent_id is None and task.children == [] and task.waiting_for is None
    assert [(r.attempt, r.state, r.worker) for r in task.runs] == [
        (1, "failed", "worker-one"),  # the worker is kept after the run ended
        (2, "completed", "worker-two"),
    ]
    failure = task.runs[0].failure
    assert failure is not None and failure["name"] == "ValueError"
    assert failure["message"] == "first attempt fails"
    assert "raise ValueError" in failure["traceback"]
    assert task.runs[1].failure is None
    assert [(c.name, c.value) for c in task.checkpoints] == [("first", {"n": 1}), ("second", 2)]
    assert task.checkpoints[0].run_id == task.runs[0].run_id
    assert task.checkpoints[1].run_id == task.runs[1].run_id


def test_get_task_of_a_failed_task_has_its_failure(app: Absurd) -> None:
    app.register_task("doomed", max_attempts=1)(lambda params, ctx: 1 / 0)
    spawned = app.spawn("doomed", {})
    app.work_batch("w")
    task = app.get_task(spawned.task_id)
    assert task.state == "failed" and task.result is None
    assert task.failure is not None and task.failure["name"] == "ZeroDivisionError"


def test_a_claim_timeout_still_names_the_worker_that_died(app: Absurd, clock: FakeClock) -> None:
    spawned = app.spawn("anything", {})
    claim(app, "default", "worker-that-died", 10, 1)
    clock.advance(11)
    assert sweep_expired(app, "default") == 1
    first = app.get_task(spawned.task_id).runs[0]
    assert first.state == "failed" and first.worker == "worker-that-died"
    assert first.failure is not None and first.failure["name"] == "$ClaimTimeout"


def test_parent_and_children(app: Absurd) -> None:
    @app.register_task("kid")
    def kid(params: Any, ctx: TaskContext) -> int:
        return int(params["n"])

    @app.register_task("mom")
    def mom(params: Any, ctx: TaskContext) -> list[Any]:
        kids = [ctx.spawn("kid", {"n": n}) for n in range(2)]
        return [ctx.await_task_result(k.task_id).result for k in kids]

    spawned = app.spawn("mom", {})
    app.spawn("kid", {"n": 9})  # not a child of anyone
    app.work_batch("w")
    family = app.get_task(spawned.task_id)
    assert [c.task_name for c in family.children] == ["kid", "kid"]
    assert all(c.state == "pending" for c in family.children)
    for child in family.children:
        assert app.get_task(child.task_id).parent_id == spawned.task_id


def test_cancel_records_the_reason(app: Absurd) -> None:
    spawned = app.spawn("t", {})
    silent = app.spawn("t", {})
    assert app.cancel_task(spawned.task_id, "customer asked")
    assert app.cancel_task(silent.task_id)
    task = app.get_task(spawned.task_id)
    assert (task.state, task.cancel_reason) == ("cancelled", "customer asked")
    assert app.get_task(silent.task_id).cancel_reason is None
    assert app.list_tasks(state="cancelled")[0].task_id == silent.task_id


@pytest.mark.parametrize("reason", ["", 5, "x" * 2001])
def test_a_bad_reason_is_refused_and_nothing_is_cancelled(app: Absurd, reason: Any) -> None:
    spawned = app.spawn("t", {})
    with pytest.raises(InvalidArgument):
        app.cancel_task(spawned.task_id, reason)
    assert app.get_task(spawned.task_id).state == "pending"


def test_get_task_of_an_unknown_or_bad_id(app: Absurd) -> None:
    with pytest.raises(TaskNotFound):
        app.get_task(uuid.uuid4())
    with pytest.raises(InvalidArgument):
        app.get_task("nope")


def test_queue_stats(app: Absurd, clock: FakeClock) -> None:
    app.create_queue("other")
    app.create_queue("empty")
    app.register_task("ok", max_attempts=1)(lambda params, ctx: "fine")
    app.register_task("bad", max_attempts=1)(lambda params, ctx: 1 / 0)
    app.spawn_many([SpawnRequest("ok", {}), SpawnRequest("bad", {})])
    app.work_batch("w", batch_size=2)
    app.spawn("ok", {})  # due 42 s by the end: the oldest of default's two
    clock.advance(30)
    app.spawn_many([SpawnRequest("ok", {}), SpawnRequest("ok", {}, queue="other")])
    app.spawn("ok", {}, queue="other", run_after=clock.now() + timedelta(hours=1))
    clock.advance(12)

    stats = {s.queue_name: s for s in app.queue_stats()}
    assert sorted(stats) == ["default", "empty", "other"]
    default = stats["default"]
    assert default.counts == {
        "pending": 2,
        "running": 0,
        "sleeping": 0,
        "completed": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert default.oldest_due_age == timedelta(seconds=42)
    assert (default.completed_last_minute, default.failed_last_minute) == (1, 1)
    assert (default.completed_last_hour, default.failed_last_hour) == (1, 1)
    assert stats["other"].counts["pending"] == 2
    assert stats["other"].oldest_due_age == timedelta(seconds=12)  # not the one due later
    assert stats["empty"].counts == dict.fromkeys(default.counts, 0)
    assert stats["empty"].oldest_due_age is None

    clock.advance(60)
    later = app.queue_stats("default")
    assert [s.queue_name for s in later] == ["default"]
    assert (later[0].completed_last_minute, later[0].completed_last_hour) == (0, 1)
    clock.advance(3600)
    assert (app.queue_stats("default")[0].failed_last_hour) == 0

    with pytest.raises(QueueNotFound):
        app.queue_stats("missing")
    with pytest.raises(InvalidArgument):
        app.queue_stats("bad queue!")


# -- AsyncAbsurd: the same API, awaited ------------------------------------------------


@run_async
async def test_async_inspection(clean_db: Engine, database_url: str) -> None:
    async with async_app_for(database_url) as app:

        @app.register_task("a", max_attempts=1)
        async def a(params: Any, ctx: Any) -> Any:
            async def one() -> int:
                return 1

            return await ctx.step("one", one)

        first = await app.spawn("a", {})
        second = await app.spawn("a", {})
        assert await app.work_batch("async-w") == 1
        assert await app.cancel_task(second.task_id, reason="not needed")

        page = await app.list_tasks(limit=1)
        assert [t.task_id for t in page] == [second.task_id]
        rest = await app.list_tasks(limit=1, after=page.next_cursor)
        assert [t.task_id for t in rest] == [first.task_id] and rest.next_cursor is None

        done = await app.get_task(first.task_id)
        assert done.result == 1 and [r.worker for r in done.runs] == ["async-w"]
        assert [(c.name, c.value) for c in done.checkpoints] == [("one", 1)]
        assert (await app.get_task(second.task_id)).cancel_reason == "not needed"

        (stats,) = await app.queue_stats("default")
        assert (stats.counts["completed"], stats.counts["cancelled"]) == (1, 1)
        assert stats.completed_last_minute == 1
        with pytest.raises(InvalidArgument):
            await app.list_tasks(state="nope")


# -- events, waits, throughput -----------------------------------------------------------


def test_list_events_newest_first_across_queues(app: Absurd, clock: FakeClock) -> None:
    app.create_queue("other")
    app.emit_event("first", {"n": 1})
    clock.advance(1)
    app.emit_event("second", None, queue_name="other")
    clock.advance(1)
    app.emit_event("third", [3])
    listed = app.list_events()
    assert [(e.event_name, e.queue_name, e.payload) for e in listed] == [
        ("third", "default", [3]),
        ("second", "other", None),
        ("first", "default", {"n": 1}),
    ]
    assert [e.event_name for e in app.list_events(queue="default")] == ["third", "first"]
    assert [e.event_name for e in app.list_events(limit=1)] == ["third"]
    older = app.list_events(before=listed[0].emitted_at)
    assert [e.event_name for e in older] == ["second", "first"]
    with pytest.raises(QueueNotFound):
        app.list_events(queue="missing")
    with pytest.raises(InvalidArgument):
        app.list_events(before=datetime(2026, 1, 1))  # naive


def test_list_waits_says_who_waits_on_what(app: Absurd) -> None:
    @app.register_task("waiter")
    def waiter(params: Any, ctx: TaskContext) -> Any:
        return ctx.await_event(params["event"], timeout=params.get("timeout"))

    first = app.spawn("waiter", {"event": "paid:1"})
    second = app.spawn("waiter", {"event": "paid:2", "timeout": 30})
    app.work_batch("w", batch_size=2)
    waits = app.list_waits()
    assert {(w.task_id, w.event_name, w.task_name) for w in waits} == {
        (first.task_id, "paid:1", "waiter"),
        (second.task_id, "paid:2", "waiter"),
    }
    assert {w.event_name: w.timeout_at is None for w in waits} == {"paid:1": True, "paid:2": False}
    app.emit_event("paid:1")
    assert [w.task_id for w in app.list_waits(queue="default")] == [second.task_id]


def test_queue_throughput_per_minute(app: Absurd, clock: FakeClock) -> None:
    app.create_queue("other")
    app.register_task("ok", max_attempts=1)(lambda params, ctx: 1)
    app.register_task("bad", max_attempts=1)(lambda params, ctx: 1 / 0)
    app.register_task("ok-other", queue="other")(lambda params, ctx: 1)
    app.spawn_many([SpawnRequest("ok", {}), SpawnRequest("bad", {})])
    app.work_batch("w", batch_size=2)
    clock.advance(120)  # two minutes later
    app.spawn("ok", {})
    app.spawn("ok-other", {})
    app.work_batch("w")
    app.work_batch("w", queue="other")

    series = app.queue_throughput(minutes=5)
    assert len(series) == 5
    assert [s.minute for s in series] == sorted(s.minute for s in series)
    assert series[-1].minute == clock.now().replace(second=0, microsecond=0)
    assert (series[-1].completed, series[-1].failed) == (2, 0)  # both queues, summed
    assert (series[-3].completed, series[-3].failed) == (1, 1)
    assert sum(s.completed + s.failed for s in series) == 4
    only_default = app.queue_throughput("default", minutes=5)
    assert (only_default[-1].completed, only_default[-1].failed) == (1, 0)
    assert sum(s.completed for s in app.queue_throughput(minutes=1)) == 2
    with pytest.raises(InvalidArgument):
        app.queue_throughput(minutes=0)
