"""When a run's write is worth another try, without I/O: only after a lost
connection, with a growing, jittered and bounded wait. Shared by the sync and
async database primitives and by the worker runtimes' error logging."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DBAPIError

# A run's write that lost its connection is tried again until this many seconds
# have passed since its first attempt (the wait before each retry is cut to fit).
WRITE_RETRY_BUDGET = 30.0
_FIRST_RETRY_DELAY = 0.25  # seconds, doubling with each retry ...
_MAX_RETRY_DELAY = 8.0  # ... up to this; each wait is jittered down by up to half


def is_disconnect(exc: BaseException) -> bool:
    """An error that means the connection or the server went away (a restart, a
    failover, a terminated backend), as opposed to an error in what we sent
    (a deadlock, a timeout, a constraint: those carry their own SQLSTATE)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:  # raised by the client: no server answer at all
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    # 08: connection exception; 57P: the server shut down or is starting.
    return exc.sqlstate.startswith(("08", "57P"))


def reconnect_delay(
    exc: BaseException, retries: int, elapsed: float, jitter: float
) -> float | None:
    """How long to wait before trying a run's write again, or None to give up.

    Only a lost connection is worth a retry (``is_disconnect``): any other
    error (a deadlock, a cancelled statement, a constraint) would fail again or
    means something a retry must not paper over. ``retries`` made so far,
    ``elapsed`` seconds since the first attempt, ``jitter`` in [0, 1): the wait
    doubles from ``_FIRST_RETRY_DELAY`` up to ``_MAX_RETRY_DELAY``, scaled by
    0.5-1.0 so that workers cut off together do not reconnect in step, and
    never runs past ``WRITE_RETRY_BUDGET``.
    """
    remaining = WRITE_RETRY_BUDGET - elapsed
    if remaining <= 0 or not is_disconnect(exc):
        return None
    delay = min(_MAX_RETRY_DELAY, _FIRST_RETRY_DELAY * 2.0 ** min(retries, 16))
    return min(delay * (0.5 + jitter / 2), remaining)
