"""A pooled connection the server closed while it sat idle is replaced on
checkout, found by a look at its socket, not by a round trip
(``discard_closed_connections``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError

from absurd_sqla import Absurd, AsyncAbsurd, discard_closed_connections
from absurd_sqla._engine import _refuse_closed
from tests.integration.test_connection_errors import terminate


def named(url: str) -> tuple[str, str]:
    name = f"absurd-test-{uuid.uuid4().hex[:8]}"
    return name, f"{url}?application_name={name}"


def backends(observer: Engine, name: str) -> list[int]:
    with observer.connect() as conn:
        return list(
            conn.scalars(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"), {"n": name}
            )
        )


def pooled_pid(engine: Engine) -> int:
    """Check a connection out, note its backend, and put it back in the pool."""
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT pg_backend_pid()")) or 0)


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ``pool_pre_ping`` round trip, counted."""
    calls: list[Any] = []
    from sqlalchemy.dialects.postgresql._psycopg_common import _PGDialect_common_psycopg

    real = _PGDialect_common_psycopg.do_ping

    def counting(self: Any, dbapi_connection: Any) -> Any:
        calls.append(dbapi_connection)
        return real(self, dbapi_connection)

    monkeypatch.setattr(_PGDialect_common_psycopg, "do_ping", counting)
    return calls


def test_a_url_engine_replaces_a_closed_connection_without_pinging(
    clean_db: Engine, database_url: str, pings: list[Any]
) -> None:
    name, url = named(database_url)
    app = Absurd(url)
    try:
        app.create_queue()
        first = app.spawn("t")  # the pool now holds one idle connection
        killed = backends(clean_db, name)
        assert killed
        terminate(clean_db, killed)
        second = app.spawn("t")  # would fail on the dead connection
        assert second.task_id != first.task_id
        assert not set(backends(clean_db, name)) & set(killed)
        assert pings == []  # no round trip spent on any checkout
    finally:
        app.close()


def test_an_engine_passed_in_gets_it_on_request(clean_db: Engine, database_url: str) -> None:
    _, url = named(database_url)
    engine = create_engine(url, pool_size=1)
    try:
        killed = [pooled_pid(engine)]
        terminate(clean_db, killed)
        with pytest.raises(OperationalError):  # as configured: no check on checkout
            pooled_pid(engine)
        killed = [pooled_pid(engine)]
        discard_closed_connections(engine)
        discard_closed_connections(engine)  # idempotent: one listener
        assert event.contains(engine, "checkout", _refuse_closed)
        terminate(clean_db, killed)
        assert pooled_pid(engine) not in killed  # replaced, not handed out
        alive = pooled_pid(engine)
        assert pooled_pid(engine) == alive  # a healthy connection is kept
    finally:
        engine.dispose()


def test_an_async_url_engine_replaces_a_closed_connection(
    clean_db: Engine, database_url: str, pings: list[Any]
) -> None:
    name, url = named(database_url)

    async def scenario() -> None:
        app = AsyncAbsurd(url)
        try:
            await app.create_queue()
            await app.spawn("t")
            killed = await asyncio.to_thread(backends, clean_db, name)
            assert killed
            await asyncio.to_thread(terminate, clean_db, killed)
            await app.spawn("t")
            assert not set(await asyncio.to_thread(backends, clean_db, name)) & set(killed)
        finally:
            await app.close()

    asyncio.run(scenario())
    assert pings == []
