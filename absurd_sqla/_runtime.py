"""What the thread and asyncio worker runtimes decide alike, without I/O:
timings, the two-stage stop, the pool check and log wording."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Collection
from typing import Any, Generic, Protocol, TypeVar

from ._app import WorkerSettings
from ._logs import queue_extra
from ._outage import Outage
from ._retry import WRITE_RETRY_BUDGET, is_disconnect


class _Worker(Protocol):
    settings: WorkerSettings

    def stop(self, *, now: bool = False) -> None: ...


W = TypeVar("W", bound=_Worker)

SWEEP_INTERVAL = 1.0  # seconds between expired-lease sweeps of a running worker
LISTEN_RETRY_MIN, LISTEN_RETRY_MAX = 0.5, 30.0  # reconnect backoff of the listener, seconds
SIGNAL_CHECK_INTERVAL = 0.1  # longest an idle worker takes to notice SIGTERM/SIGINT
CANCELLED_HANDLER_GRACE = 5.0  # seconds a stopping asyncio worker waits for cancelled handlers
# Seconds a worker stopping now waits for a completion that is claiming its
# slot's next run: that write's retries, the look-up's after them, and the
# hand-back of the run it claimed.
HAND_OVER_GRACE = 2 * WRITE_RETRY_BUDGET + 5.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def summary(exc: BaseException) -> str:
    """The first line of an exception, for a log line without a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def nothing_to_restore() -> None:
    """The restore step when no signal handler was installed."""


def restore_signal_handler(signum: int, previous: Any) -> None:
    """Put back a handler ``signal.getsignal`` returned. ``None`` means one
    installed outside Python, which cannot be reinstalled: the default then."""
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)


class StopState:
    """The two-stage stop: ``stop()`` or a first signal drains in-flight handlers;
    ``stop(now=True)``, a second signal, or ``shutdown_timeout`` after the first
    stop releases them. Plain assignments only: safe from other threads and from
    signal handlers."""

    def __init__(self, shutdown_timeout: float | None) -> None:
        self.shutdown_timeout = shutdown_timeout
        self._stopped = False
        self._now = False
        self.signals: list[int] = []  # appended by signal handlers
        self.deadline: float | None = None  # when draining must end (monotonic)

    def stop(self, *, now: bool = False) -> None:
        self._stopped = True
        self._now = self._now or now

    def signal(self, signum: int) -> None:
        self.signals.append(signum)

    @property
    def stopping(self) -> bool:
        return self._stopped or bool(self.signals)

    @property
    def stopping_now(self) -> bool:
        if self._now or len(self.signals) >= 2:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def start_draining(self) -> bool:
        """Set the drain deadline on the first call; True then (time to log it)."""
        if self.deadline is not None:
            return False
        timeout = self.shutdown_timeout
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        return True

    def drain_message(self, worker_id: str, inflight: int) -> str:
        timeout = self.shutdown_timeout
        return (
            f"worker {worker_id} stopping: claiming nothing more, waiting for {inflight} "
            "task(s) in flight (signal again, or stop_worker(now=True)"
            + ("" if timeout is None else f", or wait {timeout:g}s")
            + ", to stop now)"
        )


def pool_warning(pool: Any, settings: WorkerSettings, shared_need: int) -> str | None:
    """Why the engine's ``QueuePool`` is too small for this worker and the client's
    other running workers (``shared_need``), if it is; None for other pools."""
    from sqlalchemy.pool import QueuePool

    if not isinstance(pool, QueuePool):
        return None
    overflow = pool._max_overflow  # no public getter; -1 means unlimited
    if overflow < 0:
        return None
    capacity = pool.size() + overflow
    needed = settings.connections_needed + shared_need
    if capacity >= needed:
        return None
    others = f", plus {shared_need} for this client's other workers" if shared_need else ""
    return (
        f"the engine's pool allows {capacity} connections but concurrency="
        f"{settings.concurrency} needs {needed} (one per handler, one for the claim loop, "
        f"one spare{others}); handlers will wait for connections "
        "(raise pool_size/max_overflow)"
    )


BANNER_TASK_NAMES = 20  # task names a start banner lists before "and N more"


def database_label(url: Any) -> str:
    """Where a SQLAlchemy ``URL`` points, for a log line: user, host, port and
    database, never the password (nor the query string, which may hold one)."""
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):  # a host given more than once in the query
        host = ",".join(host)
    user = f"{url.username}@" if url.username else ""
    port = f":{url.port}" if url.port else ""
    return f"{user}{host}{port}/{url.database or ''}"


def banner(settings: WorkerSettings, task_names: Collection[str], database: str) -> str:
    """The line a worker logs when it starts (``database``: ``database_label``)."""
    names = sorted(task_names)
    shown = ", ".join(names[:BANNER_TASK_NAMES]) or "none"
    if len(names) > BANNER_TASK_NAMES:
        shown += f" and {len(names) - BANNER_TASK_NAMES} more"
    return (
        f"worker {settings.worker_id} starting: queue {settings.queue!r}, "
        f"concurrency {settings.concurrency}, batch size {settings.batch_size}, "
        f"claim timeout {settings.claim_timeout:g}s, {len(names)} task(s) registered "
        f"({shown}), database {database}"
    )


def missing_queue_warning(settings: WorkerSettings) -> str:
    return (
        f"worker {settings.worker_id} serves queue {settings.queue!r}, which does not exist: "
        f"it will claim nothing until the queue is created (create_queue({settings.queue!r}))"
    )


def database_failed(
    outage: Outage, log: logging.Logger, worker_id: str, exc: Exception, queue: str
) -> float:
    """Record a failed call of a worker loop and log it (a warning only for the
    first failure of an outage); return the seconds to pause."""
    first, delay = outage.failed(time.monotonic())
    if first:
        log.warning(
            "worker %s: database unreachable or failing (%s); retrying with backoff "
            "until it is back",
            worker_id,
            summary(exc),
            exc_info=not is_disconnect(exc),
            extra=queue_extra(queue),
        )
    else:
        log.debug(
            "worker %s: database still failing: %s",
            worker_id,
            summary(exc),
            extra=queue_extra(queue),
        )
    return delay


def database_succeeded(outage: Outage, log: logging.Logger, worker_id: str, queue: str) -> None:
    """Record a successful call; log one line if it ended an outage."""
    ended = outage.recovered(time.monotonic())
    if ended is not None:
        log.warning(
            "worker %s: database is back after %.1fs (%d failed attempt(s))",
            worker_id,
            *ended,
            extra=queue_extra(queue),
        )


class RunningWorkers(Generic[W]):
    """The workers one client runs, so ``stop_worker()`` reaches all of them.

    A stop that comes while none runs is remembered: the next worker to start
    returns at once (the "start a thread, stop it" race). Both runtimes wrap
    their worker's ``run`` between ``enter`` and ``leave``.
    """

    def __init__(self) -> None:
        self._running: list[W] = []
        self._lock = threading.Lock()
        self._stop_pending = False

    def enter(self, worker: W) -> int | None:
        """Register ``worker``: the pool connections the others need, or None if a
        stop was pending (then it must not run)."""
        with self._lock:
            if self._stop_pending:
                self._stop_pending = False
                return None
            shared_need = sum(w.settings.connections_needed for w in self._running)
            self._running.append(worker)
            return shared_need

    def leave(self, worker: W) -> None:
        with self._lock:
            self._running.remove(worker)

    def running(self) -> list[W]:
        with self._lock:
            return list(self._running)

    def stop(self, *, now: bool = False) -> None:
        with self._lock:
            self._stop_pending = not self._running
            for worker in self._running:
                worker.stop(now=now)


DUE_SLACK = 0.002  # seconds past a known due time before the claim, for the clock's rounding


def idle_timeout(poll_interval: float, until_sweep: float, until_due: float | None) -> float:
    """How long an idle worker waits before claiming again: a poll interval at
    most, never past the next sweep, and no later than the next run it knows
    comes due (so a sleep or a retry delay ends on time, not a poll later)."""
    timeout = min(poll_interval, max(until_sweep, 0.0))
    if until_due is not None:
        timeout = min(timeout, max(until_due, 0.0) + DUE_SLACK)
    return timeout
