"""The ``absurd-sqla`` command, run as a real subprocess against a real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from absurd_sqla import Absurd


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "absurd_sqla.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_current_up_and_down(fresh_database: str) -> None:
    env = {"ABSURD_DATABASE_URL": fresh_database}
    before = run_cli("migrate", "current", env=env)
    assert before.returncode == 3 and "not installed" in before.stdout  # 3: not current

    done = run_cli("migrate", "--database-url", fresh_database)  # upgrade is the default
    assert done.returncode == 0, done.stderr
    engine = create_engine(fresh_database)
    assert "tasks" in inspect(engine).get_table_names(schema="absurd")
    now = run_cli("migrate", "current", "--json", env=env)
    assert now.returncode == 0, now.stderr
    status = json.loads(now.stdout)
    assert status["current"] is True and status["revisions"] == [status["head"]]

    refused = run_cli("migrate", "downgrade", env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "tasks" in inspect(engine).get_table_names(schema="absurd")
    done = run_cli("migrate", "downgrade", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "absurd" not in inspect(engine).get_schema_names()
    engine.dispose()


def test_migrate_with_json_reports_the_schema_it_left(fresh_database: str) -> None:
    env = {"ABSURD_DATABASE_URL": fresh_database}
    up = run_cli("migrate", "upgrade", "--json", env=env)
    assert up.returncode == 0, up.stderr
    status = json.loads(up.stdout)  # stdout is the one JSON object; logs go to stderr
    assert status["current"] is True and status["revisions"] == [status["head"]]
    down = run_cli("migrate", "downgrade", "--yes", "--json", env=env)
    assert down.returncode == 0, down.stderr
    status = json.loads(down.stdout)
    assert status["current"] is False and status["revisions"] == []


def test_migrate_sql_prints_the_ddl_and_changes_nothing(fresh_database: str) -> None:
    done = run_cli("migrate", "--sql", "--database-url", fresh_database)
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE absurd.tasks" in done.stdout
    assert "CREATE INDEX ix_tasks_list_queue" in done.stdout
    engine = create_engine(fresh_database)
    assert "absurd" not in inspect(engine).get_schema_names()
    down = run_cli("migrate", "downgrade", "--sql", "--database-url", fresh_database)
    assert down.returncode == 0, down.stderr
    assert "DROP TABLE absurd.tasks" in down.stdout
    engine.dispose()


APPS = {
    "sync": (
        "import os\n"
        "from absurd_sqla import Absurd\n"
        "app = Absurd(os.environ['ABSURD_DATABASE_URL'])\n"
        "@app.register_task('double')\n"
        "def double(params, ctx):\n"
        "    return ctx.step('x2', lambda: params['n'] * 2)\n"
    ),
    "async": (
        "import os\n"
        "from absurd_sqla import AsyncAbsurd\n"
        "app = AsyncAbsurd(os.environ['ABSURD_DATABASE_URL'])\n"
        "@app.register_task('double')\n"
        "async def double(params, ctx):\n"
        "    async def x2():\n"
        "        return params['n'] * 2\n"
        "    return await ctx.step('x2', x2)\n"
    ),
}


@pytest.mark.parametrize("kind", sorted(APPS))
def test_worker_runs_tasks_and_stops_on_sigterm(
    fresh_database: str, tmp_path: Path, kind: str
) -> None:
    assert run_cli("migrate", "--url", fresh_database).returncode == 0
    (tmp_path / "cli_tasks.py").write_text(APPS[kind])
    client = Absurd(fresh_database)
    client.create_queue()
    spawned = client.spawn("double", {"n": 21})
    worker = subprocess.Popen(
        [sys.executable, "-m", "absurd_sqla.cli", "worker", "cli_tasks:app", "--concurrency", "2"],
        cwd=tmp_path,
        env={**os.environ, "ABSURD_DATABASE_URL": fresh_database},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        snapshot = client.await_task_result(spawned.task_id, timeout=30)
        assert snapshot.state == "completed" and snapshot.result == 42
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    client.close()


def test_bad_app_target_is_a_clear_error() -> None:
    done = run_cli("worker", "no_colon_here")
    assert done.returncode != 0
    assert "MODULE:ATTRIBUTE" in done.stderr


def test_a_target_that_is_not_a_client_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not_a_client.py").write_text("app = object()\n")
    done = subprocess.run(
        [sys.executable, "-m", "absurd_sqla.cli", "worker", "not_a_client:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "is not an absurd_sqla.Absurd or AsyncAbsurd instance" in done.stderr


@pytest.mark.parametrize("kind", sorted(APPS))
def test_worker_log_format_json_writes_one_object_per_line_with_the_run_fields(
    fresh_database: str, tmp_path: Path, kind: str
) -> None:
    assert run_cli("migrate", "--url", fresh_database).returncode == 0
    (tmp_path / "cli_json_tasks.py").write_text(APPS[kind])
    client = Absurd(fresh_database)
    client.create_queue()
    spawned = client.spawn("double", {"n": 21})
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "absurd_sqla.cli",
            "worker",
            "cli_json_tasks:app",
            "--worker-id",
            "json-worker",
            "--log-format",
            "json",
            "--log-level",
            "info",
        ],
        cwd=tmp_path,
        env={**os.environ, "ABSURD_DATABASE_URL": fresh_database},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        snapshot = client.await_task_result(spawned.task_id, timeout=30)
        assert snapshot.state == "completed"
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
        client.close()
    assert worker.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines()]  # each line is one object
    fields = ("task_id", "run_id", "task_name", "queue", "attempt")
    assert all({"time", "level", "logger", "message", *fields} <= set(line) for line in lines)
    (banner,) = [line for line in lines if "json-worker starting" in line["message"]]
    assert banner["level"] == "INFO" and banner["queue"] == "default"
    assert banner["task_id"] is None
    (done,) = [line for line in lines if "completed in" in line["message"]]
    assert {f: done[f] for f in fields} == {
        "task_id": str(spawned.task_id),
        "run_id": str(spawned.run_id),
        "task_name": "double",
        "queue": "default",
        "attempt": 1,
    }
    assert not [line for line in lines if line["level"] == "DEBUG"]  # --log-level info


def test_worker_rejects_an_unknown_log_format() -> None:
    done = run_cli("worker", "cli_tasks:app", "--log-format", "xml")
    assert done.returncode != 0
    assert "--log-format" in done.stderr
