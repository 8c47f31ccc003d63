"""OpenTelemetry tracing: spawn -> run -> steps, one trace across tasks.

Install the extra (``pip install 'absurd_sqla[otel]'``) and pass the hooks::

    from absurd_sqla.otel import tracing_hooks

    app = Absurd(url, hooks=tracing_hooks())         # or AsyncAbsurd

- A spawn makes a short ``spawn <task>`` span (a child of whatever span is
  current, such as the web request's) and stores its trace context in the
  task's headers (W3C ``traceparent`` / ``tracestate``).
- Each run is a ``run <task>`` span whose parent is that spawn span. A retried
  run, a run resumed after a sleep or an event, and a child task spawned with
  ``ctx.spawn`` therefore all join the spawning trace.
- Each step that runs (not one replayed from its checkpoint) is a
  ``step <name>`` span inside its run's.

Spans carry ``absurd.task_id``, ``absurd.task_name``, ``absurd.queue``,
``absurd.run_id``, ``absurd.attempt``; a handler's exception is recorded and
sets the run span's status to error, while a suspension (sleep, awaiting an
event) ends it with ``absurd.outcome = "suspended"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from ._app import Hooks
from ._core import SpawnRequest
from .context_async import AsyncTaskContext
from .errors import TaskSignal

__all__ = ["tracing_hooks"]

TRACER_NAME = "absurd_sqla"


def tracing_hooks(
    *, tracer_provider: TracerProvider | None = None, hooks: Hooks | None = None
) -> Hooks:
    """Hooks that trace spawns, runs and steps, for ``Absurd`` or ``AsyncAbsurd``.

    ``tracer_provider``: default, the global one. ``hooks``: your own hooks,
    kept: your ``before_spawn`` runs first (its headers are traced), your
    ``wrap_task`` / ``wrap_step`` run inside our spans.
    """
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    own = hooks or Hooks()

    def before_spawn(request: SpawnRequest) -> SpawnRequest:
        if own.before_spawn is not None:
            request = own.before_spawn(request)
        attributes: dict[str, str] = {"absurd.task_name": request.task_name}
        if request.queue is not None:
            attributes["absurd.queue"] = request.queue
        if request.parent_task_id is not None:
            attributes["absurd.parent_task_id"] = str(request.parent_task_id)
        with tracer.start_as_current_span(
            f"spawn {request.task_name}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        return dataclasses.replace(request, headers={**(request.headers or {}), **carrier})

    @contextmanager
    def run_span(ctx: Any) -> Iterator[trace.Span]:
        parent = propagate.extract(dict(ctx.headers or {}))
        attributes = {
            "absurd.task_id": str(ctx.task_id),
            "absurd.task_name": ctx.task_name,
            "absurd.queue": ctx.queue_name,
            "absurd.run_id": str(ctx.run_id),
            "absurd.attempt": ctx.attempt,
        }
        with tracer.start_as_current_span(
            f"run {ctx.task_name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except TaskSignal as signal:
                span.set_attribute("absurd.outcome", _outcome(signal))
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.set_attribute("absurd.outcome", "failed")
                raise
            span.set_attribute("absurd.outcome", "completed")

    @contextmanager
    def step_span(name: str) -> Iterator[None]:
        with tracer.start_as_current_span(f"step {name}", attributes={"absurd.step": name}):
            yield

    def wrap_task(ctx: Any, call: Callable[[], Any]) -> Any:
        inner = _inner(own.wrap_task, ctx, call)
        if isinstance(ctx, AsyncTaskContext):
            return _async_in(run_span(ctx), inner)
        with run_span(ctx):
            return inner()

    def wrap_step(ctx: Any, name: str, call: Callable[[], Any]) -> Any:
        inner = _inner_step(own.wrap_step, ctx, name, call)
        if isinstance(ctx, AsyncTaskContext):
            return _async_in(step_span(name), inner)
        with step_span(name):
            return inner()

    return Hooks(before_spawn=before_spawn, wrap_task=wrap_task, wrap_step=wrap_step)


def _outcome(signal: TaskSignal) -> str:
    return {"SuspendTask": "suspended", "CancelledTask": "cancelled"}.get(
        type(signal).__name__, "lease-lost"
    )


def _inner(wrap: Callable[..., Any] | None, ctx: Any, call: Callable[[], Any]) -> Callable[[], Any]:
    return call if wrap is None else (lambda: wrap(ctx, call))


def _inner_step(
    wrap: Callable[..., Any] | None, ctx: Any, name: str, call: Callable[[], Any]
) -> Callable[[], Any]:
    return call if wrap is None else (lambda: wrap(ctx, name, call))


async def _async_in(span: Any, call: Callable[[], Any]) -> Any:
    """Await ``call()`` inside ``span`` (a context manager), in this task's context."""
    with span:
        return await call()
