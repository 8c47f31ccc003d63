"""The asyncio worker runtime: the loop around the async executor.

Up to ``concurrency`` handlers run at once as asyncio tasks, and a slot is
refilled the moment one finishes (a slow task never holds back claims). The
worker wakes on ``LISTEN``/``NOTIFY`` through psycopg's async connection
(polling stays as the fallback), sweeps expired leases on a timer, watches
the leases of its own handlers and cancels a handler whose run is no longer
its own (lease lapsed, task cancelled), and stops in two stages like the
thread runtime (``_runtime.StopState``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import bindparam, or_, select
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ._app import WorkerSettings
from ._execute_async import AsyncExecutor
from ._logs import logger, queue_extra, run_extra
from ._outage import Outage
from ._retry import is_disconnect
from ._run import CLAIM_TIMEOUT_REASON, ClaimedRun, HandOver
from ._runtime import (
    CANCELLED_HANDLER_GRACE,
    HAND_OVER_GRACE,
    LISTEN_RETRY_MAX,
    LISTEN_RETRY_MIN,
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
from ._sql_worker import LEASE_OK
from .migrate import check_schema_current
from .models import runs

log = logger()

# Which of these runs were taken from their handler: cancelled, still running
# under a lease that lapsed, or already swept as ``$ClaimTimeout``. A run its
# own handler finished (completed, failed, sleeping) is not listed: a handler
# between that write and its return must not be cancelled.
_lost_runs = select(runs.c.run_id).where(
    runs.c.run_id.in_(bindparam("runs", expanding=True, type_=UUID(as_uuid=True))),
    or_(
        runs.c.state == "cancelled",
        (runs.c.state == "running") & ~LEASE_OK,
        (runs.c.state == "failed")
        & (runs.c.failure_reason["name"].astext == CLAIM_TIMEOUT_REASON["name"]),
    ),
)


LISTEN_ROUND = 1.0  # seconds: the longest wait inside psycopg's notifies() at a time


class AsyncListener:
    """``LISTEN`` on the queue's channel in an asyncio task; each notification
    calls ``wake``. Reconnects with backoff, one warning per outage.

    The connection comes from the app's engine (so its connect arguments and
    pool events apply), detached from the pool: a LISTENing session never
    serves anyone else, and it is closed here, not returned."""

    def __init__(
        self, engine: AsyncEngine, channel: str, wake: Callable[[], None], queue: str
    ) -> None:
        self._engine = engine
        self._channel = channel
        self._extra = queue_extra(queue)
        self._wake = wake
        self._failing = False
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = LISTEN_RETRY_MIN
        while True:
            try:
                await self._listen()
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
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)

    async def _listen(self) -> None:
        raw = await self._engine.raw_connection()
        conn = raw.driver_connection  # read before detach(), which clears it
        await greenlet_spawn(raw.detach)
        if not isinstance(conn, psycopg.AsyncConnection):
            await greenlet_spawn(raw.close)
            raise TypeError(f"LISTEN needs a psycopg 3 async connection, got {type(conn)!r}")
        try:
            await conn.rollback()
            await conn.set_autocommit(True)
            await conn.execute(
                psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel))
            )
            self.connected.set()
            if self._failing:
                log.warning("LISTEN on %s is back", self._channel, extra=self._extra)
                self._failing = False
            self._wake()  # anything committed while we were not listening
            while True:
                # In bounded rounds, checking for a cancellation between them: on
                # Python 3.11, asyncio.wait_for inside psycopg's wait can swallow
                # a cancellation that lands as a notification arrives (the worker
                # stopping right after its own NOTIFY), and the listener would
                # then never end.
                async for _ in conn.notifies(timeout=LISTEN_ROUND):
                    self._wake()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
        finally:
            await conn.close()


@dataclass(slots=True)
class _Slot:
    """One claimed run and the asyncio task executing it."""

    run: ClaimedRun
    task: asyncio.Task[None] | None = None
    started: bool = False  # the handler was called (releasing it then costs an attempt)
    lost: bool = False  # cancelled by the lease watchdog
    # Its completion is claiming the slot's next run: never cancelled (the run
    # it claims would be lost with the answer), waited for when stopping now.
    handing_over: bool = False


class AsyncWorker:
    """A long-running asyncio worker for one queue. Use ``AsyncAbsurd.start_worker``.

    Shutdown has two stages. A stop (``stop()``, SIGTERM, SIGINT, or cancelling
    the task running ``start_worker``) claims nothing more and lets in-flight
    handlers finish. ``stop(now=True)``, a second signal or cancellation, or
    ``shutdown_timeout`` elapsing after the first stop, stops now: handlers not
    finished are cancelled and their runs released (claimable again at once).
    """

    def __init__(self, executor: AsyncExecutor, settings: WorkerSettings) -> None:
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
        self._slots: dict[object, _Slot] = {}
        self._outage = Outage(first_delay=self.poll_interval)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- stopping ----------------------------------------------------------------

    def stop(self, *, now: bool = False) -> None:
        """Claim nothing more and let in-flight handlers finish; with ``now``,
        release them at once. Safe from any thread, from a coroutine and from a
        signal handler."""
        self._stop.stop(now=now)
        self._wake_threadsafe()

    @property
    def stopping(self) -> bool:
        return self._stop.stopping

    @property
    def stopping_now(self) -> bool:
        return self._stop.stopping_now

    def _on_signal(self, signum: int) -> None:
        self._stop.signal(signum)
        self._wake_soon()

    def _wake_soon(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _wake_threadsafe(self) -> None:
        """Wake the loop from anywhere. Always through ``call_soon_threadsafe``:
        from a signal handler on the loop's own thread, a plain ``Event.set``
        would not interrupt the loop's ``select``."""
        loop = self._loop
        if loop is None:
            return  # not running yet: the loop checks the stop before it idles
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to wake
            loop.call_soon_threadsafe(self._wake_soon)

    # -- the loop ----------------------------------------------------------------

    async def run(self, shared_need: int = 0) -> None:
        """Run until stopped. Cancelling the task that awaits this is a graceful
        stop (a second cancellation stops now): in-flight handlers finish, then
        ``CancelledError`` propagates."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await self._check_schema()
        extra = queue_extra(self.queue)
        names = self.executor.core.registry.keys()
        log.info(banner(self.settings, names, database_label(self.engine.url)), extra=extra)
        warning = pool_warning(self.engine.pool, self.settings, shared_need)
        if warning is not None:
            log.warning(warning, extra=extra)
        listener = AsyncListener(self.engine, channel_for(self.queue), self._wake_soon, self.queue)
        listening = asyncio.create_task(listener.run(), name="absurd-listen")
        restore = (
            _install_signal_handlers(self._loop, self._on_signal)
            if self.settings.handle_signals
            else nothing_to_restore
        )
        # The loop runs in a task of its own, so a cancellation of ours never
        # lands in the middle of a claim (whose runs would then be stranded).
        looping = asyncio.create_task(self._serve(), name="absurd-worker-loop")
        cancelled = 0
        try:
            while True:
                try:
                    await asyncio.shield(looping)
                    break
                except asyncio.CancelledError:
                    if looping.done():
                        raise
                    cancelled += 1
                    self.stop(now=cancelled >= 2)
        finally:
            try:
                if not looping.done():  # we are failing ourselves: stop the loop
                    looping.cancel()
                    await asyncio.wait([looping])
            finally:
                restore()
                listening.cancel()
                await asyncio.wait([listening])
        if cancelled:
            raise asyncio.CancelledError

    async def _serve(self) -> None:
        try:
            await self._check_queue()
            await self._run_loop()
        finally:
            # In the loop's own task, with no await in between: a handler task
            # created by the last claim has not run yet, so it is cancelled
            # before its handler starts and its run costs no attempt.
            await self._release_unfinished()

    async def _check_schema(self) -> None:
        """Refuse to start on a schema that is not at our head (``SchemaNotCurrent``
        names the command that fixes it). A database that is away is not a
        refusal: the loop waits for it as for any outage."""
        try:
            async with self.engine.connect() as conn:
                await conn.run_sync(check_schema_current)
        except SQLAlchemyError as exc:
            log.warning(
                "could not check the absurd schema's version: %s",
                summary(exc),
                extra=queue_extra(self.queue),
            )

    async def _check_queue(self) -> None:
        """Warn if the queue does not exist (one query, in the loop's task so a
        cancellation is a stop like any other; skipped once stopping, and never
        fatal: a database that is away is the loop's business)."""
        if self.stopping:
            return
        try:
            exists = await self.executor.queue_exists(self.queue)
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

    async def _run_loop(self) -> None:
        next_sweep = 0.0
        while not self.stopping_now:
            now = time.monotonic()
            if now >= next_sweep:
                # On a timer, busy or not: a hung handler's expired lease is swept
                # (and its handler cancelled) even when every slot is taken.
                next_sweep = now + SWEEP_INTERVAL
                sweep = not self.stopping  # a stopping worker only watches its own
                if sweep and await self._guard(self.executor.sweep_expired, self.queue) is _FAILED:
                    continue
                if await self._watch_leases() is _FAILED:
                    continue
            if self.stopping:
                if not await self._drain(next_sweep):
                    return
                continue
            free = self.concurrency - len(self._slots)
            due = None  # full: a slot that frees up wakes the loop
            if free > 0:
                wanted = min(free, self.batch_size)
                claimed = await self._guard(
                    self.executor.claim, self.queue, self.worker_id, self.claim_timeout, wanted
                )
                if claimed is _FAILED:
                    continue
                for run in claimed:
                    self._start(run)
                if len(claimed) == wanted:
                    continue  # there may be more ready right now
                # Idle with a free slot: wake when the next run comes due.
                due = await self._guard(self.executor.seconds_until_due, self.queue)
                if due is _FAILED:
                    continue
            await self._idle(idle_timeout(self.poll_interval, next_sweep - time.monotonic(), due))

    async def _idle(self, timeout: float) -> None:
        """Wait for a wake-up (NOTIFY, a free slot, a stop, a signal) or ``timeout`` seconds."""
        assert self._wake is not None
        if timeout > 0 and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    def _start(self, run: ClaimedRun) -> None:
        slot = _Slot(run)

        def mark_started() -> bool:
            slot.started = True  # on the loop: stop-now sees it before it cancels
            return True

        def begin_hand_over() -> bool:
            # Marked on the loop: a stop-now that comes later finds this slot
            # handing over, and waits for it instead of cancelling it.
            if self.stopping:
                return False
            slot.handing_over = True
            return True

        async def execute() -> None:
            next_runs: list[ClaimedRun] = []
            try:
                next_runs = await self.executor.execute(
                    run,
                    self.worker_id,
                    self.claim_timeout,
                    mark_started,
                    HandOver(self.queue, begin_hand_over),
                )
                if next_runs and self.stopping:  # stopped while the completion claimed
                    claimed, next_runs = next_runs, []
                    for claimed_run in claimed:
                        await self._release(claimed_run, started=False)
            except asyncio.CancelledError:
                if not slot.lost:
                    raise  # stopping now: the run is released by the loop
                log.warning(
                    "cancelled the handler of run %s: its run is no longer this worker's "
                    "(cancelled, or its lease expired)",
                    run.run_id,
                    extra=run_extra(run),
                )
            except Exception:
                log.exception(
                    "worker slot crashed running run %s", run.run_id, extra=run_extra(run)
                )
            finally:
                # The run its completion claimed takes the slot's place at once,
                # so the loop never sees it free and claims for it too.
                self._slots.pop(run.run_id, None)
                for claimed_run in next_runs:
                    self._start(claimed_run)
                if not next_runs:
                    self._wake_soon()

        self._slots[run.run_id] = slot
        slot.task = asyncio.create_task(execute(), name=f"absurd-task-{run.run_id}")

    async def _watch_leases(self) -> Any:
        """The lease watchdog: cancel the handler of any run that is no longer
        ours (its lease lapsed, or its task was cancelled), so it stops writing
        and stops its side effects. The sweep retries a lapsed run."""
        started = [
            slot
            for slot in self._slots.values()
            if slot.started and not slot.lost and not slot.handing_over
        ]
        if not started:
            return None
        lost = await self._guard(
            self.executor.db.all, _lost_runs, {"runs": [s.run.run_id for s in started]}
        )
        if lost is _FAILED:
            return _FAILED
        for row in lost:
            slot = self._slots.get(row.run_id)
            if slot is None or slot.handing_over:  # its completion went out meanwhile
                continue
            if slot.task is not None and not slot.task.done():
                slot.lost = True
                slot.task.cancel()
        return None

    async def _drain(self, next_sweep: float) -> bool:
        """Stage one of a shutdown: wait for in-flight handlers (watching their
        leases meanwhile). False once none is left."""
        if not self._slots:
            return False
        if self._stop.start_draining():
            log.info(
                self._stop.drain_message(self.worker_id, len(self._slots)),
                extra=queue_extra(self.queue),
            )
        deadline = self._stop.deadline or 0.0
        now = time.monotonic()
        await self._idle(min(next_sweep - now, deadline - now))
        return True

    async def _release_unfinished(self) -> None:
        """Stage two: cancel every handler that has not finished and give its
        run back (claimable at once; an attempt used only if it had started).
        A slot whose completion is claiming its next run is not cancelled but
        waited for: it finishes its run and hands back the one it claimed."""
        slots = [slot for slot in self._slots.values() if not slot.lost]
        if not slots:
            return
        log.warning(
            "worker %s stopping now: releasing %d unfinished run(s)",
            self.worker_id,
            len(slots),
            extra=queue_extra(self.queue),
        )
        releasing = [slot for slot in slots if not slot.handing_over]
        for slot in releasing:
            if slot.task is not None:
                slot.task.cancel()  # an asyncio handler can be stopped, unlike a thread
        for slot in releasing:
            await self._release(slot.run, slot.started)
        handing_over = {s.task: s.run for s in slots if s.handing_over and s.task is not None}
        if handing_over:
            _, pending = await asyncio.wait(handing_over, timeout=HAND_OVER_GRACE)
            for task in pending:
                log.warning(
                    "%s is still recording its completion; left running (the run it "
                    "claimed, if any, waits for its lease to expire)",
                    task.get_name(),
                    extra=run_extra(handing_over[task]),
                )
        unfinished = {
            s.task: s.run for s in self._slots.values() if s.task is not None and not s.handing_over
        }
        if unfinished:
            _, pending = await asyncio.wait(unfinished, timeout=CANCELLED_HANDLER_GRACE)
            for task in pending:  # a handler that swallowed CancelledError: fenced anyway
                log.warning(
                    "%s ignored its cancellation; left running",
                    task.get_name(),
                    extra=run_extra(unfinished[task]),
                )

    async def _release(self, run: ClaimedRun, started: bool) -> None:
        try:
            await self.executor.release(run, self.worker_id, self.claim_timeout, started)
        except Exception:
            # Its lease still runs out: the sweep of another worker retries it.
            log.exception("could not release run %s", run.run_id, extra=run_extra(run))

    async def _guard(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Call ``fn``; while the database is unreachable, back off and log once."""
        try:
            result = await fn(*args)
        except Exception as exc:
            await self._idle(database_failed(self._outage, log, self.worker_id, exc, self.queue))
            return _FAILED
        database_succeeded(self._outage, log, self.worker_id, self.queue)
        return result


_FAILED = object()  # what _guard returns for a call that raised


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
) -> Callable[[], None]:
    """SIGTERM/SIGINT stop the worker, when it runs in the main thread's loop.
    The previous handlers come back when the worker returns."""
    if threading.current_thread() is not threading.main_thread():
        return nothing_to_restore
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    installed = []
    for sig in previous:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not a Unix loop, or not main
            continue
        installed.append(sig)

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)
            restore_signal_handler(sig, previous[sig])

    return restore


class AsyncWorkers(RunningWorkers[AsyncWorker]):
    """The workers one client runs (see ``_runtime.RunningWorkers``)."""

    async def run(self, worker: AsyncWorker) -> None:
        shared_need = self.enter(worker)
        if shared_need is None:
            return
        try:
            await worker.run(shared_need)
        finally:
            self.leave(worker)
