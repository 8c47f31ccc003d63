"""A pooled connection that died while it sat idle is replaced on checkout
(``discard_closed_connections``): one the server closed is found by a look at
its socket, without a round trip; one whose link died without a word is found
by a ping, sent only after it sat idle longer than ``ping_after``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from absurd_sqla import Absurd, AsyncAbsurd, _engine, discard_closed_connections
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


def looks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every look at a socket, counted."""
    calls: list[int] = []
    real = _engine._readable

    def counting(fd: int) -> bool:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(_engine, "_readable", counting)
    return calls


def test_an_engine_passed_in_gets_it_on_request(
    clean_db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = named(database_url)
    engine = create_engine(url, pool_size=1)
    try:
        killed = [pooled_pid(engine)]
        terminate(clean_db, killed)
        with pytest.raises(OperationalError):  # as configured: no check on checkout
            pooled_pid(engine)
        killed = [pooled_pid(engine)]
        discard_closed_connections(engine)
        discard_closed_connections(engine.execution_options(isolation_level="AUTOCOMMIT"))
        polls = looks(monkeypatch)
        terminate(clean_db, killed)
        assert pooled_pid(engine) not in killed  # replaced, not handed out
        alive = pooled_pid(engine)
        assert pooled_pid(engine) == alive  # a healthy connection is kept
        assert len(polls) == 4  # one look per checkout: the second call added nothing
        engine.dispose()  # a new pool, with the same listeners
        discard_closed_connections(engine)
        pooled_pid(engine)
        assert len(polls) == 5
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


# -- a link that dies without a word ---------------------------------------------


class Middlebox:
    """A TCP relay in front of the server that can forget its flows, as a NAT
    gateway or load balancer forgets idle ones: the next packet a client sends
    on a forgotten flow is answered with a reset, and the server never hears."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.flows: list[socket.socket] = []
        self.forgotten: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def forget(self) -> None:
        self.forgotten.update(self.flows)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.flows.append(client)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if source in self.forgotten:
                    # Reset, not close: the client's next read fails at once.
                    source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def middlebox(database_url: str) -> Iterator[tuple[Middlebox, str]]:
    url = make_url(database_url)
    box = Middlebox((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield box, url.set(host="127.0.0.1", port=box.port).render_as_string(hide_password=False)
    finally:
        box.close()


@contextlib.contextmanager
def checked_engine(url: str, **options: Any) -> Iterator[Engine]:
    """A one-connection engine on ``url`` with ``discard_closed_connections(**options)``."""
    engine = create_engine(url, pool_size=1)
    discard_closed_connections(engine, **options)
    try:
        yield engine
    finally:
        engine.dispose()


def test_a_connection_idle_past_ping_after_is_pinged(
    clean_db: Engine, middlebox: tuple[Middlebox, str], pings: list[Any]
) -> None:
    box, url = middlebox
    with checked_engine(url, ping_after=0.0) as engine:  # any idle time is too long
        first = pooled_pid(engine)
        box.forget()  # the link dies without a word: the socket shows nothing
        assert pooled_pid(engine) != first  # the ping failed: replaced, not handed out
    assert len(pings) == 1


def test_a_busy_connection_is_not_pinged(
    clean_db: Engine, middlebox: tuple[Middlebox, str], pings: list[Any]
) -> None:
    box, url = middlebox
    with checked_engine(url) as engine:  # pinged only after PING_AFTER (10 s) idle
        pooled_pid(engine)
        box.forget()
        with pytest.raises(OperationalError):  # back within 10 s: no ping, so it fails
            pooled_pid(engine)
    assert pings == []


def test_an_async_connection_idle_past_ping_after_is_pinged(
    clean_db: Engine, middlebox: tuple[Middlebox, str], pings: list[Any]
) -> None:
    box, url = middlebox

    async def scenario() -> None:
        engine = create_async_engine(make_url(url).set(drivername="postgresql+psycopg_async"))
        discard_closed_connections(engine, ping_after=0.0)
        try:
            async with engine.connect() as conn:
                first = await conn.scalar(text("SELECT pg_backend_pid()"))
            box.forget()
            async with engine.connect() as conn:
                assert await conn.scalar(text("SELECT pg_backend_pid()")) != first
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    assert len(pings) == 1


def test_another_driver_is_refused() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(ValueError, match="psycopg 3"):
        discard_closed_connections(engine)
