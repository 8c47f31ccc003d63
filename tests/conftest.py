"""Test fixtures: a real PostgreSQL, via pytest-postgresql's DatabaseJanitor.

With ABSURD_DATABASE_URL set the tests use that server (creating and dropping
their own databases on it); otherwise they start a throwaway local server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pytest_postgresql.janitor import DatabaseJanitor
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from absurd_sqla import Absurd, migrate
from absurd_sqla.localpg import LocalPostgres
from absurd_sqla.testing import FakeClock
from tests.support import create_business_tables


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str | None

    def url(self, dbname: str) -> str:
        auth = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{dbname}"

    def janitor(self, dbname: str) -> DatabaseJanitor:
        return DatabaseJanitor(
            user=self.user, host=self.host, port=self.port, dbname=dbname, password=self.password
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("ABSURD_DATABASE_URL")
    if url:
        parsed = make_url(url)
        yield Server(
            parsed.host or "localhost",
            parsed.port or 5432,
            parsed.username or "postgres",
            parsed.password,
        )
        return
    with LocalPostgres() as local:
        parsed = make_url(local)
        yield Server(parsed.host or "127.0.0.1", parsed.port or 5432, "postgres", None)


@pytest.fixture
def fresh_database(pg_server: Server) -> Iterator[str]:
    """An empty database of its own, dropped after the test."""
    name = f"absurd_{uuid.uuid4().hex[:12]}"
    with pg_server.janitor(name):
        yield pg_server.url(name)


@pytest.fixture(scope="session")
def database_url(pg_server: Server) -> Iterator[str]:
    """The shared test database, migrated to head, with the business tables."""
    name = f"absurd_tests_{uuid.uuid4().hex[:8]}"
    with pg_server.janitor(name):
        url = pg_server.url(name)
        migrate.upgrade(url)
        create_business_tables(url)
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(database_url, pool_size=20, max_overflow=10)
    yield eng
    eng.dispose()


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE absurd.queues, absurd.tasks, public.orders CASCADE"))
    return engine


@pytest.fixture
def app(clean_db: Engine) -> Absurd:
    absurd = Absurd(clean_db)
    absurd.create_queue()
    return absurd


@pytest.fixture
def clock(clean_db: Engine) -> Iterator[FakeClock]:
    """The database clock, frozen at the real time and moved by the test."""
    fake = FakeClock(clean_db)
    yield fake
    fake.close()
