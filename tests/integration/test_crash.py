"""A worker process killed with SIGKILL mid-task: the next attempt resumes from
the committed checkpoints, and no finished step runs again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from absurd_sqla import Absurd
from absurd_sqla.context import TaskContext
from absurd_sqla.testing import FakeClock, run_until_idle
from tests.internals import sweep_expired

WORKER_SCRIPT = """
import sys, time
from sqlalchemy import create_engine, text
from absurd_sqla import Absurd

url = sys.argv[1]
app = Absurd(url)
effects = create_engine(url)

def record(name):
    with effects.begin() as conn:
        conn.execute(text("INSERT INTO crash_effects (step) VALUES (:s)"), {"s": name})

@app.register_task("crashy")
def crashy(params, ctx):
    ctx.step("first", lambda: record("first") or "one")
    def hang():
        record("second-started")
        time.sleep(3600)  # killed here, before the step can checkpoint
    ctx.step("second", hang)

app.work_batch(claim_timeout=60)
"""


def effects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT step FROM crash_effects ORDER BY id")))


def test_sigkilled_worker_is_recovered_without_redoing_steps(
    app: Absurd, clean_db: Engine, tmp_path: Path
) -> None:
    with clean_db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS crash_effects"))
        conn.execute(text("CREATE TABLE crash_effects (id serial PRIMARY KEY, step text)"))
    spawned = app.spawn("crashy", {})
    script = tmp_path / "crash_worker.py"
    script.write_text(WORKER_SCRIPT)
    url = clean_db.url.render_as_string(hide_password=False)
    worker = subprocess.Popen([sys.executable, str(script), url])
    try:
        deadline = time.monotonic() + 30
        while "second-started" not in effects(clean_db):  # wait on a condition
            assert worker.poll() is None, "worker exited early"
            assert time.monotonic() < deadline, "worker never reached the second step"
            time.sleep(0.01)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)

    # The run is still "running" under a lease nobody will renew.
    clock = FakeClock(clean_db)
    try:
        clock.advance(61)
        assert sweep_expired(app, "default") == 1
        calls: list[str] = []

        @app.register_task("crashy")
        def crashy(params: Any, ctx: TaskContext) -> str:
            first = ctx.step("first", lambda: calls.append("first") or "again")
            second = ctx.step("second", lambda: calls.append("second") or "two")
            return f"{first}+{second}"

        run_until_idle(app)
    finally:
        clock.close()
    snapshot = app.fetch_task_result(spawned.task_id)
    assert snapshot is not None and snapshot.state == "completed"
    assert snapshot.result == "one+two"  # "first" replayed from its checkpoint
    assert calls == ["second"]
    assert effects(clean_db) == ["first", "second-started"]
    with clean_db.connect() as conn:
        attempts = list(
            conn.execute(
                text(
                    "SELECT attempt, state, failure_reason->>'name' AS reason FROM absurd.runs "
                    "WHERE task_id = :t ORDER BY attempt"
                ),
                {"t": spawned.task_id},
            )
        )
    assert [(a.attempt, a.state, a.reason) for a in attempts] == [
        (1, "failed", "$ClaimTimeout"),
        (2, "completed", None),
    ]
