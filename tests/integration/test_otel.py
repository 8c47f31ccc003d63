"""absurd_sqla.otel: spawn -> run -> steps in one trace, across child tasks and
retries, on Absurd and AsyncAbsurd, with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import Engine

from absurd_sqla import Absurd, Hooks, SpawnRequest, TaskContext
from absurd_sqla.otel import tracing_hooks
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.support import async_app_for, run_async


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def by_name(spans: Any) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_spawn_run_steps_and_a_child_share_one_trace(
    clean_db: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    spawned_by: list[Any] = []

    def remember(request: SpawnRequest) -> SpawnRequest:
        spawned_by.append(request.parent_task_id)
        return request

    app = Absurd(clean_db, hooks=tracing_hooks(tracer_provider=provider, hooks=Hooks(remember)))
    app.create_queue()

    @app.register_task("child")
    def child(params: Any, ctx: TaskContext) -> int:
        return ctx.step("compute", lambda: 42)

    @app.register_task("parent")
    def parent(params: Any, ctx: TaskContext) -> Any:
        ctx.step("prepare", lambda: "ready")
        kid = ctx.spawn("child", {})
        return ctx.await_task_result(kid.task_id).result

    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("web request") as request_span:
        spawned = app.spawn("parent", {})
    run_until_idle(app)
    assert app.fetch_task_result(spawned.task_id).result == 42  # type: ignore[union-attr]
    assert spawned_by == [None, spawned.task_id]  # before_spawn learns who spawns

    spans = by_name(exporter.get_finished_spans())
    trace_id = request_span.get_span_context().trace_id
    assert {s.context.trace_id for group in spans.values() for s in group} == {trace_id}
    (spawn_parent,) = spans["spawn parent"]
    assert parent_of(spawn_parent) == request_span.get_span_context().span_id
    parent_runs = spans["run parent"]
    assert len(parent_runs) == 2  # suspended awaiting the child, then resumed
    assert all(parent_of(run) == spawn_parent.context.span_id for run in parent_runs)
    assert [r.attributes["absurd.outcome"] for r in parent_runs] == ["suspended", "completed"]
    assert parent_runs[0].attributes["absurd.task_id"] == str(spawned.task_id)
    # The step ran once, inside the first run; the replay made no span.
    (prepare,) = spans["step prepare"]
    assert parent_of(prepare) == parent_runs[0].context.span_id
    (spawn_child,) = spans["spawn child"]
    assert parent_of(spawn_child) == parent_runs[0].context.span_id
    assert spawn_child.attributes["absurd.parent_task_id"] == str(spawned.task_id)
    (child_run,) = spans["run child"]
    assert parent_of(child_run) == spawn_child.context.span_id
    (compute,) = spans["step compute"]
    assert parent_of(compute) == child_run.context.span_id


def test_a_failure_is_an_error_and_the_retry_joins_the_trace(
    clean_db: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = Absurd(clean_db, hooks=tracing_hooks(tracer_provider=provider))
    app.create_queue()

    @app.register_task("flaky", max_attempts=2, retry_strategy={"kind": "none"})
    def flaky(params: Any, ctx: TaskContext) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return "ok"

    app.spawn("flaky", {})
    run_until_idle(app)
    spans = by_name(exporter.get_finished_spans())
    (spawn,) = spans["spawn flaky"]
    first, second = sorted(spans["run flaky"], key=lambda s: s.attributes["absurd.attempt"])
    assert first.status.status_code is StatusCode.ERROR
    assert "first try fails" in (first.status.description or "")
    assert first.events[0].name == "exception"
    assert second.status.status_code is StatusCode.UNSET
    assert second.attributes["absurd.outcome"] == "completed"
    assert parent_of(first) == parent_of(second) == spawn.context.span_id
    assert first.context.trace_id == second.context.trace_id == spawn.context.trace_id


def test_the_callers_own_hooks_still_run_inside_the_spans(
    clean_db: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    seen: list[str] = []

    def wrap_task(ctx: Any, call: Any) -> Any:
        seen.append("task")
        return call()

    def wrap_step(ctx: Any, name: str, call: Any) -> Any:
        seen.append(f"step {name}")
        return call()

    hooks = Hooks(wrap_task=wrap_task, wrap_step=wrap_step)
    app = Absurd(clean_db, hooks=tracing_hooks(tracer_provider=provider, hooks=hooks))
    app.create_queue()
    app.register_task("t")(lambda params, ctx: ctx.step("s", lambda: 1))
    app.spawn("t", {})
    run_until_idle(app)
    assert seen == ["task", "step s"]
    assert set(by_name(exporter.get_finished_spans())) == {"spawn t", "run t", "step s"}


@run_async
async def test_the_async_client_is_traced_alike(
    clean_db: Engine, database_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with async_app_for(database_url, hooks=tracing_hooks(tracer_provider=provider)) as app:

        @app.register_task("nap")
        async def nap(params: Any, ctx: Any) -> str:
            async def before() -> str:
                return "b"

            await ctx.step("before", before)
            await ctx.sleep_for("nap", 60)
            return "done"

        with FakeClock(app.engine) as clock:
            spawned = await app.spawn("nap", {})
            await run_until_idle(app)
            clock.advance(61)
            await run_until_idle(app)
        snapshot = await app.fetch_task_result(spawned.task_id)
        assert snapshot is not None and snapshot.result == "done"

    spans = by_name(exporter.get_finished_spans())
    (spawn,) = spans["spawn nap"]
    runs = spans["run nap"]
    assert [r.attributes["absurd.outcome"] for r in runs] == ["suspended", "completed"]
    assert all(parent_of(r) == spawn.context.span_id for r in runs)
    (step,) = spans["step before"]
    assert parent_of(step) == runs[0].context.span_id
