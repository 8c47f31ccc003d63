"""The sync worker runtime: the loop around the executor.

A worker claims with one ``FOR UPDATE SKIP LOCKED`` statement, runs up to
``concurrency`` handlers in threads, refills free slots as they finish, wakes on
``LISTEN``/``NOTIFY`` (polling stays as the fallback) and on shutdown claims
nothing new while in-flight handlers finish. What happens to each run is the
executor's business (``_execute``); this module owns threads, the listener,
signals and the set of running workers.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ._app import WorkerSettings
from ._execute import Executor
from ._logs import logger, queue_extra, run_extra
from ._outage import Outage
from ._retry import is_disconnect
from ._run import ClaimedRun, HandOver
from ._runtime import (
    HAND_OVER_GRACE,
    LISTEN_RETRY_MAX,
    LISTEN_RETRY_MIN,
    SIGNAL_CHECK_INTERVAL,
    SWEEP_INTERVAL,
    RunningWorkers,
    StopState,
    banner,
    database_failed,
    database_label,
    database_succeeded,
    idle_timeout,
    missing_queue_warning,
    nothing_to_restore,
    pool_warning,
    restore_signal_handler,
    summary,
)
from ._sql import channel_for
from .migrate import check_schema_current

log = logger()


class Listener:
    """``LISTEN`` on the queue's channel in a thread; each notification sets ``wake``.

    The connection comes from the app's engine (so its connect arguments and
    events apply), detached from the pool. If it breaks, the listener
    reconnects with backoff; the worker keeps polling meanwhile, and a wake-up
    after each (re)connect covers notifications missed in between.
    """

    def __init__(self, engine: Engine, channel: str, wake: threading.Event, queue: str) -> None:
        self._engine = engine
        self._channel = channel
        self._extra = queue_extra(queue)
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="absurd-listen", daemon=True)
        self.connected = threading.Event()
        self._failing = False

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
            except Exception as exc:
                if self.connected.is_set():  # it had worked: start the backoff afresh
                    backoff = LISTEN_RETRY_MIN
                if not self._failing:  # one warning per outage, not one per attempt
                    log.warning(
                        "LISTEN on %s failed (%s); polling until it reconnects",
                        self._channel,
                        summary(exc),
                        exc_info=not is_disconnect(exc),
                        extra=self._extra,
                    )
                self._failing = True
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
            if self._failing:
                log.warning("LISTEN on %s is back", self._channel, extra=self._extra)
                self._failing = False
            self._wake.set()  # anything committed while we were not listening
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.5, stop_after=1):
                    self._wake.set()
        finally:
            raw.close()


@dataclass(slots=True)
class _Slot:
    """One claimed run and the daemon thread executing it."""

    run: ClaimedRun
    thread: threading.Thread | None = None
    started: bool = False  # the handler was called (releasing it then costs an attempt)
    # Its completion is claiming the slot's next run: not released when
    # stopping now, but waited for (it hands back the run it claims).
    handing_over: bool = False
    released: bool = False  # handed back by the worker: its handler must not start


class Worker:
    """A long-running worker for one queue. Use ``Absurd.start_worker``.

    Shutdown has two stages. A stop (``stop()``, SIGTERM or SIGINT) claims
    nothing more and lets in-flight handlers finish. ``stop(now=True)``, a
    second signal, or ``shutdown_timeout`` elapsing after the first stop, stops
    now: runs not finished are released (claimable again at once) and their
    threads are abandoned; fencing makes any later write of theirs harmless.
    """

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
        self._stop = StopState(settings.shutdown_timeout)
        self._wake = threading.Event()
        self._slots: dict[object, _Slot] = {}
        self._lock = threading.Lock()
        self._outage = Outage(first_delay=self.poll_interval)

    # -- stopping ----------------------------------------------------------------

    def stop(self, *, now: bool = False) -> None:
        """Claim nothing more and let in-flight handlers finish; with ``now``,
        release them at once instead. Safe from any thread."""
        self._stop.stop(now=now)
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.stopping

    @property
    def stopping_now(self) -> bool:
        return self._stop.stopping_now

    # -- the loop ----------------------------------------------------------------

    def _idle(self, timeout: float) -> None:
        """Wait for a wake-up (NOTIFY, a free slot, stop) or ``timeout`` seconds.

        In slices, so a signal (which sets no event) is noticed promptly.
        """
        deadline = time.monotonic() + timeout
        seen = len(self._stop.signals)
        while len(self._stop.signals) == seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake.wait(min(remaining, SIGNAL_CHECK_INTERVAL)):
                break
        self._wake.clear()

    def _start(self, run: ClaimedRun) -> None:
        with self._lock:
            thread = self._register(run)
        self._launch(thread, run)

    def _register(self, run: ClaimedRun) -> threading.Thread:
        """A slot for ``run``, counted in ``_slots`` (the caller holds ``_lock``);
        its thread, made but not started."""
        slot = _Slot(run)

        def mark_started() -> bool:
            # Under the lock stopping now takes to hand runs back: a run handed
            # back as never started is not started after all.
            with self._lock:
                if slot.released:
                    return False
                slot.started = True
                return True

        def begin_hand_over() -> bool:
            # Under the lock that stopping now takes to list the slots: either
            # it sees this slot handing over and waits, or this sees the stop.
            with self._lock:
                if self.stopping:
                    return False
                slot.handing_over = True
                return True

        def target() -> None:
            next_runs: list[ClaimedRun] = []
            try:
                next_runs = self.executor.execute(
                    run,
                    self.worker_id,
                    self.claim_timeout,
                    mark_started,
                    HandOver(self.queue, begin_hand_over),
                )
            except BaseException:
                log.exception(
                    "worker slot crashed running run %s", run.run_id, extra=run_extra(run)
                )
            finally:
                self._take_over(run, next_runs)

        thread = threading.Thread(target=target, name=f"absurd-task-{run.run_id}", daemon=True)
        slot.thread = thread
        self._slots[run.run_id] = slot
        return thread

    def _launch(self, thread: threading.Thread, run: ClaimedRun) -> None:
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: give the run back unstarted
            log.exception("could not start a thread for run %s", run.run_id, extra=run_extra(run))
            with self._lock:
                slot = self._slots.get(run.run_id)
                ours = slot is not None and not slot.released
                if slot is not None:
                    slot.released = True
            if ours:  # handed back while the slot still counts
                self._release(run, started=False)
            with self._lock:
                self._slots.pop(run.run_id, None)
            self._wake.set()

    def _take_over(self, done: ClaimedRun, next_runs: list[ClaimedRun]) -> None:
        """A slot's run is done: start the run its completion claimed in its
        place (in one step under the lock, so the loop never sees the slot free
        and claims for it too), or, if the worker is stopping, hand it back
        while the slot still counts (a worker stopping now waits for it)."""
        with self._lock:
            stopping = self.stopping
            if not stopping:
                self._slots.pop(done.run_id, None)
                threads = [(self._register(run), run) for run in next_runs]
        if stopping:
            for run in next_runs:
                self._release(run, started=False)
            with self._lock:
                self._slots.pop(done.run_id, None)
            threads = []
        for thread, run in threads:
            self._launch(thread, run)
        if not threads:
            self._wake.set()

    def run(self, shared_need: int = 0) -> None:
        """Run until stopped; ``shared_need``: pool connections that this client's
        other running workers need from the same engine."""
        self._check_schema()
        extra = queue_extra(self.queue)
        names = self.executor.core.registry.keys()
        log.info(banner(self.settings, names, database_label(self.engine.url)), extra=extra)
        warning = pool_warning(self.engine.pool, self.settings, shared_need)
        if warning is not None:
            log.warning(warning, extra=extra)
        self._check_queue()
        listener = Listener(self.engine, channel_for(self.queue), self._wake, self.queue)
        listener.start()
        restore = (
            _install_signal_handlers(self._stop.signal)
            if self.settings.handle_signals
            else nothing_to_restore
        )
        try:
            self._loop()
            if self.stopping_now:
                self._release_unfinished()
        finally:
            restore()
            listener.stop()

    def _check_schema(self) -> None:
        """Refuse to start on a schema that is not at our head (``SchemaNotCurrent``
        names the command that fixes it). A database that is away is not a
        refusal: the loop waits for it as for any outage."""
        try:
            with self.engine.connect() as conn:
                check_schema_current(conn)
        except SQLAlchemyError as exc:
            log.warning(
                "could not check the absurd schema's version: %s",
                summary(exc),
                extra=queue_extra(self.queue),
            )

    def _check_queue(self) -> None:
        """Warn if the queue does not exist (one query; skipped once stopping, and
        never fatal: a database that is away is the loop's business)."""
        if self.stopping:
            return
        try:
            exists = self.executor.queue_exists(self.queue)
        except Exception as exc:
            log.debug(
                "could not check that queue %r exists: %s",
                self.queue,
                summary(exc),
                extra=queue_extra(self.queue),
            )
            return
        if not exists:
            log.warning(missing_queue_warning(self.settings), extra=queue_extra(self.queue))

    def _loop(self) -> None:
        next_sweep = 0.0
        while not self.stopping_now:
            if self.stopping:
                if not self._drain():
                    return
                continue
            now = time.monotonic()
            if now >= next_sweep:
                # On a timer, busy or not: a hung handler's expired lease is
                # swept even when every slot is taken.
                next_sweep = now + SWEEP_INTERVAL
                if self._guard(self.executor.sweep_expired, self.queue) is _FAILED:
                    continue
            with self._lock:
                free = self.concurrency - len(self._slots)
            due = None  # full: a slot that frees up wakes the loop
            if free > 0:
                wanted = min(free, self.batch_size)
                claimed = self._guard(
                    self.executor.claim, self.queue, self.worker_id, self.claim_timeout, wanted
                )
                if claimed is _FAILED:
                    continue
                for run in claimed:
                    self._start(run)
                if len(claimed) == wanted:
                    continue  # there may be more ready right now
                # Idle with a free slot: wake when the next run comes due.
                due = self._guard(self.executor.seconds_until_due, self.queue)
                if due is _FAILED:
                    continue
            self._idle(idle_timeout(self.poll_interval, next_sweep - time.monotonic(), due))

    def _drain(self) -> bool:
        """Stage one of a shutdown: wait for in-flight handlers. False once none is left."""
        with self._lock:
            inflight = len(self._slots)
        if not inflight:
            return False
        if self._stop.start_draining():
            log.info(
                self._stop.drain_message(self.worker_id, inflight), extra=queue_extra(self.queue)
            )
        deadline = self._stop.deadline or 0.0
        self._idle(min(SIGNAL_CHECK_INTERVAL, max(deadline - time.monotonic(), 0.0)))
        return True

    def _release_unfinished(self) -> None:
        """Stage two: give back every claimed run that has not finished. A slot
        whose completion is claiming its next run is not released but waited
        for: it finishes its run and hands back the one it claims."""
        with self._lock:
            slots = list(self._slots.values())
            # Decided under the lock a handler takes to start: one not started
            # now never will be (see mark_started).
            releasing = [(s.run, s.started) for s in slots if not (s.handing_over or s.released)]
            for slot in slots:
                if not slot.handing_over:
                    slot.released = True
        if not slots:
            return
        log.warning(
            "worker %s stopping now: releasing %d unfinished run(s)",
            self.worker_id,
            len(slots),
            extra=queue_extra(self.queue),
        )
        for run, started in releasing:
            self._release(run, started)
        deadline = time.monotonic() + HAND_OVER_GRACE
        for slot in slots:
            if slot.handing_over and slot.thread is not None:
                slot.thread.join(max(deadline - time.monotonic(), 0.0))

    def _release(self, run: ClaimedRun, started: bool) -> None:
        try:
            self.executor.release(run, self.worker_id, self.claim_timeout, started)
        except Exception:
            # Its lease still runs out: the sweep of another worker retries it.
            log.exception("could not release run %s", run.run_id, extra=run_extra(run))

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn``; while the database is unreachable, back off and log once."""
        try:
            result = fn(*args)
        except Exception as exc:
            self._idle(database_failed(self._outage, log, self.worker_id, exc, self.queue))
            return _FAILED
        database_succeeded(self._outage, log, self.worker_id, self.queue)
        return result


_FAILED = object()  # what _guard returns for a call that raised


def _install_signal_handlers(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT stop the worker gracefully; only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return nothing_to_restore
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(signum: int, frame: object) -> None:
        on_signal(signum)

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            restore_signal_handler(sig, handler)

    return restore


class Workers(RunningWorkers[Worker]):
    """The workers one client runs (see ``_runtime.RunningWorkers``)."""

    def run(self, worker: Worker) -> None:
        shared_need = self.enter(worker)
        if shared_need is None:
            return
        try:
            worker.run(shared_need)
        finally:
            self.leave(worker)
