"""What the thread and asyncio worker runtimes decide alike, without I/O:
timings, the two-stage stop, the pool check and log wording."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from typing import Any

from ._app import WorkerSettings

SWEEP_INTERVAL = 1.0  # seconds between expired-lease sweeps of a running worker
LISTEN_RETRY_MIN, LISTEN_RETRY_MAX = 0.5, 30.0  # reconnect backoff of the listener, seconds
SIGNAL_CHECK_INTERVAL = 0.1  # longest an idle worker takes to notice SIGTERM/SIGINT
CANCELLED_HANDLER_GRACE = 5.0  # seconds a stopping asyncio worker waits for cancelled handlers


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def summary(exc: BaseException) -> str:
    """The first line of an exception, for a log line without a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
