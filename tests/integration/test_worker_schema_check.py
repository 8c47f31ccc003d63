"""A worker refuses to start on a database whose absurd schema is not at our
head, and says which command fixes it (sync, async, and the command line)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from absurd_sqla import Absurd, AsyncAbsurd, SchemaNotCurrent, migrate


@pytest.fixture
def behind(fresh_database: str) -> str:
    """A database migrated to our first revision only."""
    migrate.upgrade(fresh_database, "absurd_0001_initial")
    return fresh_database


def test_the_thread_worker_refuses_a_schema_behind(behind: str) -> None:
    app = Absurd(behind)
    try:
        with pytest.raises(SchemaNotCurrent, match="absurd-sqla migrate"):
            app.start_worker(poll_interval=0.05)
    finally:
        app.close()


def test_the_async_worker_refuses_a_schema_behind(behind: str) -> None:
    async def scenario() -> None:
        app = AsyncAbsurd(behind)
        try:
            with pytest.raises(SchemaNotCurrent, match="absurd-sqla migrate"):
                await app.start_worker(poll_interval=0.05)
        finally:
            await app.close()

    asyncio.run(scenario())


def test_the_worker_command_says_how_to_fix_it(behind: str, tmp_path: Path) -> None:
    (tmp_path / "behind_tasks.py").write_text(
        "import os\nfrom absurd_sqla import Absurd\n"
        "app = Absurd(os.environ['ABSURD_DATABASE_URL'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "absurd_sqla", "worker", "behind_tasks:app"],
        cwd=tmp_path,
        env={**os.environ, "ABSURD_DATABASE_URL": behind},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("absurd-sqla: ") and "absurd-sqla migrate" in last
    assert "Traceback" not in done.stderr
    migrate.upgrade(behind)  # fixed as told: now it is current
    engine = create_engine(behind)
    try:
        assert migrate.schema_status(engine).is_current
    finally:
        engine.dispose()
