"""The operating commands of ``absurd-sqla`` against a real database: the text
tables, the ``--json`` shapes, and the exit codes (0 done, 1 refused, 2 bad input,
3 database unreachable, 4 not found)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text

from absurd_sqla import Absurd, TaskContext
from absurd_sqla.cli import main

TASK_KEYS = {
    "task_id",
    "task_name",
    "queue_name",
    "state",
    "attempts",
    "max_attempts",
    "created_at",
    "started_at",
    "finished_at",
    "waiting_for",
}


@pytest.fixture
def cli(app: Absurd, database_url: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run the command in this process: ``cli("tasks", "--json")`` returns
    (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--database-url", database_url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def as_json(output: str) -> Any:
    return json.loads(output)


@pytest.fixture
def failed_task(app: Absurd) -> uuid.UUID:
    @app.register_task("breaks", max_attempts=1)
    def breaks(params: Any, ctx: TaskContext) -> None:
        ctx.step("before", lambda: {"got": params})
        raise RuntimeError("it broke")

    spawned = app.spawn("breaks", {"n": 1})
    app.work_batch("cli-worker")
    return spawned.task_id


def test_tasks_lists_in_text_and_json(cli: Any, app: Absurd, failed_task: uuid.UUID) -> None:
    app.spawn("later", {})
    code, out, _ = cli("tasks")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["task_id", "name", "queue", "state"]
    assert rows[1].split()[:4] == [str(failed_task), "breaks", "default", "failed"]

    code, out, _ = cli("tasks", "--state", "failed", "--json")
    data = as_json(out)
    assert code == 0 and data["next_cursor"] is None
    assert [t["task_id"] for t in data["tasks"]] == [str(failed_task)]
    assert set(data["tasks"][0]) == TASK_KEYS

    code, out, _ = cli("tasks", "--limit", "1", "--json")
    first = as_json(out)
    assert len(first["tasks"]) == 1 and first["next_cursor"] == first["tasks"][0]["task_id"]
    code, out, _ = cli("tasks", "--limit", "1", "--after", first["next_cursor"], "--json")
    assert [t["task_id"] for t in as_json(out)["tasks"]] == [str(failed_task)]

    code, out, _ = cli("tasks", "--since", "1h", "--name", "later", "--json")
    assert [t["task_name"] for t in as_json(out)["tasks"]] == ["later"]


def test_show_has_runs_tracebacks_and_checkpoints(cli: Any, failed_task: uuid.UUID) -> None:
    code, out, _ = cli("show", str(failed_task))
    assert code == 0
    assert "state     failed" in out
    assert "failure   RuntimeError: it broke" in out
    assert "cli-worker" in out
    assert "traceback of attempt 1" in out and 'raise RuntimeError("it broke")' in out
    assert "before" in out and '{"got": {"n": 1}}' in out

    code, out, _ = cli("show", str(failed_task), "--json")
    data = as_json(out)
    assert data["state"] == "failed" and data["failure"]["name"] == "RuntimeError"
    assert [r["worker"] for r in data["runs"]] == ["cli-worker"]
    assert data["checkpoints"][0]["name"] == "before"
    assert data["checkpoints"][0]["value"] == {"got": {"n": 1}}


def test_spawn_emit_cancel_retry(cli: Any, app: Absurd, failed_task: uuid.UUID) -> None:
    code, out, _ = cli("spawn", "welcome", "--params", '{"user": 7}', "--json")
    assert code == 0
    spawned = as_json(out)
    assert spawned["created"] is True
    task = app.get_task(spawned["task_id"])
    assert (task.task_name, task.params) == ("welcome", {"user": 7})

    code, out, _ = cli("spawn", "welcome", "--idempotency-key", "k", "--run-after", "2h")
    assert code == 0 and out.startswith("spawned task ")
    code, out, _ = cli("spawn", "welcome", "--idempotency-key", "k")
    assert code == 0 and out.startswith("already spawned")

    code, out, _ = cli("emit", "paid", "--payload", '{"amount": 5}', "--json")
    assert code == 0 and as_json(out) == {"event_name": "paid", "first": True}
    code, out, _ = cli("emit", "paid")
    assert code == 0 and "already emitted" in out

    code, out, _ = cli("cancel", spawned["task_id"], "--reason", "duplicate signup")
    assert code == 0 and out.startswith("cancelled task")
    assert app.get_task(spawned["task_id"]).cancel_reason == "duplicate signup"
    code, out, _ = cli("cancel", spawned["task_id"], "--json")
    assert code == 0 and as_json(out)["cancelled"] is False

    code, out, _ = cli("retry", str(failed_task), "--json")
    assert code == 0 and as_json(out)["task_id"] == str(failed_task)
    assert app.get_task(failed_task).state == "pending"
    code, _, err = cli("retry", str(failed_task))  # pending now: not retryable
    assert code == 1 and err.startswith("absurd-sqla: ") and len(err.splitlines()) == 1


def test_queues_and_stats(cli: Any, app: Absurd, failed_task: uuid.UUID) -> None:
    code, out, _ = cli("queues", "create", "emails")
    assert code == 0 and "created queue emails" in out
    code, out, _ = cli("queues", "--json")
    data = {q["queue_name"]: q for q in as_json(out)}
    assert sorted(data) == ["default", "emails"]
    assert data["default"]["counts"]["failed"] == 1
    code, out, _ = cli("queues")
    assert out.splitlines()[0].split()[:3] == ["queue", "pending", "running"]

    code, out, _ = cli("stats", "--queue", "default", "--json")
    (default,) = as_json(out)
    assert default["failed_last_minute"] == 1 and default["failed_last_hour"] == 1
    code, out, _ = cli("stats")
    assert code == 0 and "failed/1m" in out.splitlines()[0]
    code, out, _ = cli("stats", "--watch", "0.01", "--count", "2")
    assert code == 0 and out.count("failed/1m") == 2

    code, _, err = cli("queues", "drop", "emails")
    assert code == 2 and "--yes" in err and "emails" in app.list_queues()
    code, out, _ = cli("queues", "drop", "emails", "--yes")
    assert code == 0 and "emails" not in app.list_queues()


def test_cleanup_deletes_in_batches_until_done(cli: Any, app: Absurd, clean_db: Engine) -> None:
    app.register_task("quick")(lambda params, ctx: None)
    for _ in range(5):
        app.spawn("quick", {})
    app.work_batch("w", batch_size=5)
    code, out, _ = cli("cleanup", "--older-than", "1d", "--json")
    assert code == 0 and as_json(out)["default"] == {"tasks": 0, "events": 0}
    with clean_db.begin() as conn:  # finished two days ago, as far as cleanup can tell
        conn.execute(text("UPDATE absurd.tasks SET finished_at = finished_at - interval '2 days'"))
    code, out, _ = cli("cleanup", "--older-than", "1d", "--batch", "2", "--json")
    assert code == 0 and as_json(out)["default"] == {"tasks": 5, "events": 0}
    assert app.list_tasks().tasks == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "not-a-uuid"], 2, "task_id"),
        (["show", str(uuid.UUID(int=1))], 4, "not found"),
        (["tasks", "--since", "yesterday-ish"], 2, "--since"),
        (["tasks", "--limit", "0"], 2, "limit"),
        (["spawn", "x", "--params", "{oops"], 2, "--params is not valid JSON"),
        (["spawn", "x", "--queue", "nope"], 4, "does not exist"),
        (["spawn", "x", "--run-after", "soon"], 2, "not a duration"),
        (["emit", "e", "--queue", "bad queue!"], 2, "invalid queue name"),
        (["cleanup", "--older-than", "forever"], 2, "--older-than"),
        (["stats", "--queue", "nope"], 4, "does not exist"),
        (["queues", "create"], 2, "needs a queue name"),
    ],
)
def test_bad_input_is_one_line_and_a_meaningful_exit(
    cli: Any, args: list[str], code: int, message: str
) -> None:
    got, out, err = cli(*args)
    assert got == code, err
    assert out == ""
    assert err.startswith("absurd-sqla: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "absurd_sqla", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_python_m_absurd_sqla_reads_the_url_from_the_environment(
    app: Absurd, database_url: str
) -> None:
    spawned = app.spawn("from-env", {})
    done = run_module("tasks", "--json", env={"ABSURD_DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    assert [t["task_id"] for t in json.loads(done.stdout)["tasks"]] == [str(spawned.task_id)]


def test_an_unreachable_database_is_one_line_and_exit_3(tmp_path: Any) -> None:
    url = f"postgresql://nobody:secret@/absurd?host={tmp_path}&port=1"  # no server there
    done = run_module("--database-url", url, "tasks")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("absurd-sqla: cannot reach the database")
    assert len(done.stderr.splitlines()) == 1 and "secret" not in done.stderr
