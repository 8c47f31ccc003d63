"""The operating commands of ``absurd-sqla``: queues, tasks, show, spawn, emit,
cancel, retry, cleanup, stats. Each takes the client and the parsed arguments
and returns what to print: ``Output(text, data)``; ``--json`` prints ``data``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _render as render
from ._inspect import TaskDetail, WaitInfo
from .client import Absurd
from .models import TASK_STATES


@dataclass(frozen=True, slots=True)
class Output:
    text: str
    data: Any


class UsageError(Exception):
    """Bad input the command line caught: exit code 2."""


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register the operating commands; ``command(name, help)`` makes each
    one's parser (the command line adds its common options)."""
    queues = command("queues", "list queues with task counts; create, drop")
    queues.add_argument("action", nargs="?", choices=["list", "create", "drop"], default="list")
    queues.add_argument("name", nargs="?", help="the queue to create or drop")
    queues.add_argument(
        "--yes", action="store_true", help="drop: confirm deleting the queue and all its tasks"
    )
    queues.set_defaults(run=queues_command)

    tasks = command("tasks", "list tasks, newest first")
    tasks.add_argument("--queue")
    tasks.add_argument("--state", choices=TASK_STATES)
    tasks.add_argument("--name", help="task name")
    tasks.add_argument("--since", help="a duration ago (2h, 30m, 7d) or an ISO 8601 time")
    tasks.add_argument("--limit", type=int, default=50)
    tasks.add_argument("--after", help="the next_cursor of the previous page")
    tasks.set_defaults(run=tasks_command)

    show = command("show", "one task: runs, failures, checkpoints, wait")
    show.add_argument("task_id")
    show.set_defaults(run=show_command)

    spawn = command("spawn", "spawn a task")
    spawn.add_argument("task_name")
    spawn.add_argument("--params", default="null", help="JSON (default: null)")
    spawn.add_argument("--queue")
    spawn.add_argument("--headers", help="JSON object")
    spawn.add_argument("--max-attempts", type=int)
    spawn.add_argument("--idempotency-key")
    spawn.add_argument("--run-after", help="a duration from now (90s, 2h)")
    spawn.set_defaults(run=spawn_command)

    emit = command("emit", "emit an event")
    emit.add_argument("event_name")
    emit.add_argument("--payload", default="null", help="JSON (default: null)")
    emit.add_argument("--queue")
    emit.set_defaults(run=emit_command)

    cancel = command("cancel", "cancel a task")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason")
    cancel.set_defaults(run=cancel_command)

    retry = command("retry", "run a failed task again")
    retry.add_argument("task_id")
    retry.add_argument("--max-attempts", type=int)
    retry.add_argument("--spawn-new", action="store_true", help="as a new task")
    retry.set_defaults(run=retry_command)

    cleanup = command("cleanup", "delete old finished tasks and events")
    cleanup.add_argument("--older-than", default="7d", help="a duration (default: 7d)")
    cleanup.add_argument("--queue", help="default: every queue")
    cleanup.add_argument("--batch", type=int, default=1000, help="rows per statement")
    cleanup.set_defaults(run=cleanup_command)

    stats = command("stats", "per queue: states, oldest due, recent finishes")
    stats.add_argument("--queue")
    stats.add_argument(
        "--watch", nargs="?", type=float, const=2.0, help="refresh every N seconds (default 2)"
    )
    stats.add_argument("--count", type=int, help=argparse.SUPPRESS)  # --watch frames, for tests
    stats.set_defaults(run=stats_command, watchable=True)


def _parsed(kind: str, parse: Callable[[str], Any], text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{kind}: {exc}") from None


# -- queues ----------------------------------------------------------------------

_STATE_COLUMNS = ["pending", "running", "sleeping", "completed", "failed", "cancelled"]


def queues_command(app: Absurd, args: argparse.Namespace) -> Output:
    if args.action in ("create", "drop"):
        if not args.name:
            raise UsageError(f"queues {args.action} needs a queue name")
        if args.action == "create":
            app.create_queue(args.name)
            return Output(f"created queue {args.name}", {"created": args.name})
        if not args.yes:
            raise UsageError(
                f"dropping {args.name!r} deletes every task of it: run again with --yes"
            )
        app.drop_queue(args.name)
        return Output(f"dropped queue {args.name}", {"dropped": args.name})
    stats = app.queue_stats()
    rows = [
        [s.queue_name, *(s.counts[state] for state in _STATE_COLUMNS), render.age(s.oldest_due_age)]
        for s in stats
    ]
    text = render.table(["queue", *_STATE_COLUMNS, "oldest due"], rows)
    return Output(text, [render.plain(s) for s in stats])


# -- tasks -----------------------------------------------------------------------


def _wait_text(wait: WaitInfo | None) -> str:
    if wait is None:
        return ""
    if wait.kind == "event":
        until = f" (timeout {render.when(wait.until)})" if wait.until else ""
        return f"event {wait.event_name}{until}"
    if wait.kind == "task":
        return f"task {wait.task_id}"
    return f"{wait.kind} until {render.when(wait.until)}"


def tasks_command(app: Absurd, args: argparse.Namespace) -> Output:
    page = app.list_tasks(
        queue=args.queue,
        state=args.state,
        task_name=args.name,
        since=_parsed("--since", render.parse_since, args.since),
        limit=args.limit,
        after=args.after,
    )
    rows = [
        [
            t.task_id,
            t.task_name,
            t.queue_name,
            t.state,
            t.attempts,
            render.when(t.created_at),
            render.when(t.finished_at) if t.finished_at else _wait_text(t.waiting_for),
        ]
        for t in page
    ]
    text = render.table(
        ["task_id", "name", "queue", "state", "attempts", "created", "finished / waits for"], rows
    )
    if page.next_cursor is not None:
        text += f"\nmore: --after {page.next_cursor}"
    data = {"tasks": render.plain(page.tasks), "next_cursor": render.plain(page.next_cursor)}
    return Output(text, data)


def show_command(app: Absurd, args: argparse.Namespace) -> Output:
    task = app.get_task(args.task_id)
    return Output(describe(task), render.plain(task))


def describe(task: TaskDetail) -> str:
    """The ``show`` view: the task, its wait, runs (with tracebacks), steps."""
    lines = [
        f"task      {task.task_id}",
        f"name      {task.task_name}",
        f"queue     {task.queue_name}",
        f"state     {task.state}",
        f"attempts  {task.attempts} (max {task.max_attempts or 'unlimited'})",
        f"created   {render.when(task.created_at)}",
        f"started   {render.when(task.started_at)}",
        f"finished  {render.when(task.finished_at)}",
        f"params    {render.short(task.params, 200)}",
    ]
    if task.headers:
        lines.append(f"headers   {render.short(task.headers, 200)}")
    if task.parent_id:
        lines.append(f"parent    {task.parent_id}")
    if task.waiting_for:
        lines.append(f"waits for {_wait_text(task.waiting_for)}")
    if task.state == "completed":
        lines.append(f"result    {render.short(task.result, 200)}")
    if task.failure:
        lines.append(f"failure   {task.failure.get('name')}: {task.failure.get('message')}")
    if task.cancel_reason:
        lines.append(f"cancelled {task.cancel_reason}")
    lines += ["", "runs"]
    lines.append(
        render.table(
            ["attempt", "state", "worker", "started", "finished", "failure"],
            [
                [
                    r.attempt,
                    r.state,
                    r.worker or "-",
                    render.when(r.started_at),
                    render.when(r.finished_at),
                    f"{r.failure.get('name')}: {r.failure.get('message')}" if r.failure else "",
                ]
                for r in task.runs
            ],
        )
    )
    traces = [(r.attempt, (r.failure or {}).get("traceback")) for r in task.runs]
    traces = [(attempt, trace) for attempt, trace in traces if trace]
    if traces:  # the latest; --json has every run's
        attempt, trace = traces[-1]
        lines += ["", f"traceback of attempt {attempt}", str(trace).rstrip()]
    lines += ["", "checkpoints"]
    lines.append(
        render.table(
            ["name", "written", "value"],
            [[c.name, render.when(c.updated_at), render.short(c.value)] for c in task.checkpoints],
        )
    )
    if task.children:
        lines += ["", "children"]
        lines.append(
            render.table(
                ["task_id", "name", "queue", "state"],
                [[c.task_id, c.task_name, c.queue_name, c.state] for c in task.children],
            )
        )
    return "\n".join(lines)


# -- writes ----------------------------------------------------------------------


def spawn_command(app: Absurd, args: argparse.Namespace) -> Output:
    spawned = app.spawn(
        args.task_name,
        _parsed("--params", lambda t: render.parse_json("--params", t), args.params),
        queue=args.queue,
        headers=_parsed("--headers", lambda t: render.parse_json("--headers", t), args.headers),
        max_attempts=args.max_attempts,
        idempotency_key=args.idempotency_key,
        run_after=_parsed("--run-after", render.parse_duration, args.run_after),
    )
    verb = "spawned" if spawned.created else "already spawned (idempotency key)"
    return Output(f"{verb} task {spawned.task_id}", render.plain(spawned))


def emit_command(app: Absurd, args: argparse.Namespace) -> Output:
    payload = _parsed("--payload", lambda t: render.parse_json("--payload", t), args.payload)
    first = app.emit_event(args.event_name, payload, queue_name=args.queue)
    text = f"emitted {args.event_name}" if first else f"{args.event_name} was already emitted"
    return Output(text, {"event_name": args.event_name, "first": first})


def cancel_command(app: Absurd, args: argparse.Namespace) -> Output:
    cancelled = app.cancel_task(args.task_id, args.reason)
    text = f"cancelled task {args.task_id}" if cancelled else "the task had already finished"
    return Output(text, {"task_id": args.task_id, "cancelled": cancelled})


def retry_command(app: Absurd, args: argparse.Namespace) -> Output:
    spawned = app.retry_task(args.task_id, max_attempts=args.max_attempts, spawn_new=args.spawn_new)
    if args.spawn_new:
        text = f"spawned task {spawned.task_id} to retry {args.task_id}"
    else:
        text = f"task {spawned.task_id} will run again (run {spawned.run_id})"
    return Output(text, render.plain(spawned))


def cleanup_command(app: Absurd, args: argparse.Namespace) -> Output:
    older = _parsed("--older-than", render.parse_duration, args.older_than)
    names = [args.queue] if args.queue else app.list_queues()
    totals: dict[str, dict[str, int]] = {}
    for name in names:
        deleted_tasks = deleted_events = 0
        while True:
            tasks, events = app.cleanup(name, older_than=older, limit=args.batch)
            deleted_tasks += tasks
            deleted_events += events
            if tasks < args.batch and events < args.batch:
                break
        totals[name] = {"tasks": deleted_tasks, "events": deleted_events}
    rows = [[name, t["tasks"], t["events"]] for name, t in totals.items()]
    text = render.table(["queue", "tasks deleted", "events deleted"], rows)
    return Output(text, totals)


# -- stats -----------------------------------------------------------------------


def stats_command(app: Absurd, args: argparse.Namespace) -> Output:
    stats = app.queue_stats(args.queue)
    rows = [
        [
            s.queue_name,
            s.counts["pending"],
            s.counts["running"],
            s.counts["sleeping"],
            render.age(s.oldest_due_age),
            s.completed_last_minute,
            s.failed_last_minute,
            s.completed_last_hour,
            s.failed_last_hour,
        ]
        for s in stats
    ]
    text = render.table(
        [
            "queue",
            "pending",
            "running",
            "sleeping",
            "oldest due",
            "done/1m",
            "failed/1m",
            "done/1h",
            "failed/1h",
        ],
        rows,
    )
    return Output(text, [render.plain(s) for s in stats])
