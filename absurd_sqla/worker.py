"""The sync worker runtime: the loop around the executor.

A worker claims with one ``FOR UPDATE SKIP LOCKED`` statement, runs up to
``concurrency`` handlers in threads, refills free slots as they finish, wakes on
``LISTEN``/``NOTIFY`` (polling stays as the fallback) and on shutdown claims
nothing new while in-flight handlers finish. What happens to each run is the
executor's business (``_execute``); this module owns threads, the listener,
signals and the set of running workers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from ._app import WorkerSettings
from ._execute import Executor
from ._run import ClaimedRun
from ._sql import channel_for

log = logging.getLogger("absurd_sqla.worker")

SWEEP_INTERVAL = 1.0  # seconds between expired-lease sweeps of a running worker
LISTEN_RETRY_MIN, LISTEN_RETRY_MAX = 0.5, 30.0  # reconnect backoff of the listener, seconds
SIGNAL_CHECK_INTERVAL = 0.1  # longest an idle worker takes to notice SIGTERM/SIGINT


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Listener:
    """``LISTEN`` on the queue's channel in a thread; each notification sets ``wake``.

    The connection comes from the app's engine (so its connect arguments and
    events apply), detached from the pool. If it breaks, the listener
    reconnects with backoff; the worker keeps polling meanwhile, and a wake-up
    after each (re)connect covers notifications missed in between.
    """

    def __init__(self, engine: Engine, channel: str, wake: threading.Event) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="absurd-listen", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = LISTEN_RETRY_MIN
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception:
                if self.connected.is_set():  # it had worked: start the backoff afresh
                    backoff = LISTEN_RETRY_MIN
                log.warning(
                    "LISTEN on %s failed; polling until it reconnects in %.1fs",
                    self._channel,
                    backoff,
                    exc_info=True,
                )
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        conn = raw.driver_connection  # read before detach(), which clears it
        raw.detach()  # a LISTENing session must never serve anyone else
        try:
            if not isinstance(conn, psycopg.Connection):
                raise TypeError(f"LISTEN needs a psycopg 3 connection, got {type(conn)!r}")
            conn.rollback()
            conn.autocommit = True
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel)))
            self.connected.set()
            self._wake.set()  # anything committed while we were not listening
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.5, stop_after=1):
                    self._wake.set()
        finally:
            raw.close()


class Worker:
    """A long-running worker for one queue. Use ``Absurd.start_worker``."""

    def __init__(self, executor: Executor, settings: WorkerSettings) -> None:
        self.settings = settings
        self.executor = executor
        self.engine = executor.db.engine
        self.queue = settings.queue
        self.worker_id = settings.worker_id
        self.claim_timeout = settings.claim_timeout
        self.concurrency = settings.concurrency
        self.batch_size = settings.batch_size
        self.poll_interval = settings.poll_interval
        self._stopping = threading.Event()
        self._signalled: int | None = None  # set by a signal handler: no locks there
        self._wake = threading.Event()
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Claim nothing more; in-flight handlers finish. Safe from any thread."""
        self._stopping.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set() or self._signalled is not None

    def _on_signal(self, signum: int) -> None:
        # Runs in the main thread between bytecodes, maybe while this thread holds
        # an Event's lock: only a plain assignment is safe here.
        self._signalled = signum

    def _idle(self) -> None:
        """Wait for a wake-up (NOTIFY, a free slot, stop) or the poll interval.

        In slices, so a signal noticed via ``_signalled`` stops us promptly.
        """
        deadline = time.monotonic() + self.poll_interval
        while not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake.wait(min(remaining, SIGNAL_CHECK_INTERVAL)):
                break
        self._wake.clear()

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(future)
        exc = future.exception()
        if exc is not None:
            log.error("worker slot crashed", exc_info=exc)
        self._wake.set()

    def _check_pool(self, shared_need: int) -> None:
        """Warn when the engine's pool is smaller than what this worker and the
        client's other running workers (``shared_need``) need together."""
        pool = self.engine.pool
        if not isinstance(pool, QueuePool):
            return
        overflow = pool._max_overflow  # no public getter; -1 means unlimited
        if overflow < 0:
            return
        capacity = pool.size() + overflow
        needed = self.settings.connections_needed + shared_need
        if capacity < needed:
            log.warning(
                "the engine's pool allows %d connections but concurrency=%d needs %d "
                "(one per handler, one for the claim loop, one spare%s); handlers will "
                "wait for connections (raise pool_size/max_overflow)",
                capacity,
                self.concurrency,
                needed,
                f", plus {shared_need} for this client's other workers" if shared_need else "",
            )

    def run(self, shared_need: int = 0) -> None:
        """Run until stopped; ``shared_need``: pool connections that this client's
        other running workers need from the same engine."""
        self._check_pool(shared_need)
        listener = Listener(self.engine, channel_for(self.queue), self._wake)
        listener.start()
        restore = _install_signal_handlers(self._on_signal)
        last_sweep = 0.0
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="absurd-task") as pool:
                while not self.stopping:
                    with self._lock:
                        free = self.concurrency - len(self._inflight)
                    claimed: list[ClaimedRun] = []
                    if free > 0:
                        now = time.monotonic()
                        if now - last_sweep >= SWEEP_INTERVAL:
                            last_sweep = now
                            self._guard(self.executor.sweep_expired, self.queue)
                        wanted = min(free, self.batch_size)
                        claimed = (
                            self._guard(
                                self.executor.claim,
                                self.queue,
                                self.worker_id,
                                self.claim_timeout,
                                wanted,
                            )
                            or []
                        )
                        for run in claimed:
                            future = pool.submit(
                                self.executor.execute, run, self.worker_id, self.claim_timeout
                            )
                            with self._lock:
                                self._inflight.add(future)
                            future.add_done_callback(self._done)
                        if len(claimed) == wanted:
                            continue  # there may be more ready right now
                    self._idle()
                if self._signalled is not None:
                    log.info("signal %d: stopping after in-flight tasks finish", self._signalled)
                # Leaving the `with` waits for in-flight handlers to finish.
        finally:
            restore()
            listener.stop()

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a database hiccup must not kill the worker loop
            log.exception("worker %s: database error; retrying after poll interval", self.worker_id)
            return None


def _install_signal_handlers(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT stop the worker gracefully; only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(signum: int, frame: object) -> None:
        on_signal(signum)

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


class Workers:
    """The workers one client runs, so ``stop_worker()`` reaches all of them.

    A ``stop_worker()`` that comes while none runs is remembered: the next
    ``run`` returns at once (the "start a thread, stop it" race).
    """

    def __init__(self) -> None:
        self._running: list[Worker] = []
        self._lock = threading.Lock()
        self._stop_pending = False

    def run(self, worker: Worker) -> None:
        with self._lock:
            if self._stop_pending:
                self._stop_pending = False
                return
            shared_need = sum(w.settings.connections_needed for w in self._running)
            self._running.append(worker)
        try:
            worker.run(shared_need)
        finally:
            with self._lock:
                self._running.remove(worker)

    def running(self) -> list[Worker]:
        with self._lock:
            return list(self._running)

    def stop(self) -> None:
        with self._lock:
            self._stop_pending = not self._running
            for worker in self._running:
                worker.stop()
