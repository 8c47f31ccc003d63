"""How a worker loop behaves while the database is unreachable, without I/O.

One warning when the database goes away, one line when it is back, and
between them growing pauses instead of a retry (and a log line) every poll
interval. Shared by the thread and asyncio runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass

OUTAGE_BACKOFF_MAX = 10.0  # longest pause between attempts while the database is away, seconds


@dataclass(slots=True)
class Outage:
    """The state of one worker loop's connection to the database."""

    first_delay: float
    since: float | None = None  # monotonic time of the first failure of this outage
    failures: int = 0

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, now: float) -> tuple[bool, float]:
        """Record a failed attempt: (is it the first of an outage, seconds to pause)."""
        first = self.since is None
        if first:
            self.since = now
        self.failures += 1
        delay = min(self.first_delay * 2 ** (self.failures - 1), OUTAGE_BACKOFF_MAX)
        return first, max(delay, self.first_delay)

    def recovered(self, now: float) -> tuple[float, int] | None:
        """Record a success: (seconds the outage lasted, failed attempts) if one ended."""
        if self.since is None:
            return None
        ended = (now - self.since, self.failures)
        self.since, self.failures = None, 0
        return ended
