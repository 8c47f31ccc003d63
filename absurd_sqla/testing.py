"""Helpers for testing code that uses absurd_sqla.

    clock = FakeClock(app.engine)             # "now" is frozen for the engine's connections
    clock.set(datetime(2030, 1, 1, tzinfo=UTC))
    app.spawn("remind", {})
    run_until_idle(app)                        # runs everything that is due
    clock.advance(3600)                        # sleeps and retry delays come due
    run_until_idle(app)

The database clock is ``absurd.now()``: ``clock_timestamp()`` unless the
session setting ``absurd.fake_now`` holds a timestamp. ``FakeClock`` sets it on
every connection the engine hands out, so the worker, the client and your own
sessions all agree on the time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event, text

if TYPE_CHECKING:
    from .client import Absurd

__all__ = ["FakeClock", "run_until_idle"]


class FakeClock:
    """Freeze and move the database clock for connections from ``engine``."""

    def __init__(self, engine: Engine, start: datetime | None = None) -> None:
        self.engine = engine
        self._now: datetime | None = None
        event.listen(engine, "checkout", self._on_checkout)
        if start is None:
            with engine.connect() as conn:
                start = conn.scalar(text("SELECT clock_timestamp()"))
        self.set(start)

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        value = "" if self._now is None else self._now.isoformat()
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT set_config('absurd.fake_now', %s, false)", (value,))
        finally:
            cursor.close()
        # The setting is session-level: end the implicit transaction it opened.
        dbapi_connection.commit()

    def now(self) -> datetime:
        assert self._now is not None
        return self._now

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        self._now = when

    def advance(self, seconds: float | timedelta) -> datetime:
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        self.set(self.now() + delta)
        return self.now()

    def close(self) -> None:
        """Back to the real clock: stop setting it and drop the pool's pinned connections."""
        self._now = None
        if event.contains(self.engine, "checkout", self._on_checkout):
            event.remove(self.engine, "checkout", self._on_checkout)
        self.engine.dispose()

    def __enter__(self) -> FakeClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_until_idle(
    app: Absurd, *, queue: str | None = None, max_batches: int = 10_000, batch_size: int = 10
) -> int:
    """Run due work in this thread until nothing is claimable; return runs processed."""
    total = 0
    for _ in range(max_batches):
        claimed = app.work_batch("test-worker", batch_size=batch_size, queue=queue)
        if claimed == 0:
            return total
        total += claimed
    raise RuntimeError(f"still busy after {max_batches} batches: is a task looping forever?")
