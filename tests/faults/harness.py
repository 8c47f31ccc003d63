"""The machinery of the fault scenarios: a PostgreSQL cluster of their own (it
gets restarted), databases cloned from a migrated template, worker processes
to kill, and waiting for a database condition under a deadline.

Nothing here sleeps in place of a condition: ``poll`` re-reads a condition
every ``POLL`` seconds until a deadline and reports whether it came true.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from absurd_sqla import Absurd, migrate
from absurd_sqla.localpg import LocalPostgres
from tests.faults.tasks import BUSINESS_DDL

REPO = Path(__file__).resolve().parents[2]
POLL = 0.02  # seconds between two reads of a polled condition
WORKER_APP = "tests.faults.worker_app:app"
WORKER_APPLICATION_NAME = "absurd-fault-worker"
TEMPLATE = "absurd_fault_template"


def poll(condition: Callable[[], Any], timeout: float) -> Any:
    """``condition()``'s first truthy value within ``timeout`` seconds, else None.

    A condition that raises a connection error (the server restarting) counts
    as false; the deadline still holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (psycopg.OperationalError, OSError, DBAPIError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)


class FaultCluster:
    """A LocalPostgres the fault scenarios own (and may restart), with a
    migrated template database to clone one database per scenario from."""

    def __init__(self) -> None:
        self.pg = LocalPostgres()
        self._databases = 0

    def start(self) -> FaultCluster:
        self.pg.start()
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        template_url = self.url(TEMPLATE)
        migrate.upgrade(template_url)
        engine = create_engine(template_url)
        with engine.begin() as conn:
            for ddl in BUSINESS_DDL:
                conn.execute(text(ddl))
        Absurd(engine).create_queue()
        engine.dispose()
        return self

    def stop(self) -> None:
        self.pg.stop()

    def url(self, dbname: str) -> str:
        return str(make_url(self.pg.url).set(drivername="postgresql+psycopg", database=dbname))

    def new_database(self) -> str:
        """A fresh migrated database (with the business tables) and its URL."""
        self._databases += 1
        name = f"fault_{self._databases}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)

    # -- the server log --------------------------------------------------------

    def log_offset(self) -> int:
        return self.pg.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.pg.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    def deadlocks_since(self, offset: int) -> int:
        return self.log_since(offset).count("deadlock detected")


def with_application_name(url: str, name: str) -> str:
    return str(make_url(url).update_query_dict({"application_name": name}))


# -- worker processes --------------------------------------------------------------


@dataclass
class WorkerFleet:
    """Worker processes (``absurd-sqla worker``) on one database, to kill and replace."""

    url: str
    log_dir: Path
    concurrency: int = 4
    claim_timeout: float = 3.0
    poll_interval: float = 0.1
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0
    killed: int = 0

    def spawn_worker(self) -> subprocess.Popen[bytes]:
        self.started += 1
        env = {
            **os.environ,
            "ABSURD_FAULT_URL": with_application_name(self.url, WORKER_APPLICATION_NAME),
            "PYTHONPATH": str(REPO),
        }
        log = open(self.log_dir / f"worker-{self.started}.log", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "absurd_sqla.cli",
                    "worker",
                    WORKER_APP,
                    "--worker-id",
                    f"fault-worker-{self.started}",
                    "--concurrency",
                    str(self.concurrency),
                    "--claim-timeout",
                    str(self.claim_timeout),
                    "--poll-interval",
                    str(self.poll_interval),
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def start(self, count: int) -> WorkerFleet:
        for _ in range(count):
            self.spawn_worker()
        return self

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random live worker and start its replacement."""
        victims = self.alive()
        if victims:
            victim = rng.choice(victims)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            self.killed += 1
        self.spawn_worker()

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM every live worker; return the pids of those that did not exit
        within ``timeout`` seconds (they are then killed)."""
        stuck = []
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(proc.pid)
                proc.kill()
                proc.wait(10)
        return stuck

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.log_dir.glob("worker-*.log"))
        )


def worker_backends(engine: Engine) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the worker processes' backends on this database."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = :name"
            ),
            {"name": WORKER_APPLICATION_NAME},
        ).all()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def terminate(engine: Engine, pids: list[int]) -> int:
    if not pids:
        return 0
    with engine.connect() as conn:
        done = conn.scalar(
            text("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(:p) pid"),
            {"p": pids},
        )
        conn.commit()
    return int(done or 0)
