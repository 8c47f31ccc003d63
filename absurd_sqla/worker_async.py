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
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncEngine

from ._app import WorkerSettings
from ._execute_async import AsyncExecutor
from ._outage import Outage
from ._retry import is_disconnect
from ._run import ClaimedRun
from ._runtime import (
    LISTEN_RETRY_MAX,
    LISTEN_RETRY_MIN,
    SWEEP_INTERVAL,
    StopState,
    pool_warning,
    summary,
)
from ._sql import channel_for
from ._sql_worker import LEASE_OK
from .models import runs

log = logging.getLogger("absurd_sqla.worker")

# Which of these runs are no longer held (lapsed lease, cancelled, swept)?
_lost_runs = select(runs.c.run_id).where(
    runs.c.run_id.in_(bindparam("runs", expanding=True, type_=UUID(as_uuid=True))),
    ~((runs.c.state == "running") & LEASE_OK),
)


class AsyncListener:
    """``LISTEN`` on the queue's channel in an asyncio task; each notification
    calls ``wake``. Reconnects with backoff, one warning per outage."""

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._failing = False
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = LISTEN_RETRY_MIN
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():
                    backoff = LISTEN_RETRY_MIN
                if not self._failing:
                    log.warning(
                        "LISTEN on %s failed (%s); polling until it reconnects",
                        self._channel,
                        summary(exc),
                        exc_info=not is_disconnect(exc),
                    )
                self._failing = True
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX)

    async def _listen(self) -> None:
        url = self._engine.url.set(drivername="postgresql")
        conn = await psycopg.AsyncConnection.connect(
            url.render_as_string(hide_password=False), autocommit=True
        )
        async with conn:
            await conn.execute(
                psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel))
            )
            self.connected.set()
            if self._failing:
                log.warning("LISTEN on %s is back", self._channel)
                self._failing = False
            self._wake()  # anything committed while we were not listening
            async for _ in conn.notifies():
                self._wake()


@dataclass(slots=True)
class _Slot:
    run: ClaimedRun
    task: asyncio.Task[None] | None = None
    started: bool = False
    watchdog_cancelled: bool = False


class AsyncWorker:
    """A long-running asyncio worker for one queue. Use ``AsyncAbsurd.start_worker``."""

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
        release them at once. Safe from any thread and from a coroutine."""
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
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake_soon()
        else:
            loop.call_soon_threadsafe(self._wake_soon)

    # -- the loop ----------------------------------------------------------------

    async def run(self, shared_need: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        warning = pool_warning(self.engine.pool, self.settings, shared_need)
        if warning is not None:
            log.warning(warning)
        listener = AsyncListener(self.engine, channel_for(self.queue), self._wake_soon)
        listening = asyncio.create_task(listener.run(), name="absurd-listen")
        restore = _install_signal_handlers(self._loop, self._on_signal)
        try:
            try:
                await self._run_loop()
            except asyncio.CancelledError:
                # The start_worker task was cancelled: stop gracefully, then re-raise.
                self._stop.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run_loop()
                raise
            finally:
                if self.stopping_now:
                    await self._release_unfinished()
        finally:
            restore()
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listening

    async def _run_loop(self) -> None:
        next_sweep = 0.0
        while not self.stopping_now:
            if self.stopping:
                if not await self._drain():
                    return
                continue
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                if await self._guard(self.executor.sweep_expired, self.queue) is _FAILED:
                    continue
                if await self._watch_leases() is _FAILED:
                    continue
            free = self.concurrency - len(self._slots)
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
                    continue
            await self._idle(min(self.poll_interval, max(next_sweep - time.monotonic(), 0.0)))

    async def _idle(self, timeout: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    def _start(self, run: ClaimedRun) -> None:
        slot = _Slot(run)

        def mark_started() -> None:
            slot.started = True

        async def execute() -> None:
            try:
                await self.executor.execute(run, self.worker_id, self.claim_timeout, mark_started)
            except asyncio.CancelledError:
                if slot.watchdog_cancelled:
                    log.warning(
                        "cancelled the handler of run %s: its run is no longer this worker's",
                        run.run_id,
                    )
                    return
                raise
            except Exception:
                log.exception("worker slot crashed running run %s", run.run_id)
            finally:
                self._slots.pop(run.run_id, None)
                self._wake_soon()

        slot.task = asyncio.create_task(execute(), name=f"absurd-task-{run.run_id}")
        self._slots[run.run_id] = slot

    async def _watch_leases(self) -> Any:
        """Cancel the handler of any run that is no longer ours (lease lapsed,
        task cancelled): it stops writing and stops its side effects; the
        sweep retries a lapsed run."""
        started = [slot for slot in self._slots.values() if slot.started]
        if not started:
            return None
        lost = await self._guard(
            self.executor.db.all, _lost_runs, {"runs": [s.run.run_id for s in started]}
        )
        if lost is _FAILED:
            return _FAILED
        for row in lost:
            slot = self._slots.get(row.run_id)
            if slot is not None and slot.task is not None and not slot.task.done():
                slot.watchdog_cancelled = True
                slot.task.cancel()
        return None

    async def _drain(self) -> bool:
        if not self._slots:
            return False
        if self._stop.start_draining():
            log.info(self._stop.drain_message(self.worker_id, len(self._slots)))
        deadline = self._stop.deadline or 0.0
        await self._idle(min(SWEEP_INTERVAL, max(deadline - time.monotonic(), 0.0)))
        return True

    async def _release_unfinished(self) -> None:
        slots = list(self._slots.values())
        if not slots:
            return
        log.warning(
            "worker %s stopping now: releasing %d unfinished run(s)", self.worker_id, len(slots)
        )
        for slot in slots:
            if slot.task is not None:
                slot.task.cancel()  # an asyncio handler can be stopped, unlike a thread
            try:
                await self.executor.release(
                    slot.run, self.worker_id, self.claim_timeout, slot.started
                )
            except Exception:
                log.exception("could not release run %s", slot.run.run_id)
        await asyncio.gather(*(s.task for s in slots if s.task is not None), return_exceptions=True)

    async def _guard(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            result = await fn(*args)
        except Exception as exc:
            first, delay = self._outage.failed(time.monotonic())
            if first:
                log.warning(
                    "worker %s: database unreachable or failing (%s); retrying with backoff "
                    "until it is back",
                    self.worker_id,
                    summary(exc),
                    exc_info=not is_disconnect(exc),
                )
            else:
                log.debug("worker %s: database still failing: %s", self.worker_id, summary(exc))
            await self._idle(delay)
            return _FAILED
        ended = self._outage.recovered(time.monotonic())
        if ended is not None:
            log.warning(
                "worker %s: database is back after %.1fs (%d failed attempt(s))",
                self.worker_id,
                *ended,
            )
        return result


_FAILED = object()


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
) -> Callable[[], None]:
    """SIGTERM/SIGINT stop the worker, when it runs in the main thread's loop."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not a Unix loop, or not main
            pass

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])

    return restore


class AsyncWorkers:
    """The workers one client runs, so ``stop_worker()`` reaches all of them.
    A stop that comes while none runs is remembered (see ``worker.Workers``)."""

    def __init__(self) -> None:
        self._running: list[AsyncWorker] = []
        self._lock = threading.Lock()
        self._stop_pending = False

    async def run(self, worker: AsyncWorker) -> None:
        with self._lock:
            if self._stop_pending:
                self._stop_pending = False
                return
            shared_need = sum(w.settings.connections_needed for w in self._running)
            self._running.append(worker)
        try:
            await worker.run(shared_need)
        finally:
            with self._lock:
                self._running.remove(worker)

    def running(self) -> list[AsyncWorker]:
        with self._lock:
            return list(self._running)

    def stop(self, *, now: bool = False) -> None:
        with self._lock:
            self._stop_pending = not self._running
            for worker in self._running:
                worker.stop(now=now)
