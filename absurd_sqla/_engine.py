"""Turning a ``bind`` (URL, Engine or sessionmaker) into an Engine and a Session factory."""

from __future__ import annotations

import os
import select
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

DEFAULT_URL = "postgresql://localhost/absurd"

Bind = str | URL | Engine | sessionmaker[Session] | None
AsyncBind = str | URL | AsyncEngine | async_sessionmaker[AsyncSession] | None


def default_url() -> str:
    """``ABSURD_DATABASE_URL``, then ``PGDATABASE`` (a database name on the local server)."""
    url = os.environ.get("ABSURD_DATABASE_URL")
    if url:
        return url
    pgdatabase = os.environ.get("PGDATABASE")
    if pgdatabase:
        return pgdatabase if "://" in pgdatabase else f"postgresql:///{pgdatabase}"
    return DEFAULT_URL


def normalize_url(url: str | URL, *, driver: str = "psycopg") -> URL:
    """Plain ``postgresql://`` URLs (and ``postgres://``) use psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=f"postgresql+{driver}")
    if not parsed.drivername.startswith("postgresql"):
        raise ValueError(f"absurd_sqla needs PostgreSQL, got a {parsed.drivername!r} URL")
    return parsed


PING_AFTER = 10.0  # seconds a pooled connection may sit idle before it is pinged on checkout
_IDLE_SINCE = "absurd_sqla.idle_since"  # in a pool entry's ``info``: when it was checked in


def discard_closed_connections(
    engine: Engine | AsyncEngine, *, ping_after: float = PING_AFTER
) -> None:
    """Before the pool hands out one of ``engine``'s connections, make sure it
    still works, and replace it with a new one if not, cheaply:

    * always, a look at its socket (a non-blocking poll, not a round trip): a
      backend that was terminated, or a server that restarted or shut down,
      has closed it (after a FATAL message), and the poll sees that;
    * a ping (one round trip, as ``pool_pre_ping=True`` sends on every
      checkout) only for a connection that sat idle in the pool longer than
      ``ping_after`` seconds: a link that died without a word (a firewall, NAT
      gateway or load balancer that forgets idle connections) shows nothing
      until something is sent.

    So a busy pool, whose connections come back within milliseconds (every
    single-statement write of a worker), pays no round trip for the check.
    Like ``pool_pre_ping``'s, the ping has no timeout of its own: a link that
    drops packets without a reset holds it until TCP gives up.

    For psycopg 3 engines (``ValueError`` otherwise). Call it once, when the
    engine is set up: a second call on the same engine (or one sharing its
    pool) changes nothing, ``ping_after`` included. Engines absurd_sqla makes
    from a URL have it.
    """
    target = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if target.dialect.driver not in ("psycopg", "psycopg_async"):
        raise ValueError(
            "discard_closed_connections needs a psycopg 3 engine "
            f"(postgresql+psycopg://...), got the {target.dialect.driver!r} driver"
        )
    # Listeners belong to the pool, which execution_options() copies share and
    # dispose() hands on to the pool it makes.
    pool = target.pool
    if _mark_idle in list(pool.dispatch.checkin):  # (event.contains misses copied ones)
        return
    dialect = target.dialect

    def checkout(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        # The pool replaces a connection whose checkout raises DisconnectionError.
        driver = record.driver_connection
        if driver is None or driver.closed or _readable(driver.fileno()):
            raise sa_exc.DisconnectionError("the server closed this connection while it was idle")
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is not None and time.monotonic() - idle_since > ping_after:
            try:
                alive = dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise sa_exc.DisconnectionError("an idle connection failed its ping") from exc
            if not alive:
                raise sa_exc.DisconnectionError("an idle connection failed its ping")

    event.listen(pool, "checkout", checkout)
    event.listen(pool, "checkin", _mark_idle)


def _mark_idle(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """A ``checkin`` listener: when the connection went back to the pool."""
    record.info[_IDLE_SINCE] = time.monotonic()


def _readable(fd: int) -> bool:
    """Data (or end of file, or an error) waiting on ``fd``, found without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # no poll() (Windows)


def engine_and_sessions(bind: Bind, **engine_kw: Any) -> tuple[Engine, sessionmaker[Session]]:
    """The Engine and Session factory of ``bind``. ``engine_kw`` configure an
    engine made here from a URL (which also gets ``discard_closed_connections``);
    an Engine or sessionmaker passed in is used as it is (its pool settings are
    the caller's)."""
    if bind is None:
        bind = default_url()
    if isinstance(bind, AsyncEngine | async_sessionmaker):
        raise TypeError("Absurd needs an Engine or sessionmaker; use AsyncAbsurd for asyncio")
    if isinstance(bind, sessionmaker):
        engine = bind.kw.get("bind")
        if not isinstance(engine, Engine):
            raise TypeError("the sessionmaker passed as bind must itself be bound to an Engine")
        return engine, bind
    if isinstance(bind, Engine):
        return bind, sessionmaker(bind)
    if isinstance(bind, str | URL):
        engine = create_engine(normalize_url(bind), **engine_kw)
        discard_closed_connections(engine)
        return engine, sessionmaker(engine)
    raise TypeError(f"bind must be a URL, an Engine or a sessionmaker, not {type(bind).__name__}")


def async_engine_and_sessions(
    bind: AsyncBind, **engine_kw: Any
) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """``engine_and_sessions`` for asyncio: an ``AsyncEngine`` (psycopg 3's async
    driver for a URL) and an ``async_sessionmaker``."""
    if bind is None:
        bind = default_url()
    if isinstance(bind, async_sessionmaker):
        engine = bind.kw.get("bind")
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                "the async_sessionmaker passed as bind must itself be bound to an AsyncEngine"
            )
        return engine, bind
    if isinstance(bind, AsyncEngine):
        return bind, async_sessionmaker(bind, expire_on_commit=False)
    if isinstance(bind, Engine | sessionmaker):
        raise TypeError("AsyncAbsurd needs an AsyncEngine or async_sessionmaker; use Absurd")
    if isinstance(bind, str | URL):
        engine = create_async_engine(normalize_url(bind, driver="psycopg_async"), **engine_kw)
        discard_closed_connections(engine)
        return engine, async_sessionmaker(engine, expire_on_commit=False)
    raise TypeError(
        f"bind must be a URL, an AsyncEngine or an async_sessionmaker, not {type(bind).__name__}"
    )
